package container

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/mountns"
)

// The tests run real containers: root, crun and/or runc, the default image (scripts/build-image.sh,
// or $SANDBOXD_ROOTFS) and the sandbox-agent binary ($SANDBOXD_AGENT_BIN, $SANDBOXD_BIN/sandbox-agent,
// or built from ./cmd/sandbox-agent). Without them the tests skip, except when $CI is set: then
// they fail.

var (
	setupErr error  // why the container tests cannot run
	rootfs   string // the image's root filesystem
	agentBin string // the sandbox-agent binary
	stateDir string // state dirs of the test drivers: one per runtime below it
)

// testPool is where the test drivers' sandbox addresses come from (not the default pool, which a
// sandboxd of the e2e tests may use at the same time).
var testPool = netip.MustParsePrefix("10.215.0.0/16")

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		setupErr = fmt.Errorf("needs root")
	} else if err := mountns.Enter(); err != nil {
		setupErr = err
	}
	var tmp string
	if setupErr == nil {
		setupErr = setup(&tmp)
	}
	code := m.Run()
	// Safety net: a test that failed half-way must not leave containers on the host.
	for _, d := range drivers {
		ids, _ := d.List(context.Background())
		for _, id := range ids {
			if err := d.Destroy(context.Background(), id); err != nil {
				fmt.Fprintf(os.Stderr, "cleanup: %v\n", err)
			}
		}
		if err := d.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "cleanup: %v\n", err)
		}
	}
	if inet != nil {
		inet.stop()
	}
	if tmp != "" {
		os.RemoveAll(tmp)
	}
	os.Exit(code)
}

func setup(tmp *string) error {
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	// A short temp dir: the agent socket path must fit in 108 bytes.
	if *tmp, err = os.MkdirTemp("", "sbxd"); err != nil {
		return err
	}
	stateDir = filepath.Join(*tmp, "state")

	rootfs = os.Getenv("SANDBOXD_ROOTFS")
	if rootfs == "" {
		cmd := exec.Command(filepath.Join(repo, "scripts", "build-image.sh"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("build the image (scripts/build-image.sh): %v: %s", err, lastLines(stderr.String(), 5))
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		rootfs = lines[len(lines)-1]
	}
	if _, err := os.Stat(filepath.Join(rootfs, "usr/bin/python3")); err != nil {
		return fmt.Errorf("image %s has no python3: %v", rootfs, err)
	}

	agentBin = os.Getenv("SANDBOXD_AGENT_BIN")
	if agentBin == "" && os.Getenv("SANDBOXD_BIN") != "" {
		agentBin = filepath.Join(os.Getenv("SANDBOXD_BIN"), "sandbox-agent")
	}
	if agentBin == "" {
		agentBin = filepath.Join(*tmp, "sandbox-agent")
		cmd := exec.Command("go", "build", "-o", agentBin, "./cmd/sandbox-agent")
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build ./cmd/sandbox-agent: %v: %s", err, lastLines(string(out), 5))
		}
	}
	if _, err := os.Stat(agentBin); err != nil {
		return fmt.Errorf("sandbox-agent: %v", err)
	}
	return nil
}

func repoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the module")
	}
	return filepath.Dir(gomod), nil
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// need skips (or, under CI, fails) a test that needs real containers when they are unavailable.
func need(t testing.TB) {
	t.Helper()
	if setupErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("container tests must run under CI: %v", setupErr)
		}
		t.Skipf("container tests need root, crun/runc, the image and the agent: %v", setupErr)
	}
}

var (
	driversMu sync.Mutex
	drivers   = map[string]*Driver{}
)

// openDriver returns the shared test driver of runtime name.
func openDriver(t testing.TB, name string) *Driver {
	t.Helper()
	need(t)
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not installed (scripts/install-deps.sh)", name)
		}
		t.Skipf("%s not installed (scripts/install-deps.sh)", name)
	}
	driversMu.Lock()
	defer driversMu.Unlock()
	if d := drivers[name]; d != nil {
		return d
	}
	d, err := Open(driver.Options{StateDir: filepath.Join(stateDir, name), AgentBin: agentBin, Runtime: name, NetworkPool: testPool})
	if err != nil {
		t.Fatalf("open driver with %s: %v", name, err)
	}
	if d.Runtime() != name {
		t.Fatalf("runtime = %s, want %s", d.Runtime(), name)
	}
	drivers[name] = d
	return d
}

// forEachRuntime runs f as a subtest per OCI runtime.
func forEachRuntime(t *testing.T, f func(t *testing.T, d *Driver)) {
	for _, name := range knownRuntimes {
		t.Run(name, func(t *testing.T) { f(t, openDriver(t, name)) })
	}
}

// baseSpec is a sandbox spec with the service's defaults (egress: block_outbound, nothing allowed),
// host ids of its own and a disk for /tmp (drivertest.Fill).
func baseSpec(t testing.TB) driver.Spec {
	return drivertest.Fill(t, driver.Spec{RootFS: rootfs, CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64,
		Network: egress.Policy{BlockOutbound: true}})
}

// newSandbox creates a sandbox and registers its destruction, checking that nothing is left.
func newSandbox(t *testing.T, d *Driver, spec driver.Spec) string {
	t.Helper()
	id := "t-" + statedir.RandomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Create(ctx, id, spec); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), id); err != nil {
			t.Errorf("destroy: %v", err)
		}
	})
	return id
}

// run executes code and fails the test on a driver error.
func run(t *testing.T, d *Driver, id, code string, timeout time.Duration) driver.ExecResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+30*time.Second)
	defer cancel()
	res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Timeout: timeout, MaxOutput: 1 << 20})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	return res
}

// mustRun executes code and requires it to complete.
func mustRun(t *testing.T, d *Driver, id, code string) string {
	t.Helper()
	res := run(t, d, id, code, 20*time.Second)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("status %s (exit %d), want completed\ncode:\n%s\nstdout: %s\nstderr: %s\nerror: %+v", res.Status, res.ExitCode, code, res.Stdout, res.Stderr, res.Error)
	}
	return string(res.Stdout)
}
