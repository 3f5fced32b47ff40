package container

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// nsGetOwnerUID is NS_GET_OWNER_UID (linux/nsfs.h): the owner of a user namespace.
const nsGetOwnerUID = 0xb704

// TestUserNS checks the namespace newUserNS makes: owned by the sandbox's first id, mapped onto
// its range, its holder gone once let go; and that a holder that cannot make one is an error that
// says why, with nothing left behind.
func TestUserNS(t *testing.T) {
	d := openDriver(t, "crun")
	const ids = driver.HelperIDs - driver.IDsPerSandbox // a range no test sandbox is given
	t.Run("owned", func(t *testing.T) {
		u, err := d.newUserNS(ids)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(u.path)
		if err != nil {
			u.close()
			t.Fatal(err)
		}
		var owner uint32
		_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), nsGetOwnerUID, uintptr(unsafe.Pointer(&owner)))
		f.Close()
		m, _ := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", u.pid))
		pid := u.pid
		u.close()
		if errno != 0 {
			t.Fatalf("NS_GET_OWNER_UID: %v", errno)
		}
		if owner != ids {
			t.Errorf("the namespace's owner is uid %d, want the sandbox's first id %d", owner, ids)
		}
		if want := fmt.Sprintf("0 %d %d", ids, driver.IDsPerSandbox); strings.Join(strings.Fields(string(m)), " ") != want {
			t.Errorf("uid_map %q, want %q", m, want)
		}
		if err := unix.Kill(pid, 0); err == nil {
			t.Errorf("the holder %d is still there after close", pid)
		}
	})
	t.Run("holder fails", func(t *testing.T) {
		dir := t.TempDir()
		for _, d := range []string{filepath.Dir(dir), dir} { // the holder runs as the sandbox's id
			if err := os.Chmod(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		bad := filepath.Join(dir, "unshare")
		if err := os.WriteFile(bad, []byte("#!/bin/sh\necho unshare-boom >&2\nexit 3\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		bd := &Driver{unshare: bad, cat: d.cat}
		u, err := bd.newUserNS(ids)
		if err == nil {
			u.close()
			t.Fatal("a holder that exits made a namespace")
		}
		if !strings.Contains(err.Error(), "unshare-boom") || !strings.Contains(err.Error(), "exit 3") {
			t.Errorf("error %q does not say what the holder said and how it ended", err)
		}
	})
}
