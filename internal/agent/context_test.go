package agent_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// ctxOp sends a context op and fails the test on any error.
func ctxOp(t *testing.T, sock, op, name string) agent.RunResult {
	t.Helper()
	return ctxOpSpawn(t, sock, op, name, false)
}

// ctxOpSpawn is ctxOp for a sandbox whose allow_spawn is spawn.
func ctxOpSpawn(t *testing.T, sock, op, name string, spawn bool) agent.RunResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := agent.Run(ctx, sock, agent.RunRequest{Op: op, Context: name, MaxOutput: 1 << 20, AllowSpawn: spawn}, nil, nil)
	if err != nil {
		t.Fatalf("%s %s: %v", op, name, err)
	}
	if res.AgentError != "" {
		t.Fatalf("%s %s: agent error: %s", op, name, res.AgentError)
	}
	return res
}

// TestContexts runs steps in order against one agent, each in a context (or fresh, ""), and
// checks what each step saw: state kept over runs, interrupts, resets, leftovers killed.
func TestContexts(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	created := ctxOp(t, sock, agent.OpContextCreate, "a")
	if len(created.ContextPIDs) != 1 {
		t.Fatalf("context pids after create: %v", created.ContextPIDs)
	}
	ctxOp(t, sock, agent.OpContextCreate, "b")
	ctxOp(t, sock, agent.OpContextCreate, "a") // idempotent
	steps := []struct {
		name      string
		context   string
		code      string
		timeoutMS int64
		spawn     bool
		exit      int
		stdout    string
		result    string // JSON; "" = none
		errType   string
		timedOut  bool
		lost      bool // the interpreter ends in this run
		restarted bool // this run starts a fresh interpreter
	}{
		{name: "define", context: "a", code: "import os\nx = 41\nos.chdir('sub') if os.path.isdir('sub') else (os.mkdir('sub'), os.chdir('sub'))\nf = open('data.txt', 'w')\nprint('defined')", stdout: "defined\n"},
		{name: "use", context: "a", code: "x += 1\nf.write('kept')\nf.flush()\nresult = [x, os.path.basename(os.getcwd()), open('data.txt').read()]", result: `[42,"sub","kept"]`},
		{name: "other context is separate", context: "b", code: "result = 'x' in globals()", result: "false"},
		{name: "fresh run is separate", code: "result = 'x' in globals()", result: "false"},
		{name: "exception keeps state", context: "a", code: "y = 1\n1/0", exit: 1, errType: "ZeroDivisionError"},
		{name: "state after exception", context: "a", code: "result = x + y", result: "43"},
		{name: "sys.exit keeps the interpreter", context: "a", code: "import sys\nprint('bye')\nsys.exit(3)", exit: 3, stdout: "bye\n"},
		{name: "stdout replaced by the last run", context: "a", code: "import io, sys\nsys.stdout = io.StringIO()\nprint('hidden')"},
		{name: "stdout is back", context: "a", code: "print('visible')\nresult = x", stdout: "visible\n", result: "42"},
		{name: "timeout interrupts and keeps state", context: "a", code: "print('spin', flush=True)\nwhile True: pass", timeoutMS: 300, exit: 130, stdout: "spin\n", errType: "KeyboardInterrupt", timedOut: true},
		{name: "state after timeout", context: "a", code: "result = x", result: "42"},
		// Rendering the trailing value runs the code's own methods: still interruptible.
		{name: "timeout in the value's repr interrupts", context: "a", code: "class S:\n    def __repr__(self):\n        while True: pass\nS()", timeoutMS: 300, timedOut: true},
		{name: "state after the repr's timeout", context: "a", code: "result = x", result: "42"},
		{name: "ignoring the interrupt resets", context: "a", code: "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass", timeoutMS: 300, exit: 137, timedOut: true, lost: true},
		{name: "after the reset", context: "a", code: "result = 'x' in globals()", result: "false", restarted: true},
		{name: "os._exit resets", context: "a", code: "x = 1\nimport os\nos._exit(7)", exit: 7, lost: true},
		{name: "next run says so", context: "a", code: "result = 'x' in globals()", result: "false", restarted: true},
		{name: "result too large is omitted", context: "b", code: "result = 'a' * 2000", result: ""},
	}
	for _, st := range steps {
		res := run(t, sock, agent.RunRequest{Context: st.context, Code: st.code, TimeoutMS: st.timeoutMS, AllowSpawn: st.spawn, MaxOutput: 1 << 20})
		if res.ExitCode != st.exit || string(res.Stdout) != st.stdout || res.TimedOut != st.timedOut {
			t.Errorf("%s: exit %d stdout %q timed out %v, want %d %q %v (stderr %q)", st.name, res.ExitCode, res.Stdout, res.TimedOut, st.exit, st.stdout, st.timedOut, res.Stderr)
		}
		if st.result != "" && !jsonEqual(t, res.Result, st.result) {
			t.Errorf("%s: result %s, want %s (stderr %q)", st.name, res.Result, st.result, res.Stderr)
		}
		if got := ""; res.Error != nil {
			got = res.Error.Type
			if got != st.errType {
				t.Errorf("%s: error %s, want %q", st.name, got, st.errType)
			}
		} else if st.errType != "" {
			t.Errorf("%s: no error, want %s", st.name, st.errType)
		}
		if (res.ContextLost != "") != st.lost || (res.ContextRestarted != "") != st.restarted {
			t.Errorf("%s: lost %q restarted %q, want lost %v restarted %v", st.name, res.ContextLost, res.ContextRestarted, st.lost, st.restarted)
		}
		if st.context != "" && res.CPUUS < 0 {
			t.Errorf("%s: cpu %d", st.name, res.CPUUS)
		}
	}
	ctxOp(t, sock, agent.OpContextDelete, "b")
	if res := ctxOp(t, sock, agent.OpContextDelete, "b"); len(res.ContextPIDs) != 1 {
		t.Errorf("context pids after deleting b: %v", res.ContextPIDs)
	}
}

