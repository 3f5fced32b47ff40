package drivertest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Harness says how the suite opens a driver, what a sandbox of it gets, and what its sandboxes
// can do. Open, Reopen and Spec are required; the hooks are optional.
type Harness struct {
	// Open opens a new driver with state of its own. When t ends the suite destroys what the
	// driver still lists and closes it (Shutdown).
	Open func(t *testing.T) driver.Driver
	// Reopen opens another driver on old's state: a new process of the service on the same host,
	// after old's process crashed (Crash) or closed old. The suite shuts it down like Open's.
	Reopen func(t *testing.T, old driver.Driver) driver.Driver
	// Spec returns the spec of a new sandbox with the service's defaults (egress blocked, limits
	// of at least 128 MiB and 64 processes, the driver's Python image) and its host side (Fill).
	Spec func(t *testing.T) driver.Spec

	// Python: Exec runs Code as Python with the runner's semantics (package pyrunner). A fake
	// that runs no code has it false: the suite skips everything about runs.
	Python bool
	// Spawn: run code can start threads, and processes when the spec allows it (AllowSpawn).
	// Without it (WASI), it can start neither, whatever the spec says.
	Spawn bool
	// Signals: run code can end by a signal (WASI has none).
	Signals bool
	// Egress: sandboxes can be given egress. Without it Create refuses a policy that asks for
	// any (driver.Spec.Network).
	Egress bool
	// Survives: sandboxes outlive the driver's process; a driver opened after a restart runs code
	// in those it lists. Without it, Exec in them returns ErrNotFound (the service destroys them
	// at start-up anyway).
	Survives bool
	// OOMMayEndSandbox: a run killed at the memory limit may end its whole sandbox, after which
	// runs in it fail (gVisor has no OOM killer of its own: the host's memory cgroup kills a
	// process of gVisor's — a stub the run's process ran on, or the Sentry, and the sandbox with
	// it). Without it, the sandbox always runs code again after an OOM.
	OOMMayEndSandbox bool
	// NoHostDirs, when set, says why the sandbox's paths are not the spec's host directories
	// (TmpDir, WorkDir, the Mounts' HostDirs): what the host writes there the sandbox does not see,
	// and back. The tests that share files through them (Paths, Streaming, TmpSize) share them
	// through the driver's driver.Filer instead (its disk is Spec.DiskBytes), or skip with it
	// when the driver has none.
	NoHostDirs string
	// ImageFile is a file of the image that runs can read but do not need: the suite blocks it.
	// Required with Python.
	ImageFile string

	// Crash, if set, does to d what a crash of its process would, beyond leaving d as it is:
	// it unmounts what would go with the process's mount namespace, closes its sockets, kills
	// what would die with it. d is not used afterwards but by Reopen (and Shutdown).
	Crash func(t *testing.T, d driver.Driver)
	// Track, if set, is called when d's Create of sandbox id has returned, whether it succeeded or
	// not: it records what the sandbox holds on the host (processes, cgroups, mounts) and returns
	// a check that none of it is left once a Destroy of the sandbox has returned, by the driver
	// the check is given (d, or one reopened on its state).
	Track func(t *testing.T, d driver.Driver, id string) (gone func(t *testing.T, d driver.Driver))
	// Idle, if set, checks that no process of a run is left in sandbox id, when no run is going.
	Idle func(t *testing.T, d driver.Driver, id string)
}

// Run runs the conformance suite of driver.Driver: every subtest on one driver of h.Open, but the
// restart tests, which open their own. Every driver runs it from its own tests:
//
//	func TestConformance(t *testing.T) {
//		drivertest.Run(t, drivertest.Harness{
//			Open:   func(t *testing.T) driver.Driver { … a new driver, state of its own },
//			Reopen: func(t *testing.T, old driver.Driver) driver.Driver { … a new driver on old's state },
//			Spec:   func(t *testing.T) driver.Spec { return drivertest.Fill(t, driver.Spec{RootFS: …}) },
//			Python: true, …
//		})
//	}
//
// Beyond the contract written in package driver, the suite holds every driver to what the
// service relies on:
//
//   - runs have the runner's semantics (package pyrunner): `result` comes back as JSON, an
//     uncaught exception as ExecResult.Error with its type, SystemExit as the exit code, and a
//     run's working directory is empty at its start;
//   - a run killed at its timeout or by its ctx ends with exit code 128+SIGKILL;
//   - Spec.Blocked wins over the image and over the mounts, and a mount reaches nothing of the
//     host beyond its directory (neither ".." nor a symlink the host put there);
//   - files a sandbox writes in a read_write mount are its host user's (Spec.HostIDs +
//     driver.SandboxUser);
//   - a driver that does not run the sandboxes it lists after a restart (Harness.Survives) says
//     ErrNotFound to Exec in them.
func Run(t *testing.T, h Harness) {
	d := h.open(t)
	for _, tc := range []struct {
		name   string
		python bool // needs a driver that runs Python
		fn     func(t *testing.T, h Harness, d driver.Driver)
		host   bool // shares files with the sandbox through its host directories
	}{
		{"CreateDestroy", false, testCreateDestroy, false},
		{"CreateCancelled", false, testCreateCancelled, false},
		{"NotFound", false, testNotFound, false},
		{"List", false, testList, false},
		{"Concurrent", false, testConcurrent, false},
		{"ListAfterRestart", false, func(t *testing.T, h Harness, _ driver.Driver) { testRestart(t, h, false) }, false},
		{"DestroyAfterCrash", false, func(t *testing.T, h Harness, _ driver.Driver) { testRestart(t, h, true) }, false},
		{"Egress", false, testEgress, false},
		{"Ends", true, testEnds, false},
		{"Timeout", true, testTimeout, false},
		{"Cancel", true, testCancel, false},
		{"OOM", true, testOOM, false},
		{"OutputLimits", true, testOutputLimits, false},
		{"Streaming", true, testStreaming, true},
		{"Paths", true, testPaths, true},
		{"TmpSize", true, testTmpSize, true},
		{"RunsStartClean", true, testRunsStartClean, false},
		{"Spawn", true, testSpawn, false},
		{"AgentCalls", true, testAgentCalls, false},
		{"Rich", true, testRich, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.python && !h.Python {
				t.Skip("the driver runs no Python")
			}
			if _, filer := d.(driver.Filer); tc.host && h.NoHostDirs != "" && !filer {
				t.Skip(h.NoHostDirs)
			}
			tc.fn(t, h, d)
		})
	}
}

