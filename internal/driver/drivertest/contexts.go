package drivertest

import (
	"context"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// ContextSteps runs, in code context name of sandbox id (created, with allow_spawn), what every
// driver with processes does with a context: state across runs, a timeout that interrupts the
// code and keeps the state, a leftover child killed after its run while the interpreter lives,
// os._exit resetting it (ContextLost, then ContextRestarted at the next run).
func ContextSteps(t *testing.T, d driver.Driver, id, name string) {
	t.Helper()
	steps := []struct {
		name, code string
		timeout    time.Duration
		status     driver.Status
		result     string
		lost       bool
		restarted  bool
	}{
		{name: "define", code: "x = 1\nresult = x", status: driver.StatusCompleted, result: "1"},
		{name: "timeout", code: "while True: pass", timeout: time.Second, status: driver.StatusTimeout},
		{name: "kept", code: "x += 1\nresult = x", status: driver.StatusCompleted, result: "2"},
		{name: "child", code: "import subprocess\np = subprocess.Popen(['sleep', '100'])\nresult = p.pid", status: driver.StatusCompleted},
		{name: "child killed", code: "import time\nfor _ in range(300):\n    if p.poll() is not None: break\n    time.sleep(0.01)\nresult = [p.poll() is not None, x]", status: driver.StatusCompleted, result: "[true,2]"},
		{name: "exit", code: "import os\nos._exit(4)", status: driver.StatusFailed, lost: true},
		{name: "fresh", code: "result = 'x' in globals()", status: driver.StatusCompleted, result: "false", restarted: true},
	}
	for _, st := range steps {
		to := st.timeout
		if to == 0 {
			to = 30 * time.Second
		}
		res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: st.code, Timeout: to, MaxOutput: 1 << 20, Context: name})
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if res.Status != st.status || (st.result != "" && string(res.Result) != st.result) ||
			(res.ContextLost != "") != st.lost || (res.ContextRestarted != "") != st.restarted {
			t.Errorf("%s: %s result %s lost %q restarted %q, want %s %s %v %v (stderr %q)", st.name, res.Status, res.Result,
				res.ContextLost, res.ContextRestarted, st.status, st.result, st.lost, st.restarted, res.Stderr)
		}
	}
}
