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
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
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
	drivers.Close() // nothing of a failed test may stay on the host
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

// needPython skips (or, under CI, fails) a test that needs the python.wasm image.
func needPython(t testing.TB) {
	t.Helper()
	drivertest.Need(t, "the wasm driver's tests", setupErr)
	drivertest.Need(t, "the python.wasm tests", pyErr)
}

var drivers drivertest.Drivers[*Driver] // the shared test drivers, by name (each has its own state dir and pools)

// openDriver returns the shared test driver named name.
func openDriver(t testing.TB, name string) *Driver {
	t.Helper()
	drivertest.Need(t, "the wasm driver's tests", setupErr)
	return drivers.Get(t, name, func() (*Driver, error) { return openState(filepath.Join(tmpRoot, "state-"+name)) })
}

// openState opens a test driver with its state in dir, its workers this test binary.
func openState(dir string) (*Driver, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return Open(driver.Options{StateDir: dir, WasmWorker: []string{exe, protocol.WorkerCommand}})
}

// baseSpec is a sandbox spec with the service's defaults.
func baseSpec(t testing.TB, image string) driver.Spec {
	return drivertest.Fill(t, driver.Spec{RootFS: image, CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64,
		Network: egress.Policy{BlockOutbound: true}})
}

// harness is the wasm driver's conformance harness (on the python.wasm image) but for Open and
// Reopen, which TestConformance sets. The tests make their sandboxes with harness.Sandbox: when
// the test ends, Destroy leaves nothing of them (assertGone).
var harness = drivertest.Harness{
	Spec:      func(t *testing.T) driver.Spec { return baseSpec(t, pyImage) },
	Python:    true,
	ImageFile: stdlibPath + "/python3.11/wave.py",
	Track: func(t *testing.T, dd driver.Driver, id string) func(*testing.T, driver.Driver) {
		group := ""
		if _, err := dd.(*Driver).lookup(id); err == nil {
			group = sandboxGroup(t, dd.(*Driver), id)
		}
		return func(t *testing.T, dd driver.Driver) { assertGone(t, dd.(*Driver), id, group) }
	},
	// A run's processes are its worker's: after a run only the sandbox's worker is in its cgroup.
	Idle: func(t *testing.T, dd driver.Driver, id string) {
		b, err := dd.(*Driver).lookup(id)
		if err != nil {
			t.Fatal(err)
		}
		b.mu.Lock()
		w, group := b.w, b.group
		b.mu.Unlock()
		for _, pid := range processesIn(group) {
			if w == nil || pid != w.pid {
				t.Errorf("process %d left in the cgroup of sandbox %s (its worker: %v)", pid, id, w != nil)
			}
		}
	},
}

// TestConformance: the driver conformance suite. The workers of a crashed driver are left
// running (as if Pdeathsig failed): a driver reopened on its state must kill them.
func TestConformance(t *testing.T) {
	needPython(t)
	h := harness
	h.Open = func(t *testing.T) driver.Driver {
		dir, err := os.MkdirTemp(tmpRoot, "state-")
		if err != nil {
			t.Fatal(err)
		}
		d, err := openState(dir)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	h.Reopen = func(t *testing.T, old driver.Driver) driver.Driver {
		d, err := openState(old.(*Driver).stateDir)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	drivertest.Run(t, h)
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
