package wasm

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
)

// TestContexts: code contexts in a WASM sandbox, step by step in one sandbox: state over runs,
// contexts independent of each other and of fresh runs, a crash that resets one context only, a
// timeout that resets every context (the worker is killed) and says so at each one's next run,
// output caps, delete (idempotent; the memory freed, the working directory removed).
func TestContexts(t *testing.T) {
	d, id, _ := pySandbox(t)
	ctx := context.Background()
	for _, name := range []string{"ctx_a", "ctx_b"} {
		if err := d.CreateContext(ctx, id, name); err != nil {
			t.Fatal(err)
		}
	}
	// A crash: the interpreter's C stack overflows (the quickest case of TestPythonStackOverflow).
	const overflow = "import sys\nsys.setrecursionlimit(10**7)\ndef g(n):\n    return sum(map(g, [n + 1]))\ng(0)"
	steps := []struct {
		name, context, code string
		env                 map[string]string
		timeout             time.Duration
		status              driver.Status
		result              string // JSON, "" not checked
		stdout              string // "" not checked
		lost, restarted     string // a substring of ContextLost / ContextRestarted; "" none
	}{
		{name: "define a", context: "ctx_a", code: "import json\nx = 1\nprint('one')\nresult = x", status: driver.StatusCompleted, result: "1", stdout: "one\n"},
		{name: "define b", context: "ctx_b", code: "x = 'b'\nresult = x", status: driver.StatusCompleted, result: `"b"`},
		{name: "a again", context: "ctx_a", code: "x += 1\nresult = [x, 'json' in dir()]", status: driver.StatusCompleted, result: "[2,true]"},
		{name: "a third", context: "ctx_a", code: "x += 1\nimport os\nresult = [x, os.getcwd(), os.environ.get('E')]", env: map[string]string{"E": "e"},
			status: driver.StatusCompleted, result: `[3,"/tmp/.context-ctx_a","e"]`},
		{name: "fresh run sees nothing", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false"},
		{name: "b kept its own", context: "ctx_b", code: "result = x", status: driver.StatusCompleted, result: `"b"`},
		{name: "exception keeps state", context: "ctx_a", code: "y = 5\nraise ValueError('no')", status: driver.StatusFailed},
		{name: "sys.exit keeps state", context: "ctx_a", code: "import sys\nz = y\nsys.exit(3)", status: driver.StatusFailed},
		{name: "after exit", context: "ctx_a", code: "result = [x, y, z]", status: driver.StatusCompleted, result: "[3,5,5]"},
		{name: "crash in b", context: "ctx_b", code: overflow, status: driver.StatusFailed, lost: "crashed"},
		{name: "b fresh", context: "ctx_b", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false", restarted: "crashed"},
		{name: "a survived b's crash", context: "ctx_a", code: "result = x", status: driver.StatusCompleted, result: "3"},
		{name: "os._exit in b", context: "ctx_b", code: "import os\nos._exit(4)", status: driver.StatusFailed, lost: "status 4"},
		{name: "b fresh again", context: "ctx_b", code: "x = 'b2'\nresult = x", status: driver.StatusCompleted, result: `"b2"`, restarted: "status 4"},
		{name: "timeout in a", context: "ctx_a", code: "while True: pass", timeout: 2 * time.Second, status: driver.StatusTimeout, lost: "timeout"},
		{name: "a reset", context: "ctx_a", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false", restarted: "timeout"},
		{name: "b reset too", context: "ctx_b", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false", restarted: "every code context"},
		{name: "a lives again", context: "ctx_a", code: "x = 7", status: driver.StatusCompleted},
		{name: "a keeps it", context: "ctx_a", code: "result = x", status: driver.StatusCompleted, result: "7"},
		{name: "fresh timeout resets a", code: "while True: pass", timeout: 2 * time.Second, status: driver.StatusTimeout},
		{name: "a reset by it", context: "ctx_a", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false", restarted: "timeout"},
	}
	for _, st := range steps {
		to := st.timeout
		if to == 0 {
			to = time.Minute
		}
		res, err := d.Exec(ctx, id, driver.ExecRequest{Code: st.code, Env: st.env, Timeout: to, MaxOutput: 1 << 20, Context: st.context})
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if res.Status != st.status || (st.result != "" && !drivertest.SameJSON(res.Result, st.result)) ||
			(st.stdout != "" && string(res.Stdout) != st.stdout) ||
			!reason(res.ContextLost, st.lost) || !reason(res.ContextRestarted, st.restarted) {
			t.Errorf("%s: %s result %s stdout %q lost %q restarted %q; want %s %s lost %q restarted %q (stderr %q)", st.name, res.Status,
				res.Result, res.Stdout, res.ContextLost, res.ContextRestarted, st.status, st.result, st.lost, st.restarted, tail(res.Stderr, 300))
		}
	}

	// Output is capped as a fresh run's.
	res, err := d.Exec(ctx, id, driver.ExecRequest{Code: "import sys\nsys.stdout.write('x' * 5000)\nsys.stderr.write('e' * 5000)\nresult = 1",
		Timeout: time.Minute, MaxOutput: 1000, Context: "ctx_a"})
	if err != nil || len(res.Stdout) != 1000 || !res.StdoutTruncated || len(res.Stderr) != 1000 || !res.StderrTruncated || string(res.Result) != "1" {
		t.Errorf("output over the cap: %v, %d bytes (truncated %v), %d bytes (truncated %v), result %s", err,
			len(res.Stdout), res.StdoutTruncated, len(res.Stderr), res.StderrTruncated, res.Result)
	}

	// Delete frees the instance's memory and removes its directory; again is no error.
	before := attainable(t, d, id)
	for i := 0; i < 2; i++ {
		if err := d.DeleteContext(ctx, id, "ctx_a"); err != nil {
			t.Fatalf("delete %d: %v", i, err)
		}
	}
	after := attainable(t, d, id)
	if after <= before {
		t.Errorf("a fresh run got %d MiB before deleting a context, %d MiB after", before, after)
	}
	res = drivertest.Exec(t, d, id, "import os\nresult = sorted(n for n in os.listdir('/tmp') if n.startswith('.context-'))", time.Minute)
	if !drivertest.SameJSON(res.Result, `[".context-ctx_b"]`) {
		t.Errorf("context directories after deleting ctx_a: %s", res.Result)
	}
	if err := d.DeleteContext(ctx, id, "ctx_b"); err != nil {
		t.Fatal(err)
	}
}

// reason reports whether got is "" when want is, else contains want.
func reason(got, want string) bool {
	if want == "" {
		return got == ""
	}
	return strings.Contains(got, want)
}

// attainable is how many MiB a fresh run of sandbox id can allocate: the sandbox's cap less what
// its other instances (the contexts') hold.
func attainable(t *testing.T, d *Driver, id string) int {
	t.Helper()
	res := drivertest.Exec(t, d, id, "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(1 << 20))\nexcept MemoryError:\n    pass\nresult = len(chunks)", time.Minute)
	var got int
	if err := json.Unmarshal(res.Result, &got); err != nil {
		t.Fatalf("probe: %s %s %q", res.Status, res.Result, tail(res.Stderr, 300))
	}
	return got
}

// TestContextAgentAfterItsRun: code that ends its context run early (it closes the loop's
// "status", found through its frames) and goes on has no agent channel left: its calls are
// refused, not served as the next run's (with that run's OnAgentCall), and the worker lives on.
func TestContextAgentAfterItsRun(t *testing.T) {
	d, id, _ := pySandbox(t)
	ctx := context.Background()
	if err := d.CreateContext(ctx, id, "c"); err != nil {
		t.Fatal(err)
	}
	const early = "import os, sys\nf = sys._getframe()\nwhile f is not None and 'st_fd' not in f.f_locals:\n    f = f.f_back\n" +
		"os.write(f.f_locals['st_fd'], b'0')\nos.close(f.f_locals['st_fd'])\n" +
		"try:\n    agent.run('late')\n    late = 'served'\nexcept AgentCallError as e:\n    late = 'refused: ' + str(e)\n"
	var eps []*drivertest.AgentEndpoint
	var results []string
	for _, code := range []string{early, "result = [late, agent.run('next')['echo']]"} {
		ep := &drivertest.AgentEndpoint{}
		eps = append(eps, ep)
		res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Timeout: time.Minute, MaxOutput: 1 << 20, Context: "c",
			Agent: driver.AgentInfo{AgentID: "a"}, OnAgentCall: ep.Handle})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != driver.StatusCompleted || res.ContextLost != "" || res.ContextRestarted != "" {
			t.Fatalf("status %s, lost %q, restarted %q, stderr %q", res.Status, res.ContextLost, res.ContextRestarted, tail(res.Stderr, 300))
		}
		results = append(results, string(res.Result))
	}
	// The late call races the host's reading of the forged end: made before it, it is still the
	// first run's (served there); after it, refused. Never is it the next run's.
	var got []string
	if err := json.Unmarshal([]byte(results[1]), &got); err != nil || len(got) != 2 ||
		!(strings.HasPrefix(got[0], "refused: ") || got[0] == "served") || got[1] != "next" {
		t.Errorf("the next run's result %s: want the late call refused or the first run's, the next run's own served", results[1])
	}
	wantFirst := 0
	if got != nil && got[0] == "served" {
		wantFirst = 1
	}
	if n0, n1 := len(eps[0].Calls()), len(eps[1].Calls()); n0 != wantFirst || n1 != 1 {
		t.Errorf("calls reaching the first run's OnAgentCall %d, the next's %d: want %d and 1", n0, n1, wantFirst)
	}
}
