package container

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

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
// How: the driver starts util-linux's `unshare --user cat` (a vfork and one exec of a small C
// program) as the sandbox's first id, keeping CAP_SYS_ADMIN as an ambient capability (so that
// hosts that restrict unprivileged user namespaces allow it). unshare makes the namespace, owned
// by that id, and execs cat, which reads its stdin until EOF; the process has no capability left
// outside its namespace. The driver waits until /proc/<pid>/ns/user is no longer its own, writes
// the mappings (container ids 0… onto the sandbox's), and the runtime joins it by path. The driver
// closes the holder's stdin once the container runs (its processes keep the namespace).
//
// Not a clone with CLONE_NEWUSER from sandboxd itself: Go cannot make that a vfork, and the full
// fork copies the page tables of the whole server and leaves every page copy-on-write behind it —
// measured, it made everything the server did slower for a while (the network set-up running
// beside it 3×, a DELETE 2×). Nor `sandbox-agent` as the holder: a Go program's exec and start-up
// cost 8–10 ms here, unshare + cat 2 ms.
//
// With runc the runtime makes the namespace (ociRuntime.ownedUserNS): the sandbox's processes
// still run as host ids of their own, but the counts of the hierarchical limits above reach
// root's, shared with every other sandbox made by runc.

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

// nsWait bounds how long newUserNS waits for unshare to have made the namespace.
const nsWait = 5 * time.Second

// newUserNS makes the user namespace of a sandbox whose first host id is ids (its owner).
func (d *Driver) newUserNS(ids uint32) (*userNS, error) {
	own, err := os.Readlink("/proc/self/ns/user")
	if err != nil {
		return nil, fmt.Errorf("user namespace: %w", err)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer inR.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		inW.Close()
		return nil, err
	}
	defer errR.Close()
	// cat's stdout must be open (GNU cat fstats it at start and fails on a closed one) and is
	// never written: /dev/null.
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		inW.Close()
		errW.Close()
		return nil, fmt.Errorf("user namespace: %w", err)
	}
	defer null.Close()
	// No Pdeathsig: it follows the thread that started the holder, which may end before sandboxd.
	// The holder ends at EOF on its stdin, also when sandboxd dies.
	pid, err := syscall.ForkExec(d.unshare, []string{"unshare", "--user", "--", d.cat}, &syscall.ProcAttr{
		Env:   []string{},
		Files: []uintptr{inR.Fd(), null.Fd(), errW.Fd()},
		Sys: &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: ids, Gid: ids},
			AmbientCaps: []uintptr{unix.CAP_SYS_ADMIN},
			Setpgid:     true,
		},
	})
	errW.Close()
	if err != nil {
		inW.Close()
		return nil, fmt.Errorf("user namespace: start %s: %w", d.unshare, err)
	}
	u := &userNS{path: "/proc/" + strconv.Itoa(pid) + "/ns/user", holder: inW, pid: pid}
	fail := func(err error) (*userNS, error) {
		syscall.Kill(pid, syscall.SIGKILL) // an unshare that is stuck would not see its stdin end
		u.close()
		return nil, fmt.Errorf("user namespace: %w", err)
	}
	// Until the holder's namespace link differs from ours. (While unshare execs cat, reading the
	// link can fail for a moment: that is not the holder's end, which only Wait4 tells.)
	for end, pause := time.Now().Add(nsWait), 50*time.Microsecond; ; pause = min(2*pause, time.Millisecond) {
		ns, err := os.Readlink(u.path)
		if err == nil && ns != own {
			break
		}
		var ws syscall.WaitStatus
		if p, _ := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil); p == pid {
			u.holder.Close()
			msg, _ := io.ReadAll(io.LimitReader(errR, 4096))
			return nil, fmt.Errorf("user namespace: %s ended before making it (%s): %s", d.unshare, exitText(ws), strings.TrimSpace(string(msg)))
		}
		if time.Now().After(end) {
			if err == nil {
				err = errors.New("still the server's")
			}
			return fail(fmt.Errorf("%s made no namespace in %v (its namespace: %v)", d.unshare, nsWait, err))
		}
		time.Sleep(pause)
	}
	m := fmt.Sprintf("0 %d %d\n", ids, driver.IDsPerSandbox)
	for _, f := range []string{"uid_map", "gid_map"} {
		if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/"+f, []byte(m), 0); err != nil {
			return fail(fmt.Errorf("%s: %w", f, err))
		}
	}
	return u, nil
}

// exitText says how a process ended.
func exitText(ws syscall.WaitStatus) string {
	if ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	return "exit " + strconv.Itoa(ws.ExitStatus())
}
