package wasm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/worker"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/mountns"
)

// The tests run real workers (this test binary re-executed as "wasm-worker", see TestMain) in
// real cgroups: they need root. Two images:
//   - the probe (testdata/probe, a Go program built for wasip1 in setup, standing in for
//     python.wasm) for the driver's mechanics;
//   - the real python.wasm image from $SANDBOXD_PYTHON_WASM (scripts/build-python-wasm.sh prints
//     it) for everything about Python.
// Without them the tests skip, except when $CI is set: then they fail.

var (
	setupErr   error  // why no test can run
	probeImage string // image dir whose python.wasm is the probe
	pyImage    string // $SANDBOXD_PYTHON_WASM
	pyErr      error  // why the python tests cannot run
	tmpRoot    string
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == protocol.WorkerCommand {
		os.Exit(worker.Main(os.Args[2:]))
	}
	if os.Geteuid() != 0 {
		setupErr = errors.New("needs root")
	} else if err := mountns.Enter(); err != nil {
		// As in sandboxd serve: mounts (the sandboxes' /tmp) live and die with the process.
		setupErr = err
	}
	if setupErr == nil {
		setupErr = setup()
	}
	code := m.Run()
	// Safety net: nothing of a failed test may stay on the host.
	driversMu.Lock()
	for _, d := range drivers {
		ids, _ := d.List(context.Background())
		for _, id := range ids {
			if err := d.Destroy(context.Background(), id); err != nil {
				fmt.Fprintf(os.Stderr, "cleanup: %v\n", err)
			}
		}
		d.Close()
	}
	driversMu.Unlock()
	if tmpRoot != "" {
		os.RemoveAll(tmpRoot)
	}
	os.Exit(code)
}

func setup() error {
	var err error
	if tmpRoot, err = os.MkdirTemp("", "wasmdrv"); err != nil {
		return err
	}
	probeImage = filepath.Join(tmpRoot, "probe-image")
	if err := os.MkdirAll(filepath.Join(probeImage, "lib", "python3.11"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(probeImage, "lib", "python3.11", "marker.py"), []byte("marker\n"), 0o644); err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-o", filepath.Join(probeImage, "python.wasm"), "./testdata/probe")
	cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build the probe module: %v: %s", err, out)
	}
	pyImage = os.Getenv("SANDBOXD_PYTHON_WASM")
	if pyImage == "" {
		pyErr = errors.New("$SANDBOXD_PYTHON_WASM is not set (the directory scripts/build-python-wasm.sh prints)")
	} else if err := checkImage(pyImage); err != nil {
		pyErr = err
	}
	return nil
}

// need skips (or, under CI, fails) a test when the workers cannot run.
func need(t testing.TB) {
	t.Helper()
	if setupErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("wasm driver tests must run under CI: %v", setupErr)
		}
		t.Skipf("wasm driver tests need root: %v", setupErr)
	}
}

// needPython is need plus the python.wasm image.
func needPython(t testing.TB) {
	t.Helper()
	need(t)
	if pyErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("python.wasm tests must run under CI: %v", pyErr)
		}
		t.Skipf("python.wasm tests: %v", pyErr)
	}
}

var (
	driversMu sync.Mutex
	drivers   = map[string]*Driver{}
)

// openDriver returns the shared test driver named name (each has its own state dir and pools).
func openDriver(t testing.TB, name string) *Driver {
	t.Helper()
	need(t)
	driversMu.Lock()
	defer driversMu.Unlock()
	if d := drivers[name]; d != nil {
		return d
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dr, err := driver.Open(Name, driver.Options{StateDir: filepath.Join(tmpRoot, "state-"+name), WasmWorker: []string{exe, protocol.WorkerCommand}})
	if err != nil {
		t.Fatalf("open driver: %v", err)
	}
	d := dr.(*Driver)
	drivers[name] = d
	return d
}

// baseSpec is a sandbox spec with the service's defaults.
func baseSpec(t testing.TB, image string) driver.Spec {
	return drivertest.Fill(t, driver.Spec{RootFS: image, CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64,
		Network: egress.Policy{BlockOutbound: true}})
}

// newSandbox creates a sandbox and registers its destruction, checking that nothing is left.
func newSandbox(t *testing.T, d *Driver, spec driver.Spec) string {
	t.Helper()
	id := "t-" + statedir.RandomHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := d.Create(ctx, id, spec); err != nil {
		t.Fatalf("create: %v", err)
	}
	group := sandboxGroup(t, d, id)
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), id); err != nil {
			t.Errorf("destroy: %v", err)
		}
		assertGone(t, d, id, group)
	})
	return id
}

// sandboxGroup returns sandbox id's cgroup.
func sandboxGroup(t testing.TB, d *Driver, id string) string {
	t.Helper()
	b, err := d.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.group == "" || !strings.HasPrefix(b.group, d.cgParent+"/") {
		t.Fatalf("sandbox %s has cgroup %q", id, b.group)
	}
	return b.group
}

// assertGone checks that nothing of sandbox id (whose cgroup was group, "" if it had none) is
// left: no state dir, no cgroup, no process, no mount, not listed.
func assertGone(t *testing.T, d *Driver, id, group string) {
	t.Helper()
	if _, err := os.Lstat(d.boxDir(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir of %s still there: %v", id, err)
	}
	if group != "" {
		for _, m := range d.cg.Mounts() {
			if _, err := os.Lstat(cgroup.Dir(m, group)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("cgroup %s still there", cgroup.Dir(m, group))
			}
		}
		if procs := processesIn(group); len(procs) > 0 {
			t.Errorf("processes of %s still running: %v", id, procs)
		}
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), id) {
		t.Errorf("a mount of %s is left", id)
	}
	ids, err := d.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ids {
		if l == id {
			t.Errorf("List still has %s", id)
		}
	}
}

// processesIn lists host processes in cgroup group (in any hierarchy).
func processesIn(group string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err == nil && bytes.Contains(b, []byte(":"+group+"\n")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// probe runs the probe module with ops as its arguments (see testdata/probe).
func probe(t *testing.T, d *Driver, id string, timeout time.Duration, ops ...string) driver.ExecResult {
	t.Helper()
	b, err := d.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Minute)
	defer cancel()
	env, _ := buildEnv(nil)
	res, err := d.exec(ctx, b, protocol.Run{Env: env, MaxOutput: 1 << 20, Args: append([]string{"probe"}, ops...)},
		driver.ExecRequest{Timeout: timeout, MaxOutput: 1 << 20})
	if err != nil {
		t.Fatalf("exec probe: %v", err)
	}
	return res
}

// probeLines maps each op of a probe run to its result.
func probeLines(res driver.ExecResult) map[string]string {
	out := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(res.Stdout)), "\n") {
		op, r, _ := strings.Cut(l, " ")
		out[op] = r
	}
	return out
}

// run executes Python code and fails the test on a driver error.
func run(t *testing.T, d *Driver, id, code string, timeout time.Duration) driver.ExecResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Minute)
	defer cancel()
	res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Timeout: timeout, MaxOutput: 1 << 20})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	return res
}

// mustRun executes code and requires it to complete; it returns stdout.
func mustRun(t *testing.T, d *Driver, id, code string) string {
	t.Helper()
	res := run(t, d, id, code, 30*time.Second)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("status %s (exit %d), want completed\ncode:\n%s\nstdout: %s\nstderr: %s\nerror: %+v", res.Status, res.ExitCode, code, res.Stdout, res.Stderr, res.Error)
	}
	return string(res.Stdout)
}
