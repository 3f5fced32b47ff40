package container

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
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
// How: the driver starts `sandbox-agent hold` as the sandbox's first id, keeping CAP_SYS_ADMIN as
// an ambient capability (so that hosts that restrict unprivileged user namespaces allow it). The
// holder starts a child of its own in a new user namespace — owned by that id — prints the
// child's PID and waits on its stdin. The driver writes the namespace's mappings (container ids
// 0… onto the sandbox's) and the runtime joins it by path (/proc/<child>/ns/user). When the driver
// closes the holder's stdin, once the container runs (its processes keep the namespace), the
// child (same stdin) and the holder end.
//
// The namespace is never made by a fork of sandboxd itself: a clone with CLONE_NEWUSER cannot be
// a vfork, and a full fork copies the page tables of the whole server and leaves every page
// copy-on-write behind it — measured, it made everything the server did slower for a while (the
// network set-up running beside it 3×, a DELETE 2×). The holder is started by vfork; the small
// process it is makes the full fork.
//
// With runc the runtime makes the namespace (ociRuntime.ownedUserNS): the sandbox's processes
// still run as host ids of their own, but the counts of the hierarchical limits above reach
// root's, shared with every other sandbox made by runc.

// userNS is a sandbox's user namespace while its holder lives.
type userNS struct {
	path   string   // /proc/<holder's child>/ns/user
	holder *os.File // the driver's end of the holder's stdin
	pid    int      // the holder's
}

// close lets the holder go and reaps it.
func (u *userNS) close() {
	u.holder.Close()
	var ws syscall.WaitStatus
	syscall.Wait4(u.pid, &ws, 0, nil)
}

// newUserNS makes the user namespace of a sandbox whose first host id is ids (its owner).
func (d *Driver) newUserNS(ids uint32) (*userNS, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer inR.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		inW.Close()
		return nil, err
	}
	defer outR.Close()
	// No Pdeathsig: it follows the thread that started the holder, which may end before sandboxd.
	// The holder ends at EOF on its stdin, also when sandboxd dies.
	pid, err := syscall.ForkExec(d.agentBin, []string{"sandbox-agent", "hold"}, &syscall.ProcAttr{
		Env:   []string{},
		Files: []uintptr{inR.Fd(), outW.Fd(), outW.Fd()},
		Sys: &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: ids, Gid: ids},
			AmbientCaps: []uintptr{unix.CAP_SYS_ADMIN},
			Setpgid:     true,
		},
	})
	outW.Close()
	if err != nil {
		inW.Close()
		return nil, fmt.Errorf("user namespace: start the holder: %w", err)
	}
	u := &userNS{holder: inW, pid: pid}
	fail := func(err error) (*userNS, error) {
		u.close()
		return nil, fmt.Errorf("user namespace: %w", err)
	}
	// The holder prints its child's PID on a line, or why it could not start it (or, a broken
	// agent binary, whatever it prints).
	line, rerr := bufio.NewReader(io.LimitReader(outR, 4096)).ReadString('\n')
	child, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || child <= 0 {
		if rest, _ := io.ReadAll(io.LimitReader(outR, 4096)); len(rest) > 0 {
			line += string(rest)
		}
		if strings.TrimSpace(line) == "" {
			return fail(fmt.Errorf("sandbox-agent hold printed nothing (%v)", rerr))
		}
		return fail(fmt.Errorf("sandbox-agent hold printed %q, not its child's PID", strings.TrimSpace(line)))
	}
	u.path = "/proc/" + strconv.Itoa(child) + "/ns/user"
	m := fmt.Sprintf("0 %d %d\n", ids, driver.IDsPerSandbox)
	for _, f := range []string{"uid_map", "gid_map"} {
		if err := os.WriteFile("/proc/"+strconv.Itoa(child)+"/"+f, []byte(m), 0); err != nil {
			return fail(fmt.Errorf("%s: %w", f, err))
		}
	}
	return u, nil
}