// Sandbox creates a sandbox of spec in d and, when t ends, destroys it and checks that nothing of
// it is left (List, Exec, Track).
func (h Harness) Sandbox(t *testing.T, d driver.Driver, spec driver.Spec) string {
	t.Helper()
	id := NewID()
	err := create(d, id, spec)
	gone := h.track(t, d, id)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), id); err != nil {
			t.Errorf("destroy: %v", err)
		}
		gone(t, d)
	})
	return id
}

func (h Harness) open(t *testing.T) driver.Driver {
	t.Helper()
	return shutDownAtEnd(t, h.Open(t))
}

func (h Harness) reopen(t *testing.T, old driver.Driver) driver.Driver {
	t.Helper()
	return shutDownAtEnd(t, h.Reopen(t, old))
}

func shutDownAtEnd(t *testing.T, d driver.Driver) driver.Driver {
	t.Cleanup(func() {
		if err := Shutdown(d); err != nil {
			t.Errorf("shut the driver down: %v", err)
		}
	})
	return d
}

// track is Harness.Track plus what every driver must show of a destroyed sandbox: List lacks
// it, Exec in it is ErrNotFound.
func (h Harness) track(t *testing.T, d driver.Driver, id string) func(t *testing.T, d driver.Driver) {
	t.Helper()
	var hook func(*testing.T, driver.Driver)
	if h.Track != nil {
		hook = h.Track(t, d, id)
	}
	return func(t *testing.T, d driver.Driver) {
		t.Helper()
		if hook != nil {
			hook(t, d)
		}
		ids, err := d.List(context.Background())
		if err != nil {
			t.Errorf("list: %v", err)
		}
		if slices.Contains(ids, id) {
			t.Errorf("List still has %s", id)
		}
		if _, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)", Timeout: time.Second}); !errors.Is(err, driver.ErrNotFound) {
			t.Errorf("exec in %s after destroy: %v, want ErrNotFound", id, err)
		}
	}
}

func (h Harness) idle(t *testing.T, d driver.Driver, id string) {
	t.Helper()
	if h.Idle != nil {
		h.Idle(t, d, id)
	}
}

// create creates sandbox id, allowing two minutes (a cold start of a runtime can be slow).
func create(d driver.Driver, id string, spec driver.Spec) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return d.Create(ctx, id, spec)
}

// listed fails t unless d lists every one of ids.
func listed(t *testing.T, d driver.Driver, ids ...string) {
	t.Helper()
	got, err := d.List(context.Background())
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	for _, id := range ids {
		if !slices.Contains(got, id) {
			t.Fatalf("List = %v, want %s in it", got, id)
		}
	}
}

// testCreateDestroy: a sandbox is listed once created; Destroy removes everything of it, and
// destroying it again, or an id never created, returns nil.
func testCreateDestroy(t *testing.T, h Harness, d driver.Driver) {
	ctx := context.Background()
	spec := h.Spec(t)
	spec.AllowSpawn = h.Spawn
	spec.Mounts = []driver.Mount{{Path: "/workspace/output", HostDir: HostDir(t)}}
	id := NewID()
	err := create(d, id, spec)
	gone := h.track(t, d, id)
	t.Cleanup(func() { d.Destroy(ctx, id) })
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	listed(t, d, id)
	if h.Python {
		code := "print(1)"
		if h.Spawn { // a process left behind by a run
			code = "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint(1)"
		}
		MustExec(t, d, id, code)
	}
	if err := d.Destroy(ctx, id); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	gone(t, d)
	if err := d.Destroy(ctx, id); err != nil {
		t.Errorf("second destroy: %v", err)
	}
	if err := d.Destroy(ctx, NewID()); err != nil {
		t.Errorf("destroy of an unknown id: %v", err)
	}
}

// testCreateCancelled: Create with a cancelled ctx fails and leaves nothing.
func testCreateCancelled(t *testing.T, h Harness, d driver.Driver) {
	spec := h.Spec(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	id := NewID()
	err := d.Create(ctx, id, spec)
	gone := h.track(t, d, id)
	if err == nil {
		d.Destroy(context.Background(), id)
		t.Fatal("create with a cancelled context succeeded")
	}
	gone(t, d)
}

func testNotFound(t *testing.T, h Harness, d driver.Driver) {
	_, err := d.Exec(context.Background(), NewID(), driver.ExecRequest{Code: "print(1)", Timeout: time.Second})
	if !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("exec in an unknown sandbox: %v, want ErrNotFound", err)
	}
}

