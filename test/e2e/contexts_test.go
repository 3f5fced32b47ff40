package e2e

import (
	"bufio"
	"fmt"
	"strings"
	"testing"
)

// contextStep is one run of a code contexts test.
type contextStep struct {
	name    string
	ctx     string // the context; "" a fresh run
	code    string
	timeout int
	status  string
	result  any    // nil: not checked
	reset   string // a substring of context_reset.reason; "" none
}

// contextsAPI is one sandbox's code contexts over HTTP, as key.
type contextsAPI struct {
	t       *testing.T
	s       *server
	key, id string
}

func (c contextsAPI) create() string {
	c.t.Helper()
	status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/contexts", c.key, nil)
	if status != 201 || m["status"] != "ready" {
		c.t.Fatalf("create context: %d %v", status, m)
	}
	return m["context_id"].(string)
}

// run runs code in context ctx ("" a fresh run); the request must succeed.
func (c contextsAPI) run(ctx, code string, timeout int) map[string]any {
	c.t.Helper()
	body := map[string]any{"code": code, "timeout": timeout}
	if ctx != "" {
		body["context"] = ctx
	}
	status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/run", c.key, body)
	if status != 200 {
		c.t.Fatalf("run %q: %d %v", code, status, m)
	}
	return m
}

// steps runs the steps in order and checks each one's status, result and context_reset (with its
// stderr line).
func (c contextsAPI) steps(steps []contextStep) {
	t := c.t
	for _, st := range steps {
		m := c.run(st.ctx, st.code, st.timeout)
		if m["status"] != st.status {
			t.Errorf("%s: status %v, want %s (%v)", st.name, m["status"], st.status, m)
			continue
		}
		if st.result != nil && fmt.Sprint(m["result"]) != fmt.Sprint(st.result) {
			t.Errorf("%s: result %v, want %v (stderr %q)", st.name, m["result"], st.result, m["stderr"])
		}
		r, _ := m["context_reset"].(map[string]any)
		switch {
		case st.reset == "" && r != nil:
			t.Errorf("%s: context_reset %v", st.name, r)
		case st.reset != "" && (r == nil || !strings.Contains(fmt.Sprint(r["reason"]), st.reset)):
			t.Errorf("%s: context_reset %v, want a reason with %q", st.name, r, st.reset)
		case st.reset != "" && !strings.HasPrefix(fmt.Sprint(m["stderr"]), "[sandboxd] this context's interpreter was reset"):
			t.Errorf("%s: stderr %q", st.name, m["stderr"])
		}
		if st.ctx != "" && m["context"] != st.ctx {
			t.Errorf("%s: context %v", st.name, m["context"])
		}
	}
}

// cancelKeepsState cancels a run of context ctx while its code runs (its first output seen on the
// event stream): the code is interrupted, and the context keeps its state, as at a timeout.
func (c contextsAPI) cancelKeepsState(ctx string) {
	t := c.t
	c.run(ctx, "kept = 'yes'", 30)
	status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/run", c.key, map[string]any{"context": ctx, "async": true, "timeout": 120,
		"code": "import time\nprint('go', flush=True)\nwhile True:\n    time.sleep(0.05)"})
	if status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	runID := m["run_id"].(string)
	resp := c.s.raw("GET", "/api/sandbox/"+c.id+"/runs/"+runID+"/events", c.key, nil)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() && sc.Text() != "event: stdout" {
	}
	resp.Body.Close()
	if status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/runs/"+runID+"/cancel", c.key, nil); status != 200 || m["status"] != "cancelled" {
		t.Fatalf("cancel: %d %v", status, m)
	}
	r := c.run(ctx, "result = kept", 30)
	if r["result"] != "yes" || r["context_reset"] != nil {
		t.Errorf("after a cancel: %v", r)
	}
}

// limitAndDelete fills the sandbox (which has two contexts) up to the limit, checks the 9th is
// refused, deletes context del twice and checks a run in it is 404.
func (c contextsAPI) limitAndDelete(del string) {
	t := c.t
	for i := 2; i < 8; i++ {
		c.create()
	}
	if status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/contexts", c.key, nil); status != 409 || m["error"] != "context_limit" {
		t.Fatalf("9th context: %d %v", status, m)
	}
	for i := 0; i < 2; i++ {
		if status, _ := c.s.do("DELETE", "/api/sandbox/"+c.id+"/contexts/"+del, c.key, nil); status != 204 {
			t.Fatalf("delete context: %d", status)
		}
	}
	if status, m := c.s.do("POST", "/api/sandbox/"+c.id+"/run", c.key, map[string]any{"code": "1", "context": del}); status != 404 {
		t.Fatalf("run in a deleted context: %d %v", status, m)
	}
}

