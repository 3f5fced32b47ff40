package container

import (
	"context"
	"fmt"
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