func testList(t *testing.T, h Harness, d driver.Driver) {
	a, b := h.Sandbox(t, d, h.Spec(t)), h.Sandbox(t, d, h.Spec(t))
	listed(t, d, a, b)
	if err := d.Check(context.Background()); err != nil {
		t.Fatalf("check: %v", err)
	}
}

// testConcurrent: sandboxes are created, run and destroyed at the same time.
func testConcurrent(t *testing.T, h Harness, d driver.Driver) {
	const n = 3
	specs := make([]driver.Spec, n)
	for i := range specs {
		specs[i] = h.Spec(t)
	}
	errs := make(chan error, n)
	for _, spec := range specs {
		go func() {
			ctx := context.Background()
			id := NewID()
			if err := create(d, id, spec); err != nil {
				errs <- fmt.Errorf("create: %w", err)
				return
			}
			var err error
			if h.Python {
				var res driver.ExecResult
				res, err = d.Exec(ctx, id, driver.ExecRequest{Code: "print(41+1)", Timeout: time.Minute, MaxOutput: 100})
				if err == nil && string(res.Stdout) != "42\n" {
					err = fmt.Errorf("run: %s, stdout %q, stderr %q", res.Status, res.Stdout, res.Stderr)
				}
			}
			errs <- errors.Join(err, d.Destroy(ctx, id))
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// testRestart: a driver opened on the state of another — closed first, or crashed — lists the
// sandboxes the other created, runs code in them if they survive (Harness.Survives), and destroys
// them without leaving anything.
func testRestart(t *testing.T, h Harness, crash bool) {
	ctx := context.Background()
	specs := []driver.Spec{h.Spec(t), h.Spec(t)} // before the driver: the disks outlive its shutdown
	old := h.open(t)
	var ids []string
	var gones []func(*testing.T, driver.Driver)
	for _, spec := range specs {
		id := NewID()
		err := create(old, id, spec)
		gones = append(gones, h.track(t, old, id))
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		ids = append(ids, id)
	}
	if h.Python {
		MustExec(t, old, ids[0], "open('/tmp/before', 'w').write('x')")
	}
	switch c, ok := old.(Closer); {
	case crash && h.Crash != nil:
		h.Crash(t, old)
	case !crash && ok:
		if err := c.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
	}
	d := h.reopen(t, old)
	listed(t, d, ids...)
	if h.Python {
		res, err := d.Exec(ctx, ids[0], driver.ExecRequest{Code: "print(open('/tmp/before').read())", Timeout: time.Minute, MaxOutput: 100})
		switch {
		case h.Survives && err != nil:
			t.Errorf("exec after the restart: %v", err)
		case h.Survives && (res.Status != driver.StatusCompleted || string(res.Stdout) != "x\n"):
			t.Errorf("exec after the restart: %s, stdout %q, stderr %q", res.Status, res.Stdout, res.Stderr)
		case !h.Survives && !errors.Is(err, driver.ErrNotFound):
			t.Errorf("exec after the restart: %v, want ErrNotFound", err)
		}
	}
	for i, id := range ids {
		if err := d.Destroy(ctx, id); err != nil {
			t.Fatalf("destroy after the restart: %v", err)
		}
		gones[i](t, d)
		if err := d.Destroy(ctx, id); err != nil {
			t.Errorf("second destroy: %v", err)
		}
	}
}

// testEgress: a policy with egress gets a sandbox from a driver with Egress, and is refused by one
// without, leaving nothing.
func testEgress(t *testing.T, h Harness, d driver.Driver) {
	rules := egress.Policy{BlockOutbound: true, Rules: []egress.Rule{{Host: "example.com", Port: 443}}}
	if h.Egress {
		spec := h.Spec(t)
		spec.Network = rules
		h.Sandbox(t, d, spec)
		return
	}
	for _, p := range []egress.Policy{{BlockOutbound: false}, rules} {
		spec := h.Spec(t)
		spec.Network = p
		id := NewID()
		err := create(d, id, spec)
		gone := h.track(t, d, id)
		if err == nil {
			d.Destroy(context.Background(), id)
			t.Errorf("policy %+v: create succeeded", p)
		}
		gone(t, d)
	}
}

// testEnds: how runs end, and what they report (one sandbox, the runs one after the other).
func testEnds(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	for _, tc := range []struct {
		name       string
		code       string
		env        map[string]string
		maxOutput  int
		signals    bool // needs Harness.Signals
		status     driver.Status
		exit       int
		signal     int    // where there are signals (Harness.Signals); 0 elsewhere
		stdout     string // exact, when not ""
		stderrHas  []string
		result     string // exact JSON (compared as values), "" for none; "repr:" prefix: a JSON string starting so
		errType    string
		errMessage string
		tbHas      string
	}{
		{name: "print", code: "print(1)", status: driver.StatusCompleted, stdout: "1\n"},
		{name: "stderr", code: "import sys\nsys.stderr.write('warn\\n')", status: driver.StatusCompleted, stderrHas: []string{"warn"}},
		{name: "result json", code: "result = {'rows': 12, 'ok': [True, None]}", status: driver.StatusCompleted, result: `{"rows": 12, "ok": [true, null]}`},
		{name: "result int", code: "result = 42", status: driver.StatusCompleted, result: `42`},
		{name: "result repr", code: "class C:\n    def __repr__(self): return 'C!'\nresult = C()", status: driver.StatusCompleted, result: `"C!"`},
		{name: "result nan is repr", code: "result = float('nan')", status: driver.StatusCompleted, result: `"nan"`},
		{name: "result none", code: "result = None", status: driver.StatusCompleted},
		{name: "result too big", code: "result = 'x' * 5000", maxOutput: 1000, status: driver.StatusCompleted, result: "repr:<result omitted"},
		{name: "main module", code: "import sys\nprint(__name__, sys.argv, '__file__' in globals(), sys.modules['__main__'] is sys.modules[__name__])", status: driver.StatusCompleted, stdout: "__main__ ['-c'] False True\n"},
		{name: "exception", code: "x = 1\nraise ValueError('boom')", status: driver.StatusFailed, exit: 1,
			errType: "ValueError", errMessage: "boom", tbHas: `File "<run>", line 2, in <module>`, stderrHas: []string{"ValueError: boom"}},
		{name: "exception keeps result", code: "result = 7\n1/0", status: driver.StatusFailed, exit: 1, result: "7", errType: "ZeroDivisionError", errMessage: "division by zero"},
		{name: "exception traceback shows the line", code: "def f():\n    return {}['k']\nf()", status: driver.StatusFailed, exit: 1, errType: "KeyError", tbHas: "return {}['k']"},
		{name: "syntax error", code: "def (", status: driver.StatusFailed, exit: 1, errType: "SyntaxError"},
		{name: "custom exception", code: "class Oops(Exception): pass\nraise Oops('x')", status: driver.StatusFailed, exit: 1, errType: "Oops", errMessage: "x"},
		{name: "sys.exit(0)", code: "import sys\nprint('a')\nsys.exit(0)", status: driver.StatusCompleted, stdout: "a\n"},
		{name: "sys.exit(3)", code: "import sys\nsys.exit(3)", status: driver.StatusFailed, exit: 3},
		{name: "SystemExit message", code: "raise SystemExit('bye')", status: driver.StatusFailed, exit: 1, stderrHas: []string{"bye"}},
		// CPython ends by SIGINT after an uncaught KeyboardInterrupt (where there are signals).
		{name: "KeyboardInterrupt", code: "raise KeyboardInterrupt", status: driver.StatusFailed, exit: 130, signal: int(syscall.SIGINT), errType: "KeyboardInterrupt"},
		{name: "os._exit", code: "import os\nprint('a', flush=True)\nos._exit(5)", status: driver.StatusFailed, exit: 5, stdout: "a\n"},
		{name: "killed by a signal", signals: true, code: "import os, signal\ndef crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\ncrash()",
			status: driver.StatusFailed, exit: 128 + int(syscall.SIGSEGV), signal: int(syscall.SIGSEGV), stderrHas: []string{"Segmentation fault", "crash"}},
		{name: "env", code: "import os\nprint(os.environ['FOO'], os.environ['HOME'])", env: map[string]string{"FOO": "bar"}, status: driver.StatusCompleted, stdout: "bar /tmp\n"},
		{name: "env is the run's own", code: "import os\nprint('FOO' in os.environ, os.environ['HOME'])", status: driver.StatusCompleted, stdout: "False /tmp\n"},
		{name: "env replaces a default", code: "import os\nprint(os.environ['HOME'])", env: map[string]string{"HOME": "/elsewhere"}, status: driver.StatusCompleted, stdout: "/elsewhere\n"},
		{name: "env back to the defaults", code: "import os\nprint(os.environ['HOME'])", status: driver.StatusCompleted, stdout: "/tmp\n"},
		{name: "stdin is empty", code: "import sys\nprint(repr(sys.stdin.read()))", status: driver.StatusCompleted, stdout: "''\n"},
		{name: "cwd is the run's work dir", code: "import os\nprint(os.getcwd())", status: driver.StatusCompleted, stdout: pyrunner.WorkDir + "\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.signals && !h.Signals {
				t.Skip("runs of the driver cannot end by a signal")
			}
			maxOut := tc.maxOutput
			if maxOut == 0 {
				maxOut = 1 << 20
			}
			var streamed bytes.Buffer
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: tc.code, Env: tc.env, Timeout: time.Minute, MaxOutput: maxOut,
				OnOutput: func(s driver.Stream, p []byte) {
					if s == driver.Stdout {
						streamed.Write(p)
					}
				}})
			if err != nil {
				t.Fatal(err)
			}
			signal := tc.signal
			if !h.Signals {
				signal = 0
			}
			if res.Status != tc.status || res.ExitCode != tc.exit || res.Signal != signal {
				t.Fatalf("status %s exit %d signal %d, want %s %d %d\nstdout: %s\nstderr: %s", res.Status, res.ExitCode, res.Signal, tc.status, tc.exit, signal, res.Stdout, res.Stderr)
			}
			if tc.stdout != "" && string(res.Stdout) != tc.stdout {
				t.Errorf("stdout %q, want %q", res.Stdout, tc.stdout)
			}
			if streamed.String() != string(res.Stdout) {
				t.Errorf("OnOutput saw %q of stdout %q", streamed.Bytes(), res.Stdout)
			}
			for _, s := range tc.stderrHas {
				if !strings.Contains(string(res.Stderr), s) {
					t.Errorf("stderr %q, want it to hold %q", res.Stderr, s)
				}
			}
			if res.Started.IsZero() || res.Duration <= 0 {
				t.Errorf("started %v, duration %v", res.Started, res.Duration)
			}
			checkResult(t, res.Result, tc.result)
			if tc.errType == "" {
				if res.Error != nil {
					t.Errorf("error %+v, want none", res.Error)
				}
				return
			}
			if res.Error == nil {
				t.Fatalf("no error, want %s (stderr %s)", tc.errType, res.Stderr)
			}
			if res.Error.Type != tc.errType || (tc.errMessage != "" && res.Error.Message != tc.errMessage) || !strings.Contains(res.Error.Traceback, tc.tbHas) {
				t.Errorf("error %+v, want type %s message %q traceback with %q", res.Error, tc.errType, tc.errMessage, tc.tbHas)
			}
			if strings.Contains(res.Error.Traceback, "sandbox-runner") {
				t.Errorf("the runner's own frames leak into the traceback: %s", res.Error.Traceback)
			}
		})
	}
}

