package container

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
)

// TestContexts: code contexts under every runtime — forked by the zygote (crun, runc) or launched
// by the agent (runsc, which has no zygote): state across runs, a timeout that keeps it, a
// leftover child killed while the interpreter lives, a reset, delete.
func TestContexts(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		spec := baseSpec(t)
		spec.AllowSpawn = true
		id := harness.Sandbox(t, d, spec)
		ctx := context.Background()
		if err := d.CreateContext(ctx, id, "ctx_a"); err != nil {
			t.Fatal(err)
		}
		drivertest.ContextSteps(t, d, id, "ctx_a")
		for i := 0; i < 2; i++ {
			if err := d.DeleteContext(ctx, id, "ctx_a"); err != nil {
				t.Fatalf("delete %d: %v", i, err)
			}
		}
		res, err := d.Exec(ctx, id, driver.ExecRequest{Code: "import os\nresult = len([p for p in os.listdir('/proc') if p.isdigit()])", Timeout: 30 * time.Second, MaxOutput: 1 << 20})
		if err != nil || fmt.Sprint(string(res.Result)) != "2" {
			t.Errorf("processes after the context's delete: %s %v (stderr %q)", res.Result, err, res.Stderr)
		}
	})
}

// TestContextSpawn: a context's interpreter runs under the sandbox's allow_spawn like a fresh run.
// Without it, a run cannot make a process (the agent skips its scan of /proc after such a run, so
// this is what that rests on): os.fork, subprocess and posix_spawn fail, threads work. With it, what
// a run starts — a child in a session of its own, a daemon (double fork) — is gone after the run
// while the interpreter lives.
func TestContextSpawn(t *testing.T) {
	const spawn = `import os, subprocess, threading
out = []
for name, f in [("fork", os.fork), ("subprocess", lambda: subprocess.Popen(["sleep", "100"], start_new_session=True).pid),
                ("posix_spawn", lambda: os.posix_spawn("/bin/sleep", ["sleep", "100"], os.environ))]:
    try:
        pid = f()
        if pid == 0:
            os._exit(0)
        if name == "fork":
            os.waitpid(pid, 0)  # under runsc a child that exited unreaped is listed as a straggler (see RATIONALE)
        out.append(pid)
    except PermissionError:
        out.append(name + " refused")
r = []
th = threading.Thread(target=lambda: r.append(1))
th.start(); th.join()
out.append(len(r))
result = out
`
	// A daemon: the child starts a new session, forks a sleep and exits; the sleep is the agent's.
	const daemon = `import os, time
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    p = os.fork()
    if p == 0:
        os.execv("/bin/sleep", ["sleep", "100"])
    os.write(w, b"%d" % p)
    os._exit(0)
os.waitpid(pid, 0)
result = int(os.read(r, 32))
`
	// Whether each of a run's processes still lives: a kept interpreter's unreaped child is a zombie.
	const alive = `import os
def live(p):
    try:
        with open("/proc/%d/stat" % p) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
result = [live(p) for p in pids]
`
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		tests := []struct {
			allow bool
			code  string
			want  string // the first run's result; "pids" where it is the PIDs of the run's processes
		}{
			{false, spawn, `["fork refused","subprocess refused","posix_spawn refused",1]`},
			{true, spawn, "pids"},
			{true, daemon, "pids"},
		}
		for i, tt := range tests {
			t.Run(fmt.Sprintf("%d allow_spawn=%v", i, tt.allow), func(t *testing.T) {
				spec := baseSpec(t)
				spec.AllowSpawn = tt.allow
				id := harness.Sandbox(t, d, spec)
				ctx := context.Background()
				if err := d.CreateContext(ctx, id, "c"); err != nil {
					t.Fatal(err)
				}
				run := func(code string) string {
					t.Helper()
					res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Timeout: 30 * time.Second, MaxOutput: 1 << 20, Context: "c"})
					if err != nil || res.Status != driver.StatusCompleted || res.ContextLost != "" {
						t.Fatalf("%v %s lost %q: stderr %q", err, res.Status, res.ContextLost, res.Stderr)
					}
					return string(res.Result)
				}
				got := run(tt.code)
				if tt.want != "pids" {
					if got != tt.want {
						t.Fatalf("result %s, want %s", got, tt.want)
					}
					return
				}
				// The run's processes are gone after it (its interpreter, which keeps the state, lives).
				after := run("pids = " + got + "\nif isinstance(pids, int): pids = [pids]\npids = [p for p in pids if isinstance(p, int) and p > 1]\n" + alive)
				if after == "[]" || strings.Contains(after, "true") {
					t.Fatalf("the run's processes after it, alive: %s (the run's result: %s)", after, got)
				}
			})
		}
	})
}

// TestContextMemoryPeak: a context run's memory peak is its own, not the interpreter's since it
// started: a run after one that touched 120 MiB reports far less.
func TestContextMemoryPeak(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		id := harness.Sandbox(t, d, baseSpec(t))
		ctx := context.Background()
		if err := d.CreateContext(ctx, id, "ctx_m"); err != nil {
			t.Fatal(err)
		}
		var peaks []int64
		for _, code := range []string{"b = bytearray(120 << 20)\nb[::4096] = b'x' * len(b[::4096])\ndel b", "x = 1"} {
			res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Context: "ctx_m", Timeout: 30 * time.Second, MaxOutput: 1 << 20})
			if err != nil || res.Status != driver.StatusCompleted {
				t.Fatalf("run %q: %v %s %q", code, err, res.Status, res.Stderr)
			}
			peaks = append(peaks, res.MemoryPeak)
		}
		if d.runtimeOfID(id).gvisor() {
			t.Logf("runsc: peaks %d, %d MiB (gVisor's /proc/<pid>/status has no VmHWM: a context run's peak is not known there)", peaks[0]>>20, peaks[1]>>20)
			return
		}
		if peaks[0] < 120<<20 || peaks[1] > peaks[0]-100<<20 {
			t.Fatalf("memory peaks %d, %d MiB: want the first ≥ 120 and the second 100 less", peaks[0]>>20, peaks[1]>>20)
		}
	})
}