// TestContexts drives code contexts over HTTP with the real container driver: state across runs,
// a timeout that keeps it, resets (os._exit, the memory limit) that the next run reports, what
// fresh runs and other contexts see, leftovers of a context's run, the limit, delete.
func TestContexts(t *testing.T) {
	s := sharedServer(t)
	pro := s.newKey("e2e-contexts", "pro")
	id := s.create(pro, map[string]any{"resources": map[string]any{"memory": "128m"}, "process": map[string]any{"allow_spawn": true}})
	c := contextsAPI{t: t, s: s, key: pro, id: id}
	a, b := c.create(), c.create()
	// os.getppid() 0: forked by the zygote (outside the sandbox's PID namespace), no fork per run;
	// in a pod (no zygote) the agent, PID 1, launched it.
	ppid := float64(0)
	if onKubernetes {
		ppid = 1
	}
	c.steps([]contextStep{
		{"load", a, "import os\nrows = [1, 2, 3]\nf = open('notes.txt', 'w')\nresult = [os.getcwd().startswith('/tmp/'), os.getppid()]", 30, "completed", []any{true, ppid}, ""},
		{"use", a, "ppid0 = os.getpid()\nrows.append(4)\nf.write('x')\nf.flush()\nresult = sum(rows)", 30, "completed", float64(10), ""},
		{"use again", a, "result = [len(rows), open('notes.txt').read(), os.getpid() == ppid0]", 30, "completed", []any{float64(4), "x", true}, ""},
		{"fresh run sees nothing", "", "result = 'rows' in globals()", 30, "completed", false, ""},
		{"other context sees nothing", b, "result = 'rows' in globals()", 30, "completed", false, ""},
		{"timeout interrupts", a, "while True: pass", 1, "timeout", nil, ""},
		{"state after the timeout", a, "result = sum(rows)", 30, "completed", float64(10), ""},
		{"leftover child", a, "import subprocess\np = subprocess.Popen(['sleep', '100'])\nresult = p.pid", 30, "completed", nil, ""},
		{"leftover killed", a, "import time\nfor _ in range(200):\n    if p.poll() is not None: break\n    time.sleep(0.01)\nresult = p.poll() is not None", 30, "completed", true, ""},
		{"os._exit", a, "import os\nos._exit(3)", 30, "failed", nil, ""},
		{"reset reported", a, "result = 'rows' in globals()", 30, "completed", false, "status 3"},
		{"after the reset", a, "rows = [5]\nresult = 1", 30, "completed", float64(1), ""},
		{"memory limit", a, "b = bytearray(512 << 20)", 30, "oom", nil, ""},
		{"reset after oom", a, "result = 'rows' in globals()", 30, "completed", false, "killed"},
		{"other context untouched", b, "result = 1", 30, "completed", float64(1), ""},
	})
	c.cancelKeepsState(b)
	c.limitAndDelete(b)
	// Fresh runs are as before: only the agent and the run itself in the sandbox besides the contexts.
	r := c.run("", "import os\nresult = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())", 30)
	if l, _ := r["result"].([]any); len(l) != 2+7 { // the agent, this run, 7 live contexts
		t.Errorf("processes in the sandbox: %v", r["result"])
	}
}

