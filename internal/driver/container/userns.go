package container

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// A sandbox's user namespace is made by the driver, not by the runtime, so that its owner is the
// sandbox's first host id rather than root. The kernel counts what a process holds of a per-user
// limit (inotify instances and watches, message queue bytes, pending signals, processes, user
// namespaces…) for its user in its namespace and again for the namespace's owner in the parent
// namespace, up to the host's: a namespace the runtime made would be root's, and every sandbox's
// inotify instances would count against root's 128 — one sandbox could exhaust them for all the
// others and for the host. Owned by the sandbox's own id, the count stops at the sandbox.
//
// How: a goroutine locks its thread, becomes the sandbox's first id on that thread only (keeping
// its capabilities: SECBIT_NO_SETUID_FIXUP, so that the kernel sees a privileged creator and
// the hosts that restrict unprivileged user namespaces allow it), starts `sandbox-agent hold` in a
// new user namespace from it, and ends with the thread locked, which ends the thread. The driver
// then writes the namespace's mappings (container ids 0… onto the sandbox's) and the runtime
// joins it by path (/proc/<holder>/ns/user). The holder waits on its stdin and ends when the
// driver closes it, once the container runs (its processes keep the namespace).
//
// With runc the runtime makes the namespace (ociRuntime.ownedUserNS): the sandbox's processes
// still run as host ids of their own, but the counts of the hierarchical limits above reach
// root's, shared with every other sandbox made by runc.

// secbitNoSetuidFixup keeps a thread's capabilities when it changes its uids (securebits.h).
const secbitNoSetuidFixup = 1 << 2

// userNS is a sandbox's user namespace while its holder lives.
type userNS struct {
	path   string   // /proc/<holder>/ns/user
	holder *os.File // the driver's end of the holder's stdin
	pid    int
}

// close lets the holder go and reaps it.
func (u *userNS) close() {
	u.holder.Close()
	var ws syscall.WaitStatus
	syscall.Wait4(u.pid, &ws, 0, nil)
}

// newUserNS makes the user namespace of a sandbox whose first host id is ids (its owner).
func (d *Driver) newUserNS(ids uint32) (*userNS, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	type started struct {
		pid int
		err error
	}
	done := make(chan started, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		pid, err := forkOwned(int(ids), d.agentBin, r)
		done <- started{pid, err}
	}()
	s := <-done
	if s.err != nil {
		w.Close()
		return nil, fmt.Errorf("user namespace: %w", s.err)
	}
	u := &userNS{path: "/proc/" + strconv.Itoa(s.pid) + "/ns/user", holder: w, pid: s.pid}
	m := fmt.Sprintf("0 %d %d\n", ids, driver.IDsPerSandbox)
	for _, f := range []string{"uid_map", "gid_map"} {
		if err := os.WriteFile("/proc/"+strconv.Itoa(s.pid)+"/"+f, []byte(m), 0); err != nil {
			u.close()
			return nil, fmt.Errorf("user namespace: %s: %w", f, err)
		}
	}
	return u, nil
}

// forkOwned, on a locked thread it leaves unusable, takes uid and gid owner (on this thread only,
// capabilities kept) and starts `agent hold` in a new user namespace with stdin.
func forkOwned(owner int, agent string, stdin *os.File) (int, error) {
	if err := unix.Prctl(unix.PR_SET_SECUREBITS, secbitNoSetuidFixup, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("securebits: %w", err)
	}
	// Raw calls: the syscall package would change every thread's ids.
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return 0, fmt.Errorf("setgroups: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(owner), uintptr(owner), uintptr(owner)); e != 0 {
		return 0, fmt.Errorf("setresgid: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(owner), uintptr(owner), uintptr(owner)); e != 0 {
		return 0, fmt.Errorf("setresuid: %w", e)
	}
	// No Pdeathsig: it would fire as this thread ends. The holder ends at EOF on stdin instead.
	pid, err := syscall.ForkExec(agent, []string{"sandbox-agent", "hold"}, &syscall.ProcAttr{
		Env:   []string{},
		Files: []uintptr{stdin.Fd(), ^uintptr(0), ^uintptr(0)},
		Sys:   &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER, Setpgid: true},
	})
	if err != nil {
		return 0, fmt.Errorf("start the holder: %w", err)
	}
	return pid, nil
}
