package container

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
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
			res, err := d.Exec(ctx, id, driver.ExecRequest{Code: st.code, Timeout: to, MaxOutput: 1 << 20, Context: "ctx_a"})
			if err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
			if res.Status != st.status || (st.result != "" && string(res.Result) != st.result) ||
				(res.ContextLost != "") != st.lost || (res.ContextRestarted != "") != st.restarted {
				t.Errorf("%s: %s result %s lost %q restarted %q, want %s %s %v %v (stderr %q)", st.name, res.Status, res.Result,
					res.ContextLost, res.ContextRestarted, st.status, st.result, st.lost, st.restarted, res.Stderr)
			}
		}
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