// TestContextLeftoversKilled: a process a context's run starts does not outlive the run; the
// context's interpreter does.
func TestContextLeftoversKilled(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	c := ctxOpSpawn(t, sock, agent.OpContextCreate, "c", true)
	res := run(t, sock, agent.RunRequest{Context: "c", AllowSpawn: true,
		Code: "import subprocess\np = subprocess.Popen(['sleep', '100'])\nresult = p.pid"})
	pid, err := strconv.Atoi(string(res.Result))
	if err != nil {
		t.Fatalf("result %s (stderr %q)", res.Result, res.Stderr)
	}
	waitGone(t, pid)
	if !alive(c.ContextPIDs["c"]) {
		t.Fatal("the context's interpreter was killed with the run's leftovers")
	}
	res = run(t, sock, agent.RunRequest{Context: "c", Code: "result = p.poll() is not None"})
	if string(res.Result) != "true" {
		t.Errorf("the context does not see its child gone: %s (stderr %q)", res.Result, res.Stderr)
	}
	// A fresh run's end spares the context too.
	run(t, sock, agent.RunRequest{Code: "print(1)"})
	if !alive(c.ContextPIDs["c"]) {
		t.Fatal("a fresh run's end killed the context's interpreter")
	}
	// The context's usage is the run's own.
	res = run(t, sock, agent.RunRequest{Context: "c", Code: "t = 0\nfor i in range(2000000): t += i"})
	if res.CPUUS < 20000 {
		t.Errorf("cpu %dµs for a busy loop, want ≥ 20 ms", res.CPUUS)
	}
	res2 := run(t, sock, agent.RunRequest{Context: "c", Code: "pass"})
	if res2.CPUUS >= res.CPUUS {
		t.Errorf("cpu of an empty run %dµs ≥ the busy loop's %dµs: not per run", res2.CPUUS, res.CPUUS)
	}
}

// TestContextCancel: a host that goes away interrupts the run; the state stays.
func TestContextCancel(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	ctxOp(t, sock, agent.OpContextCreate, "d")
	run(t, sock, agent.RunRequest{Context: "d", Code: "z = 5"})
	ctx, cancel := context.WithCancel(context.Background())
	_, err := agent.Run(ctx, sock, agent.RunRequest{Context: "d", Code: "print('go', flush=True)\nimport time\ntime.sleep(100)", TimeoutMS: 60000}, func(ev agent.Event) {
		if ev.Type == "stdout" {
			cancel()
		}
	}, nil)
	if err == nil {
		t.Fatal("no error after cancel")
	}
	res := run(t, sock, agent.RunRequest{Context: "d", Code: "result = z"})
	if string(res.Result) != "5" || res.ContextRestarted != "" {
		t.Errorf("after a cancel: result %s restarted %q, want 5 and no restart", res.Result, res.ContextRestarted)
	}
}