// checkResult compares a run's result with want: JSON (compared as values), "" for none, or
// "repr:" and the start of a JSON string's value.
func checkResult(t *testing.T, got json.RawMessage, want string) {
	t.Helper()
	switch {
	case strings.HasPrefix(want, "repr:"):
		var s string
		if err := json.Unmarshal(got, &s); err != nil || !strings.HasPrefix(s, strings.TrimPrefix(want, "repr:")) {
			t.Errorf("result %s, want a JSON string starting %q", got, strings.TrimPrefix(want, "repr:"))
		}
	case want == "":
		if got != nil {
			t.Errorf("result %s, want none", got)
		}
	default:
		var g, w any
		if err := json.Unmarshal(got, &g); err != nil {
			t.Fatalf("result %q: %v", got, err)
		}
		if err := json.Unmarshal([]byte(want), &w); err != nil {
			t.Fatal(err)
		}
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		if !bytes.Equal(gb, wb) {
			t.Errorf("result %s, want %s", got, want)
		}
	}
}

// Runs that go on until they are killed, busy or asleep, after printing "start".
var endless = []struct{ name, code string }{
	{"busy", "print('start', flush=True)\nwhile True:\n    pass"},
	{"asleep", "import time\nprint('start', flush=True)\ntime.sleep(3600)"},
}

