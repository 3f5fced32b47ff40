package fakedriver_test

import (
	"testing"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/egress"
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
