package container

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
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
	drivers.Close() // a test that failed half-way must not leave containers on the host
	if inet != nil {
		inet.Stop()
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

	if rootfs, err = drivertest.ImageRootFS(repo); err != nil {
		return err
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

var drivers drivertest.Drivers[*Driver] // the shared test drivers, by runtime

// openDriver returns the shared test driver of runtime name.
func openDriver(t testing.TB, name string) *Driver {
	t.Helper()
	drivertest.Need(t, "the container driver's tests", setupErr)
	if name == runscName {
		if runscBin == "" {
			drivertest.Need(t, "the runsc tests", fmt.Errorf("$SANDBOXD_RUNSC is not set (SANDBOXD_RUNSC=$(scripts/build-runsc.sh))"))
		}
	} else if _, err := exec.LookPath(name); err != nil {
		drivertest.Need(t, "the "+name+" tests", fmt.Errorf("%s not installed (scripts/install-deps.sh)", name))
	}
	return drivers.Get(t, name, func() (*Driver, error) { return openRuntime(filepath.Join(stateDir, name), name) })
}

// openRuntime opens a test driver with its state in dir, on runtime name ("": the driver's
// choice).
func openRuntime(dir, name string) (*Driver, error) {
	d, err := Open(driver.Options{StateDir: dir, AgentBin: agentBin, Runtime: name, RunscBin: runscBin, NetworkPool: testPool})
	if err == nil && name != "" && d.Runtime() != name {
		d.Close()
		err = fmt.Errorf("runtime = %s, want %s", d.Runtime(), name)
	}
	return d, err
}

// runscBin is gVisor's runsc ($SANDBOXD_RUNSC, from scripts/build-runsc.sh): the tests run on it
// too, beside crun and runc; without it they fail under CI.
var runscBin = os.Getenv("SANDBOXD_RUNSC")

// testRuntimes are the OCI runtimes the tests run on.
var testRuntimes = append(knownRuntimes[:len(knownRuntimes):len(knownRuntimes)], runscName)

// forEachRuntime runs f as a subtest per OCI runtime.
func forEachRuntime(t *testing.T, f func(t *testing.T, d *Driver)) {
	for _, name := range testRuntimes {
		t.Run(name, func(t *testing.T) { f(t, openDriver(t, name)) })
	}
}

// baseSpec is a sandbox spec with the service's defaults (egress: block_outbound, nothing allowed),
// host ids of its own and a disk for /tmp (drivertest.Fill).
func baseSpec(t *testing.T) driver.Spec {
	return drivertest.Fill(t, driver.Spec{RootFS: rootfs, CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64,
		Network: egress.Policy{BlockOutbound: true}})
}

// harness is the container driver's conformance harness but for Open and Reopen, which
// TestConformance sets per runtime. The tests make their sandboxes with harness.Sandbox.
var harness = drivertest.Harness{
	Spec:      baseSpec,
	Python:    true,
	Spawn:     true,
	Signals:   true,
	Egress:    true,
	Survives:  true,
	ImageFile: "/usr/lib/os-release",
	Crash:     crash,
	Track: func(t *testing.T, dd driver.Driver, id string) func(*testing.T, driver.Driver) {
		pid := 0
		if b, err := dd.(*Driver).lookup(id); err == nil {
			pid = b.Pid
		}
		return func(t *testing.T, dd driver.Driver) { assertGone(t, dd.(*Driver), id, pid) }
	},
	Idle: func(t *testing.T, dd driver.Driver, id string) { onlyInit(t, dd.(*Driver), id) },
}

// TestMeasure: create -> ready and a print(1) run, p50 of 10 (SANDBOXD_MEASURE=1), per runtime.
func TestMeasure(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) { drivertest.Measure(t, harness, d, 10) })
}

func TestConformance(t *testing.T) {
	for _, name := range testRuntimes {
		t.Run(name, func(t *testing.T) {
			openDriver(t, name) // skips when the runtime is missing
			h := harness
			h.OOMMayEndSandbox = name == runscName
			h.Open = func(t *testing.T) driver.Driver {
				dir, err := os.MkdirTemp(stateDir, "c") // short: the agent socket's path must fit in 108 bytes
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(dir) })
				d, err := openRuntime(dir, name)
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			// A new process: the default runtime choice, nothing in memory.
			h.Reopen = func(t *testing.T, old driver.Driver) driver.Driver {
				d, err := openRuntime(old.(*Driver).stateDir, "")
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			drivertest.Run(t, h)
		})
	}
}

// crash does what a crash of d's process does: the sandboxes' overlay mounts vanish with its
// mount namespace, its sockets close (gateway, network manager); its kernel objects (veths,
// host rules, the namespaces' bind mounts here in the test process) stay.
func crash(t *testing.T, dd driver.Driver) {
	d := dd.(*Driver)
	ids, err := d.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if err := unix.Unmount(filepath.Join(d.sandboxMountDir(id), "root"), unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}