// testTimeout: a run past its timeout is killed, ends "timeout" with its output kept, and leaves
// nothing running; the sandbox's next run works.
func testTimeout(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	for _, tc := range endless {
		t.Run(tc.name, func(t *testing.T) {
			// 3 s: time enough for the code to reach its print on a loaded host (at 1 s a host at
			// load 20 killed some runs before their first line).
			res := Exec(t, d, id, tc.code, 3*time.Second)
			if res.Status != driver.StatusTimeout || res.ExitCode != 128+int(syscall.SIGKILL) {
				t.Errorf("status %s exit %d, want timeout %d", res.Status, res.ExitCode, 128+int(syscall.SIGKILL))
			}
			if string(res.Stdout) != "start\n" {
				t.Errorf("stdout %q, want the output before the kill", res.Stdout)
			}
			h.idle(t, d, id)
			if out := MustExec(t, d, id, "print(2)"); out != "2\n" {
				t.Errorf("next run: %q", out)
			}
		})
	}
}

// testCancel: a run whose ctx is cancelled (here once it has printed) is killed, ends
// "cancelled" and leaves nothing running; the sandbox's next run works.
func testCancel(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	for _, tc := range endless {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			res, err := d.Exec(ctx, id, driver.ExecRequest{Code: tc.code, Timeout: 10 * time.Minute, MaxOutput: 1 << 20,
				OnOutput: func(driver.Stream, []byte) { cancel() }})
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != driver.StatusCancelled || res.ExitCode != 128+int(syscall.SIGKILL) {
				t.Errorf("status %s exit %d, want cancelled %d", res.Status, res.ExitCode, 128+int(syscall.SIGKILL))
			}
			h.idle(t, d, id)
			if out := MustExec(t, d, id, "print(2)"); out != "2\n" {
				t.Errorf("next run: %q", out)
			}
		})
	}
}

// testOOM: a run that takes memory without end ends "oom", its peak within the limit; the
// sandbox's next run works. A MemoryError the limit did not cause is an ordinary failure.
func testOOM(t *testing.T, h Harness, d driver.Driver) {
	spec := h.Spec(t)
	id := h.Sandbox(t, d, spec)
	if res := Exec(t, d, id, "raise MemoryError('not the limit')", time.Minute); res.Status != driver.StatusFailed || res.Error == nil || res.Error.Type != "MemoryError" {
		t.Fatalf("a MemoryError of the code's own: status %s error %+v, want failed with MemoryError", res.Status, res.Error)
	}
	res := Exec(t, d, id, "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))", time.Minute)
	if res.Status != driver.StatusOOM {
		t.Fatalf("status %s exit %d stderr %q, want oom", res.Status, res.ExitCode, res.Stderr)
	}
	// A container's peak is the run's maximum RSS, which also counts the file pages it maps (the
	// interpreter, its libraries), some of them charged to another cgroup: it may pass the limit
	// by those.
	const mapped = 16 << 20
	if res.MemoryPeak > spec.MemoryBytes+mapped {
		t.Errorf("memory peak %d KiB over the limit of %d MiB", res.MemoryPeak>>10, spec.MemoryBytes>>20)
	}
	if h.OOMMayEndSandbox {
		res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(2)", Timeout: 30 * time.Second, MaxOutput: 1 << 10})
		if err != nil {
			t.Logf("the OOM ended the sandbox: the next run: %v", err)
			return
		}
		if string(res.Stdout) != "2\n" {
			t.Errorf("next run: %s %q", res.Status, res.Stdout)
		}
	}
	h.idle(t, d, id)
	if out := MustExec(t, d, id, "print(2)"); out != "2\n" {
		t.Errorf("next run: %q", out)
	}
}