// TestContextsWasm drives code contexts in a WASM sandbox over HTTP: state across runs, what
// fresh runs and other contexts see, a crash that resets one context, a timeout that resets every
// context of the sandbox (its worker is killed: WASI has no signals) and the reports of it, the
// run's own agent object, the limit, delete.
func TestContextsWasm(t *testing.T) {
	hostOnly(t, "WASM sandboxes run in the service's own process")
	tn := startTenants(t)
	tn.forModes(t, func(t *testing.T, mode string) {
		if mode != "wasm" {
			return
		}
		c := contextsAPI{t: t, s: tn.s, key: tn.victim, id: tn.sandbox(tn.victim, mode, nil)}
		id := c.id
		a, b := c.create(), c.create()
		const crash = "import sys\nsys.setrecursionlimit(10**7)\ndef g(n):\n    return sum(map(g, [n + 1]))\ng(0)"
		c.steps([]contextStep{
			{"load", a, "import os, json\nrows = [1, 2, 3]\nf = open('notes.txt', 'w')\nresult = os.getcwd()", 30, "completed", "/tmp/.context-" + a, ""},
			{"use", a, "rows.append(4)\nf.write('x')\nf.flush()\nresult = sum(rows)", 30, "completed", float64(10), ""},
			{"use again", a, "result = [len(rows), open('notes.txt').read(), json.dumps(1)]", 30, "completed", []any{float64(4), "x", "1"}, ""},
			{"fresh run sees nothing", "", "result = 'rows' in globals()", 30, "completed", false, ""},
			{"other context sees nothing", b, "rows = 'b'\nresult = 'f' in globals()", 30, "completed", false, ""},
			{"agent object", a, "result = [agent.id, agent.sandbox_id == " + fmt.Sprintf("%q", id) + "]", 30, "completed", []any{"adversary", true}, ""},
			{"crash resets b", b, crash, 60, "failed", nil, ""},
			{"b's reset reported", b, "result = 'rows' in globals()", 30, "completed", false, "crashed"},
			{"a untouched", a, "result = sum(rows)", 30, "completed", float64(10), ""},
			{"timeout", a, "while True: pass", 1, "timeout", nil, ""},
			{"a's reset reported", a, "result = 'rows' in globals()", 30, "completed", false, "timeout"},
			{"b's reset reported too", b, "result = 'rows' in globals()", 30, "completed", false, "every code context"},
			{"a again", a, "rows = [5]", 30, "completed", nil, ""},
			{"a keeps it", a, "result = rows", 30, "completed", []any{float64(5)}, ""},
		})
		c.limitAndDelete(b)
		m := c.run("", "import os\nresult = sorted(n for n in os.listdir('/tmp') if n.startswith('.context-'))", 30)
		if strings.Contains(fmt.Sprint(m["result"]), b) || !strings.Contains(fmt.Sprint(m["result"]), a) {
			t.Errorf("context directories after deleting %s: %v", b, m["result"])
		}
	})
}

// attackIdle is a context run's attack on the sandbox's other processes: for every process but
// the agent and itself, it opens /proc/<pid>/mem for writing and tries process_vm_writev (at an
// unmapped address: EFAULT if allowed, EPERM if not). The result maps each PID to what happened.
const attackIdle = `import os, ctypes
libc = ctypes.CDLL(None, use_errno=True)
class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local, remote = Iov(ctypes.addressof(buf), 8), Iov(8, 8)
result = {}
for p in sorted(int(d) for d in os.listdir('/proc') if d.isdigit()):
    if p in (1, os.getpid()):
        continue
    try:
        open('/proc/%d/mem' % p, 'r+b').close()
        mem = 'opened'
    except PermissionError:
        mem = 'denied'
    except OSError as e:
        mem = 'error %d' % e.errno
    n = libc.process_vm_writev(p, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    result[str(p)] = [mem, 'denied' if n < 0 and ctypes.get_errno() == 1 else 'errno %d' % ctypes.get_errno()]
`

// TestContextsCannotTouchIdleProcesses: a context's run cannot write into the memory of the
// processes that are idle while it runs — the next fresh run's standby and the other contexts'
// interpreters (same uid; they are not dumpable until their own run) — and both still work after.
func TestContextsCannotTouchIdleProcesses(t *testing.T) {
	s := sharedServer(t)
	pro := s.newKey("e2e-contexts-attack", "pro")
	id := s.create(pro, map[string]any{})
	c := contextsAPI{t: t, s: s, key: pro, id: id}
	a, b := c.create(), c.create()
	bPID := fmt.Sprint(c.run(b, "import os\nsecret = 'kept'\nresult = os.getpid()", 30)["result"])
	c.run("", "result = 1", 30) // the next fresh run's standby is forked once this one has ended
	r := c.run(a, attackIdle, 30)
	got, _ := r["result"].(map[string]any)
	least := 2 // the other context and the standby at least
	if onKubernetes {
		least = 1 // a pod's agent keeps no standby: its runs are launched
	}
	if _, ok := got[bPID]; !ok || len(got) < least {
		t.Fatalf("processes the attack saw: %v (want context b's %s and the standby; stderr %q)", r["result"], bPID, r["stderr"])
	}
	for pid, v := range got {
		if fmt.Sprint(v) != "[denied denied]" {
			t.Errorf("process %s: %v, want its memory denied to another context's run", pid, v)
		}
	}
	c.steps([]contextStep{
		{"the other context is intact", b, "result = secret", 30, "completed", "kept", ""},
		{"a fresh run is intact", "", "result = 6 * 7", 30, "completed", float64(42), ""},
		{"the attacking context goes on", a, "result = len(result)", 30, "completed", nil, ""},
	})
}
