// Package drivertest is what the drivers' tests share: a sandbox's host side as the service
// gives it — host ids of its own, a real disk (package disk) for /tmp, host directories that a
// container's user namespace can traverse. Tests that use it run as root, in the private mount
// namespace of mountns.Enter.
package drivertest

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/mountns"
)

// DiskBytes is the size of the disk Fill gives a sandbox.
const DiskBytes = 64 << 20

var (
	nextIDs atomic.Uint32

	diskOnce sync.Once
	disks    *disk.Manager
	diskDir  string // where the images are
	diskMnt  string // where they are mounted
	diskErr  error
)

// IDs returns a range of host ids that no other sandbox of this test process has, and that
// other test processes running at the same time are unlikely to have.
func IDs() uint32 {
	slot := uint32(os.Getpid()%16)*512 + nextIDs.Add(1)%512
	return 1<<30 + slot*driver.IDsPerSandbox
}

// Disk makes a disk of size bytes, removed when the test ends, and returns where it is mounted.
func Disk(t testing.TB, size int64) string {
	t.Helper()
	diskOnce.Do(func() {
		diskDir = filepath.Join(os.TempDir(), "sandboxd-drivertest-disks")
		if disks, diskErr = disk.NewManager(filepath.Join(diskDir, "templates")); diskErr == nil {
			diskMnt, diskErr = mountns.Dir(diskDir)
		}
	})
	if diskErr != nil {
		t.Fatalf("test disks: %v", diskErr)
	}
	name := statedir.RandomHex(8)
	img, mnt := filepath.Join(diskDir, name+".img"), filepath.Join(diskMnt, name)
	if err := disks.Create(img, mnt, size); err != nil {
		t.Fatalf("test disk: %v", err)
	}
	t.Cleanup(func() {
		if err := disk.Remove(img, mnt); err != nil {
			t.Errorf("remove test disk: %v", err)
		}
	})
	return mnt
}

// HostDir returns a new empty directory, removed when the test ends, that every user can
// traverse to (a mount's host directory).
func HostDir(t testing.TB) string {
	t.Helper()
	d := t.TempDir()
	for p := d; p != filepath.Clean(os.TempDir()) && p != "/"; p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// Fill gives spec what the service gives every sandbox when it lacks it: host ids of its own
// (IDs), and a /tmp and a working directory on a disk of DiskBytes of its own. Call it before the sandbox's Create (so
// that the disk outlives the sandbox's Destroy registered after it).
func Fill(t testing.TB, spec driver.Spec) driver.Spec {
	t.Helper()
	if spec.HostIDs == 0 {
		spec.HostIDs = IDs()
	}
	if spec.TmpDir == "" || spec.WorkDir == "" {
		d := Disk(t, DiskBytes)
		for _, p := range []*string{&spec.TmpDir, &spec.WorkDir} {
			if *p == "" {
				*p = filepath.Join(d, statedir.RandomHex(4))
				if err := os.Mkdir(*p, 0o711); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return spec
}