// testOutputLimits: each stream keeps MaxOutput bytes, flags what it drops, and OnOutput gets at
// most what is kept.
func testOutputLimits(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	const limit = 4096
	for _, tc := range []struct {
		name             string
		stdout, stderr   int // bytes written
		keptOut, keptErr int
		truncOut         bool
	}{
		{"within", 10, 20, 10, 20, false},
		{"at the limit", limit, 0, limit, 0, false},
		{"past the limit", 200000, 10, limit, 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var streamed [2]bytes.Buffer
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{
				Code:    fmt.Sprintf("import sys\nsys.stdout.write('x' * %d)\nsys.stderr.write('y' * %d)", tc.stdout, tc.stderr),
				Timeout: time.Minute, MaxOutput: limit,
				OnOutput: func(s driver.Stream, p []byte) {
					if s == driver.Stdout {
						streamed[0].Write(p)
					} else {
						streamed[1].Write(p)
					}
				}})
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != driver.StatusCompleted {
				t.Fatalf("status %s, stderr %q", res.Status, res.Stderr)
			}
			if string(res.Stdout) != strings.Repeat("x", tc.keptOut) || res.StdoutTruncated != tc.truncOut {
				t.Errorf("stdout %d bytes, truncated %v; want %d, %v", len(res.Stdout), res.StdoutTruncated, tc.keptOut, tc.truncOut)
			}
			if string(res.Stderr) != strings.Repeat("y", tc.keptErr) || res.StderrTruncated {
				t.Errorf("stderr %d bytes, truncated %v; want %d, false", len(res.Stderr), res.StderrTruncated, tc.keptErr)
			}
			for i, kept := range [][]byte{res.Stdout, res.Stderr} {
				if s := streamed[i].Bytes(); len(s) > limit || !bytes.HasPrefix(kept, s) {
					t.Errorf("OnOutput got %d bytes of stream %d, want at most the %d kept", len(s), i, len(kept))
				}
			}
		})
	}
}

