package drivertest

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// Measure logs, when $SANDBOXD_MEASURE is set (else it skips t), the p50 over n samples of a
// Create until it returns (the sandbox ready) and of a print(1) run in a live, warm sandbox: the
// figures drivers are compared by (no bound: speed targets belong to sandboxd bench).
func Measure(t *testing.T, h Harness, d driver.Driver, n int) {
	if os.Getenv("SANDBOXD_MEASURE") == "" {
		t.Skip("set SANDBOXD_MEASURE=1 to measure")
	}
	ctx := context.Background()
	var creates, runs []time.Duration
	for range n {
		spec := h.Spec(t)
		id := NewID()
		t0 := time.Now()
		if err := create(d, id, spec); err != nil {
			t.Fatalf("create: %v", err)
		}
		creates = append(creates, time.Since(t0))
		if err := d.Destroy(ctx, id); err != nil {
			t.Fatalf("destroy: %v", err)
		}
	}
	id := h.Sandbox(t, d, h.Spec(t))
	if w, ok := d.(driver.Warmer); ok {
		if err := w.Warm(ctx, id); err != nil {
			t.Fatalf("warm: %v", err)
		}
	}
	MustExec(t, d, id, "print(1)") // the first run may pay for what a warm sandbox has done
	for range n {
		t0 := time.Now()
		MustExec(t, d, id, "print(1)")
		runs = append(runs, time.Since(t0))
	}
	t.Logf("%s: create -> ready p50 %v (n=%d, min %v, max %v); print(1) run p50 %v (min %v, max %v)",
		d.Name(), p50(creates), n, slices.Min(creates), slices.Max(creates), p50(runs), slices.Min(runs), slices.Max(runs))
}

func p50(s []time.Duration) time.Duration {
	s = slices.Clone(s)
	slices.Sort(s)
	return s[len(s)/2]
}
