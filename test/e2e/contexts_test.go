package e2e

import (
	"fmt"
	"strings"
	"testing"
)

// TestContexts drives code contexts over HTTP with the real container driver: state across runs,
// a timeout that keeps it, resets (os._exit, the memory limit) that the next run reports, what
// fresh runs and other contexts see, leftovers of a context's run, the limit, delete.
func TestContexts(t *testing.T) {
	s := sharedServer(t)
	pro := s.newKey("e2e-contexts", "pro")
	id := s.create(pro, map[string]any{"resources": map[string]any{"memory": "128m"}, "process": map[string]any{"allow_spawn": true}})
	newCtx := func() string {
		t.Helper()
		status, m := s.do("POST", "/api/sandbox/"+id+"/contexts", pro, nil)
		if status != 201 || m["status"] != "ready" {
			t.Fatalf("create context: %d %v", status, m)
		}
		return m["context_id"].(string)
	}
	a, b := newCtx(), newCtx()
	runIn := func(ctx, code string, timeout int) map[string]any {
		t.Helper()
		body := map[string]any{"code": code, "timeout": timeout}
		if ctx != "" {
			body["context"] = ctx
		}
		status, m := s.do("POST", "/api/sandbox/"+id+"/run", pro, body)
		if status != 200 {
			t.Fatalf("run %q: %d %v", code, status, m)
		}
		return m
	}
	steps := []struct {
		name    string
		ctx     string
		code    string
		timeout int
		status  string
		result  any    // nil: not checked
		reset   string // a substring of context_reset.reason; "" none
	}{
		// os.getppid() 0: forked by the zygote (outside the sandbox's PID namespace), no fork per run.
		{"load", a, "import os\nrows = [1, 2, 3]\nf = open('notes.txt', 'w')\nresult = [os.getcwd().startswith('/tmp/'), os.getppid()]", 30, "completed", []any{true, float64(0)}, ""},
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
	}
	for _, st := range steps {
		m := runIn(st.ctx, st.code, st.timeout)
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
	// The limit, delete, a run in a deleted context.
	for i := 2; i < 8; i++ {
		newCtx()
	}
	if status, m := s.do("POST", "/api/sandbox/"+id+"/contexts", pro, nil); status != 409 || m["error"] != "context_limit" {
		t.Fatalf("9th context: %d %v", status, m)
	}
	for i := 0; i < 2; i++ {
		if status, _ := s.do("DELETE", "/api/sandbox/"+id+"/contexts/"+b, pro, nil); status != 204 {
			t.Fatalf("delete context: %d", status)
		}
	}
	if status, m := s.do("POST", "/api/sandbox/"+id+"/run", pro, map[string]any{"code": "1", "context": b}); status != 404 {
		t.Fatalf("run in a deleted context: %d %v", status, m)
	}
	// Fresh runs are as before: only the agent and the run itself in the sandbox besides the contexts.
	r := runIn("", "import os\nresult = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())", 30)
	if l, _ := r["result"].([]any); len(l) != 2+7 { // the agent, this run, 7 live contexts
		t.Errorf("processes in the sandbox: %v", r["result"])
	}
}

// TestContextsWasmUnsupported: WASM mode has no code contexts yet, and says so.
func TestContextsWasmUnsupported(t *testing.T) {
	tn := startTenants(t)
	tn.forModes(t, func(t *testing.T, mode string) {
		if mode != "wasm" {
			return
		}
		id := tn.sandbox(tn.victim, mode, nil)
		if status, m := tn.s.do("POST", "/api/sandbox/"+id+"/contexts", tn.victim, nil); status != 400 || m["error"] != "unsupported_in_mode" {
			t.Errorf("create a context in a WASM sandbox: %d %v", status, m)
		}
		if status, m := tn.s.do("POST", "/api/sandbox/"+id+"/run", tn.victim, map[string]any{"code": "1", "context": "ctx_abc"}); status != 400 || m["error"] != "unsupported_in_mode" {
			t.Errorf("run in a context in a WASM sandbox: %d %v", status, m)
		}
	})
}
