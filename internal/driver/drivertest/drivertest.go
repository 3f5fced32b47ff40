// Package drivertest is the conformance suite of driver.Driver (Run, suite.go) and what the
// drivers' own tests share: opening sandboxes and running code in them (Harness.Sandbox, Exec,
// MustExec), skipping or failing tests that cannot run (Need), and a sandbox's host side as the
// service gives it — host ids of its own, a real disk (package disk) for /tmp, host directories
// that a container's user namespace can traverse. Tests that use the host side run as root, in
// the private mount namespace of mountns.Enter.
package drivertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

// Need skips t when err says why the tests of what cannot run (no root, no image, …) — or fails
// it when $CI is set: there every test must run.
func Need(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s must run under CI: %v", what, err)
	}
	t.Skipf("%s cannot run: %v", what, err)
}

// Exec runs code in sandbox id with the given timeout, keeping up to 1 MiB of each stream, and
// fails t on a driver error.
func Exec(t testing.TB, d driver.Driver, id, code string, timeout time.Duration) driver.ExecResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Minute)
	defer cancel()
	res, err := d.Exec(ctx, id, driver.ExecRequest{Code: code, Timeout: timeout, MaxOutput: 1 << 20})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	return res
}

// MustExec runs code in sandbox id, requires it to complete within 30 s and returns its stdout.
func MustExec(t testing.TB, d driver.Driver, id, code string) string {
	t.Helper()
	res := Exec(t, d, id, code, 30*time.Second)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("status %s (exit %d), want completed\ncode:\n%s\nstdout: %s\nstderr: %s\nerror: %+v", res.Status, res.ExitCode, code, res.Stdout, res.Stderr, res.Error)
	}
	return string(res.Stdout)
}

// NewID returns a new sandbox id.
func NewID() string { return "t-" + statedir.RandomHex(8) }

// Closer is a driver that holds resources of its process (both real drivers do).
type Closer interface {
	driver.Driver
	Close() error
}

// Shutdown destroys every sandbox d still lists and closes d if it is a Closer: what a test
// leaves behind when it fails half-way.
func Shutdown(d driver.Driver) error {
	ctx := context.Background()
	ids, err := d.List(ctx)
	errs := []error{err}
	for _, id := range ids {
		errs = append(errs, d.Destroy(ctx, id))
	}
	if c, ok := d.(Closer); ok {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Drivers are the drivers a test binary shares between its tests, by name, each opened on first
// use. TestMain calls Close after the tests.
type Drivers[D Closer] struct {
	mu   sync.Mutex
	open map[string]D
}

// Get returns the driver named name, opening it with open on first use; failing to open it
// fails t.
func (s *Drivers[D]) Get(t testing.TB, name string, open func() (D, error)) D {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.open[name]; ok {
		return d
	}
	d, err := open()
	if err != nil {
		t.Fatalf("open driver %s: %v", name, err)
	}
	if s.open == nil {
		s.open = map[string]D{}
	}
	s.open[name] = d
	return d
}

// Close shuts every driver down (Shutdown), reporting failures on stderr: nothing of a test that
// failed half-way may stay on the host.
func (s *Drivers[D]) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, d := range s.open {
		if err := Shutdown(d); err != nil {
			fmt.Fprintf(os.Stderr, "cleanup of driver %s: %v\n", name, err)
		}
	}
	s.open = nil
}

// ImageRootFS returns the default image's root filesystem: $SANDBOXD_ROOTFS, else the directory
// scripts/build-image.sh of the repository at repo prints last (building it when not cached).
func ImageRootFS(repo string) (string, error) {
	if r := os.Getenv("SANDBOXD_ROOTFS"); r != "" {
		return r, nil
	}
	cmd := exec.Command(filepath.Join(repo, "scripts", "build-image.sh"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		return "", fmt.Errorf("build the image (scripts/build-image.sh): %v: %s", err, strings.Join(lines[max(0, len(lines)-5):], "\n"))
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1], nil
}