// testStreaming: output reaches OnOutput while the run goes on — the run waits for a file the
// test makes when it sees the run's first line.
func testStreaming(t *testing.T, h Harness, d driver.Driver) {
	dir := HostDir(t)
	spec := h.Spec(t)
	spec.Mounts = []driver.Mount{{Path: "/workspace/signal", HostDir: dir}}
	filer, _ := d.(driver.Filer)
	if filer != nil && h.NoHostDirs != "" {
		spec.Mounts[0].HostDir = ""
	}
	id := h.Sandbox(t, d, spec)
	signal := func() error { return os.WriteFile(filepath.Join(dir, "go"), nil, 0o644) }
	if spec.Mounts[0].HostDir == "" {
		signal = func() error {
			_, _, err := filer.WriteFile(context.Background(), id, "/workspace/signal", "go", strings.NewReader(""), 1)
			return err
		}
	}
	var once sync.Once
	var mu sync.Mutex
	var streamed []byte
	res, err := d.Exec(context.Background(), id, driver.ExecRequest{
		Code:    "import os, time\nprint('early', flush=True)\nwhile not os.path.exists('/workspace/signal/go'):\n    time.sleep(0.01)\nprint('late')",
		Timeout: time.Minute, MaxOutput: 1 << 20,
		OnOutput: func(s driver.Stream, p []byte) {
			mu.Lock()
			defer mu.Unlock()
			streamed = append(streamed, p...)
			if bytes.Contains(streamed, []byte("early\n")) {
				once.Do(func() {
					if err := signal(); err != nil {
						t.Error(err)
					}
				})
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != driver.StatusCompleted || string(res.Stdout) != "early\nlate\n" {
		t.Fatalf("status %s, stdout %q (a timeout: the first line was not streamed while the run went on)", res.Status, res.Stdout)
	}
}

// PathProbe is Python that tries operations — attempt(name, f) — and collects in `result` what
// each gave: {name: "ok" | "ok <what f returned>" | errno name}. read(p, **kw) returns up to
// 64 KiB of a file, write(p, data="x", **kw) creates or truncates one; both take os.open's
// dir_fd.
const PathProbe = `
import errno, os
out = {}
def attempt(name, f):
    try:
        r = f()
        out[name] = "ok" if r is None else "ok " + str(r)
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def read(p, **kw):
    fd = os.open(p, os.O_RDONLY, **kw)
    try:
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)
def write(p, data="x", **kw):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, **kw)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
result = out
`

// testPaths: the path rules. A read_only mount is readable, not writable; a read_write one is
// writable and the host sees what the sandbox wrote, as the sandbox's user; the image is not
// writable; a blocked path is inaccessible whether a mount or the image holds it; a mount
// reaches nothing of the host outside its directory; /tmp and read_write mounts persist between
// runs, nothing else does.
func testPaths(t *testing.T, h Harness, d driver.Driver) {
	host := HostDir(t)
	ro, rw, hidden, outside := filepath.Join(host, "ro"), filepath.Join(host, "rw"), filepath.Join(host, "hidden"), filepath.Join(host, "outside")
	for p, content := range map[string]string{
		ro + "/in.txt": "input", ro + "/secret/key.txt": "key", hidden + "/h.txt": "hidden", outside + "/secret.txt": "host-secret",
	} {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(rw, 0o755); err != nil {
		t.Fatal(err)
	}
	// Symlinks the host finds in a mount lead nowhere outside it.
	if err := os.Symlink(outside+"/secret.txt", rw+"/abs-link"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../outside/secret.txt", rw+"/rel-link"); err != nil {
		t.Fatal(err)
	}
	spec := h.Spec(t)
	spec.Mounts = []driver.Mount{
		{Path: "/workspace/data", HostDir: ro, ReadOnly: true},
		{Path: "/workspace/output", HostDir: rw},
		{Path: "/workspace/hidden", HostDir: hidden},
	}
	spec.Blocked = []string{"/workspace/data/secret", "/workspace/hidden", h.ImageFile}
	filer, _ := d.(driver.Filer)
	viaFiler := filer != nil && h.NoHostDirs != "" // the files go through the driver, not host dirs
	if viaFiler {
		for i := range spec.Mounts {
			spec.Mounts[i].HostDir = ""
		}
	}
	id := h.Sandbox(t, d, spec)
	if viaFiler {
		for _, f := range []struct{ mount, rel, content string }{
			{"/workspace/data", "in.txt", "input"}, {"/workspace/data", "secret/key.txt", "key"}, {"/workspace/hidden", "h.txt", "hidden"},
		} {
			if _, _, err := filer.WriteFile(context.Background(), id, f.mount, f.rel, strings.NewReader(f.content), 1<<10); err != nil {
				t.Fatal(err)
			}
		}
	}
	res := Exec(t, d, id, PathProbe+fmt.Sprintf(`
x = 1
image_file, outside = %q, %q
attempt("ro read", lambda: read("/workspace/data/in.txt"))
attempt("ro list", lambda: os.listdir("/workspace/data") and None)
attempt("ro write new", lambda: write("/workspace/data/new.txt"))
attempt("ro overwrite", lambda: write("/workspace/data/in.txt"))
attempt("ro mkdir", lambda: os.mkdir("/workspace/data/d"))
attempt("ro unlink", lambda: os.unlink("/workspace/data/in.txt"))
attempt("rw write", lambda: write("/workspace/output/out.txt", "result"))
attempt("rw read", lambda: read("/workspace/output/out.txt"))
attempt("rw mkdir", lambda: os.mkdir("/workspace/output/sub"))
attempt("blocked in a mount: list", lambda: os.listdir("/workspace/data/secret"))
attempt("blocked in a mount: read", lambda: read("/workspace/data/secret/key.txt"))
attempt("blocked in a mount: mkdir", lambda: os.mkdir("/workspace/data/secret/d"))
attempt("blocked mount: read", lambda: read("/workspace/hidden/h.txt"))
attempt("blocked mount: write", lambda: write("/workspace/hidden/new.txt"))
attempt("blocked image file: read", lambda: read(image_file))
attempt("blocked image file: write", lambda: write(image_file))
attempt("image write", lambda: write(os.path.dirname(image_file) + "/new.txt"))
attempt("dotdot out of a mount", lambda: read("/workspace/output/../.." + outside + "/secret.txt"))
attempt("dotdot out of /tmp", lambda: read("/tmp/../.." + outside + "/secret.txt"))
attempt("host's absolute symlink", lambda: read("/workspace/output/abs-link"))
attempt("host's relative symlink", lambda: read("/workspace/output/rel-link"))
attempt("tmp write", lambda: write("/tmp/persist.txt", "kept"))
`, h.ImageFile, outside), time.Minute)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("status %s: %s", res.Status, res.Stderr)
	}
	var got map[string]string
	if err := json.Unmarshal(res.Result, &got); err != nil {
		t.Fatalf("result %s: %v", res.Result, err)
	}
	refused := []string{"ro write new", "ro overwrite", "ro mkdir", "ro unlink",
		"blocked in a mount: list", "blocked in a mount: read", "blocked in a mount: mkdir", "blocked mount: read", "blocked mount: write",
		"blocked image file: read", "blocked image file: write", "image write",
		"dotdot out of a mount", "dotdot out of /tmp", "host's absolute symlink", "host's relative symlink"}
	want := map[string]string{"ro read": "ok input", "ro list": "ok", "rw write": "ok", "rw read": "ok result", "rw mkdir": "ok", "tmp write": "ok"}
	for _, name := range refused {
		want[name] = "refused"
	}
	for name, w := range want {
		g, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: not reported", name)
		case w == "refused":
			if strings.HasPrefix(g, "ok") {
				t.Errorf("%s: %s, want it refused", name, g)
			}
		case g != w:
			t.Errorf("%s: %s, want %s", name, g, w)
		}
	}
	if viaFiler {
		checkFiler(t, filer, id)
	} else {
		checkHostSide(t, spec, rw, ro, hidden, outside)
	}
	// What persists between runs.
	if out := MustExec(t, d, id, "print('x' in globals(), open('/tmp/persist.txt').read(), open('/workspace/output/out.txt').read())"); out != "False kept result\n" {
		t.Errorf("the next run sees %q, want \"False kept result\\n\"", out)
	}
}

// checkFiler is testPaths's check of what a run left, through the driver's Filer.
func checkFiler(t *testing.T, filer driver.Filer, id string) {
	t.Helper()
	for _, f := range []struct{ mount, rel, content string }{
		{"/workspace/output", "out.txt", "result"}, {"/workspace/data", "in.txt", "input"}, {"/workspace/hidden", "h.txt", "hidden"},
		{"/workspace/data", "new.txt", ""}, {"/workspace/hidden", "new.txt", ""},
	} {
		file, _, err := filer.OpenFile(context.Background(), id, f.mount, f.rel)
		if f.content == "" {
			if !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s/%s: %v, want none", f.mount, f.rel, err)
			}
			if err == nil {
				file.Close()
			}
			continue
		}
		if err != nil {
			t.Errorf("%s/%s: %v", f.mount, f.rel, err)
			continue
		}
		b, err := io.ReadAll(file)
		file.Close()
		if err != nil || string(b) != f.content {
			t.Errorf("%s/%s: %q, %v; want %q", f.mount, f.rel, b, err, f.content)
		}
	}
}

// checkHostSide is testPaths's check of what a run left, in the host directories.
func checkHostSide(t *testing.T, spec driver.Spec, rw, ro, hidden, outside string) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(rw+"/out.txt", &st); err != nil {
		t.Errorf("read_write file on the host: %v", err)
	} else if st.Uid != spec.HostIDs+driver.SandboxUser {
		t.Errorf("read_write file's owner %d, want the sandbox's user %d", st.Uid, spec.HostIDs+driver.SandboxUser)
	}
	for p, content := range map[string]string{rw + "/out.txt": "result", ro + "/in.txt": "input", hidden + "/h.txt": "hidden", outside + "/secret.txt": "host-secret"} {
		if b, err := os.ReadFile(p); err != nil || string(b) != content {
			t.Errorf("%s on the host: %q, %v; want %q", p, b, err, content)
		}
	}
	for _, p := range []string{ro + "/new.txt", hidden + "/new.txt"} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s on the host: %v, want none", p, err)
		}
	}
}

