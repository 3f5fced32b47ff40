package fakedriver_test

import (
	"context"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// TestConformance: the fake keeps the lifecycle part of the driver contract (it runs no code:
// the suite skips the runs), so that the tests above the drivers see what a driver does.
func TestConformance(t *testing.T) {
	drivertest.Run(t, drivertest.Harness{
		Open:   func(t *testing.T) driver.Driver { return fakedriver.New() },
		Reopen: func(t *testing.T, old driver.Driver) driver.Driver { return old.(*fakedriver.Driver).Reopen() },
		Spec: func(t *testing.T) driver.Spec {
			return driver.Spec{RootFS: "/nonexistent", CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64, HostIDs: drivertest.IDs(),
				TmpDir: t.TempDir(), WorkDir: t.TempDir(), Network: egress.Policy{BlockOutbound: true}}
		},
		Egress:   true,
		Survives: true,
	})
}

// TestStubborn: a "stubborn" run ignores its ctx and timeout and completes once the test releases
// it; Running counts it while it waits.
func TestStubborn(t *testing.T) {
	d := fakedriver.New()
	if err := d.Create(context.Background(), "sb", driver.Spec{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // ignored
	done := make(chan driver.ExecResult)
	go func() {
		res, err := d.Exec(ctx, "sb", driver.ExecRequest{Code: "stubborn", Timeout: time.Millisecond})
		if err != nil {
			t.Error(err)
		}
		done <- res
	}()
	waitfor.True(t, 10*time.Second, func() bool { return d.Running() == 1 })
	select {
	case res := <-done:
		t.Fatalf("the stubborn run ended before its release: %s", res.Status)
	default:
	}
	d.ReleaseStubborn()
	d.ReleaseStubborn() // idempotent
	if res := <-done; res.Status != driver.StatusCompleted {
		t.Errorf("released stubborn run: %s, want completed", res.Status)
	}
	if n := d.Running(); n != 0 {
		t.Errorf("Running after the run: %d", n)
	}
}
