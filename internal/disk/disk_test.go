package disk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/mountns"
)

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		if err := mountns.Enter(); err != nil { // re-executes: the disks' mounts stay in there
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

func need(t *testing.T) *Manager {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("disk tests need root (loop devices, mounts)")
		}
		t.Skip("needs root (loop devices, mounts)")
	}
	m, err := NewManager(filepath.Join(t.TempDir(), "templates"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// loopOf returns the loop device that backs the file system mounted at mnt ("" if none).
func loopOf(t *testing.T, mnt string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 9 && f[4] == mnt {
			return f[len(f)-2]
		}
	}
	return ""
}

// A disk holds what fits in its size and refuses the rest with ENOSPC; it is a file system of its
// own (usage counts what was written), and Remove leaves neither mount, loop device nor image.
func TestDisk(t *testing.T) {
	m := need(t)
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "disk.img"), filepath.Join(dir, "mnt")
	const size = 32 << 20
	if err := m.Create(img, mnt, size); err != nil {
		t.Fatal(err)
	}
	dev := loopOf(t, mnt)
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("mounted from %q, want a loop device", dev)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/dio"); err == nil {
		t.Logf("%s: direct I/O %s", dev, strings.TrimSpace(string(b)))
	}
	used0, total, err := Usage(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if total < size*9/10 || total > size {
		t.Errorf("size %d, want about %d", total, size)
	}
	st, _ := os.Stat(img)
	var sys syscall.Stat_t
	syscall.Stat(img, &sys)
	if st.Size() != size || sys.Blocks*512 > 4<<20 {
		t.Errorf("image: size %d, %d bytes allocated; want %d, sparse", st.Size(), sys.Blocks*512, size)
	}

	f, err := os.Create(filepath.Join(mnt, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	var written int64
	for {
		n, err := f.Write(chunk)
		written += int64(n)
		if err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("filling the disk: %v, want ENOSPC", err)
			}
			break
		}
		if written > 2*size {
			t.Fatal("wrote twice the disk's size")
		}
	}
	f.Close()
	if written < size*8/10 {
		t.Errorf("ENOSPC after %d bytes of a %d-byte disk", written, size)
	}
	used, _, _ := Usage(mnt)
	if used-used0 < written*9/10 {
		t.Errorf("usage grew by %d after writing %d", used-used0, written)
	}

	if err := Remove(img, mnt); err != nil {
		t.Fatal(err)
	}
	if loopOf(t, mnt) != "" {
		t.Error("still mounted after Remove")
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("image after Remove: %v", err)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file"); err == nil && strings.Contains(string(b), dir) {
		t.Errorf("%s still backed by %s", dev, b)
	}
	if err := Remove(img, mnt); err != nil {
		t.Errorf("Remove again: %v", err)
	}
}

// Concurrent creates each get a loop device of their own.
func TestConcurrentCreate(t *testing.T) {
	m := need(t)
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() {
			errs[i] = m.Create(filepath.Join(dir, fmt.Sprint(i, ".img")), filepath.Join(dir, fmt.Sprint(i)), 16<<20)
		})
	}
	wg.Wait()
	devs := map[string]bool{}
	for i, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
		mnt := filepath.Join(dir, fmt.Sprint(i))
		devs[loopOf(t, mnt)] = true
		if err := os.WriteFile(filepath.Join(mnt, "x"), []byte("x"), 0o600); err != nil {
			t.Error(err)
		}
	}
	if len(devs) != len(errs) {
		t.Errorf("%d devices for %d disks", len(devs), len(errs))
	}
	for i := range errs {
		if err := Remove(filepath.Join(dir, fmt.Sprint(i, ".img")), filepath.Join(dir, fmt.Sprint(i))); err != nil {
			t.Error(err)
		}
	}
}

func TestTooSmall(t *testing.T) {
	m := need(t)
	dir := t.TempDir()
	if err := m.Create(filepath.Join(dir, "d.img"), filepath.Join(dir, "m"), MinSize-1); err == nil {
		t.Fatal("a disk below MinSize was made")
	}
}