// testTmpSize: /tmp holds what its disk holds; past it writes fail.
func testTmpSize(t *testing.T, h Harness, d driver.Driver) {
	spec := h.Spec(t)
	if _, filer := d.(driver.Filer); filer && h.NoHostDirs != "" {
		spec.DiskBytes = 16 << 20 // what holds its /tmp
	} else {
		spec.TmpDir = filepath.Join(Disk(t, 16<<20), "tmp")
		if err := os.Mkdir(spec.TmpDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	id := h.Sandbox(t, d, spec)
	out := MustExec(t, d, id, `
import errno
try:
    with open("/tmp/big", "wb") as f:
        for i in range(64):
            f.write(b"x" * (1 << 19))
            f.flush()
    print("wrote it all")
except OSError as e:
    print("refused", errno.errorcode.get(e.errno))
`)
	// ENOSPC; EIO from a WASI layer without ENOSPC (wazero's).
	if out != "refused ENOSPC\n" && out != "refused EIO\n" {
		t.Errorf("writing 32 MiB to a 16 MiB disk's /tmp: %q", out)
	}
}

// testRunsStartClean: what a run leaves in its working directory is gone at the next run, and
// neither it, nor /tmp, nor any writable directory is on the import path.
func testRunsStartClean(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	out := MustExec(t, d, id, `
import os
for p in ("csv.py", "/tmp/csv.py"):
    open(p, "w").write("raise SystemExit('poisoned')")
os.mkdir("sub"); open("sub/x", "w").write("x")
print(os.getcwd())
`)
	if out != pyrunner.WorkDir+"\n" {
		t.Errorf("working directory %q, want %s", out, pyrunner.WorkDir)
	}
	out = MustExec(t, d, id, `
import os, sys, csv
def writable(p):
    try:
        open(os.path.join(p, ".w"), "w").close()
        os.unlink(os.path.join(p, ".w"))
        return True
    except OSError:
        return False
print(sorted(os.listdir(".")), [p for p in sys.path if p in ("", ".", "/tmp") or p.startswith(("/tmp/", "`+pyrunner.WorkDir+`"))],
      [p for p in sys.path if os.path.isdir(p) and writable(p)], os.path.exists("/tmp/csv.py"))
`)
	if out != "[] [] [] True\n" {
		t.Errorf("second run sees: %s", out)
	}
}

// testSpawn: run code starts processes only where the spec allows it and the driver can; threads
// where the driver can, whatever the spec.
func testSpawn(t *testing.T, h Harness, d driver.Driver) {
	for _, allow := range []bool{false, true} {
		t.Run(fmt.Sprintf("allow_spawn=%v", allow), func(t *testing.T) {
			spec := h.Spec(t)
			spec.AllowSpawn = allow
			id := h.Sandbox(t, d, spec)
			out := MustExec(t, d, id, `
try:
    import subprocess
    subprocess.run(["true"], check=True)
    print("spawn ok")
except Exception:
    print("spawn refused")
try:
    import threading
    r = []
    th = threading.Thread(target=lambda: r.append(1))
    th.start()
    th.join()
    print("threads", len(r))
except Exception:
    print("threads refused")
`)
			want := "spawn refused\nthreads refused\n"
			switch {
			case h.Spawn && allow:
				want = "spawn ok\nthreads 1\n"
			case h.Spawn:
				want = "spawn refused\nthreads 1\n"
			}
			if out != want {
				t.Errorf("%q, want %q", out, want)
			}
		})
	}
}
