package container

import (
	"sync"

	"golang.org/x/sys/unix"
)

// knownProcs remembers what the straggler check read of a sandbox's own processes (the agent, the
// zygote, the standby, the contexts' interpreters), so that a run's check reads the status of
// none of them again: after every run it lists the sandbox's cgroup and asks the kernel, in one
// poll of pidfds the host holds, which of the remembered processes have ended.
//
// Nothing the sandbox controls is trusted. A PID can be reused (a run with allow_spawn can cycle
// PIDs), but not while a pidfd of its process says that process is alive: an entry is used only
// when its pidfd, opened before its status was read, polls alive after the cgroup was listed, so
// the listed PID, the pidfd's process and the status read are one process. A process's NSpid
// never changes; its parent changes only when the parent ends, so the parent's PID is used only
// while the parent's own entry (its pidfd opened before the child's status was read) polls alive
// too. An entry that fails either test is dropped and its status read again, as without the cache.
type knownProcs struct {
	mu  sync.Mutex
	off bool               // no pidfds here (pidfd_open: ENOSYS): every status is read
	m   map[int]*knownProc // by host PID
}

type knownProc struct {
	fd     int
	ns     []int
	ppid   int
	parent *knownProc // ppid's entry when it had one before this status was read, else nil
}

// procsOf returns the processes pids (host PIDs of the sandbox's cgroups, listed just before)
// and the set of its zygotes, like procsOf, reading the status only of processes it does not
// hold a live entry of; initPid is the sandbox's agent. The parent of the agent and of a zygote
// (outside the sandbox's PID namespace), which the check does not use, is 0 when it comes from
// an entry whose parent the host holds no pidfd of.
func (k *knownProcs) procsOf(pids []int, initPid int) ([]sandboxProc, map[int]bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.off {
		return procsOf(pids)
	}
	if k.m == nil {
		k.m = map[int]*knownProc{}
	}
	// Which remembered processes are alive, in one poll (0 timeout): POLLIN once a process ended.
	var live map[*knownProc]bool
	if len(k.m) > 0 {
		fds := make([]unix.PollFd, 0, len(k.m))
		ents := make([]*knownProc, 0, len(k.m))
		for _, e := range k.m {
			fds = append(fds, unix.PollFd{Fd: int32(e.fd), Events: unix.POLLIN})
			ents = append(ents, e)
		}
		for {
			_, err := unix.Poll(fds, 0)
			if err == unix.EINTR {
				continue
			}
			if err == nil {
				live = make(map[*knownProc]bool, len(ents))
				for i, e := range ents {
					live[e] = fds[i].Revents == 0
				}
			}
			break // on another error nothing is taken as alive
		}
	}
	listed := make(map[int]bool, len(pids))
	for _, p := range pids {
		listed[p] = true
	}
	for p, e := range k.m { // ended, or not in the sandbox's cgroups any more
		if !live[e] || !listed[p] {
			unix.Close(e.fd)
			delete(k.m, p)
		}
	}
	usable := func(p int, e *knownProc) bool {
		if p == initPid || len(e.ns) <= 1 {
			return true // the check does not use its parent
		}
		return e.parent != nil && k.m[e.ppid] == e.parent
	}
	// Processes without a usable entry: pidfds first, then their status (the order the reuse
	// argument above needs), all of this check's pidfds before any of its reads.
	var fresh []int
	for _, p := range pids {
		if e := k.m[p]; e != nil && !usable(p, e) {
			unix.Close(e.fd)
			delete(k.m, p)
		}
		if k.m[p] == nil {
			fresh = append(fresh, p)
		}
	}
	opened := map[int]*knownProc{}
	for _, p := range fresh {
		fd, err := unix.PidfdOpen(p, 0)
		if err == unix.ENOSYS {
			k.off = true
			k.closeLocked()
			for _, e := range opened {
				unix.Close(e.fd)
			}
			return procsOf(pids)
		}
		if err == nil {
			opened[p] = &knownProc{fd: fd}
		}
	}
	procs := make([]sandboxProc, len(pids))
	zygotes := map[int]bool{}
	for i, p := range pids {
		e := k.m[p]
		if e == nil {
			ns, ppid := procStatus(p)
			if e = opened[p]; e != nil && ns != nil {
				e.ns, e.ppid = ns, ppid
				if par := k.m[ppid]; par != nil {
					e.parent = par
				} else {
					e.parent = opened[ppid]
				}
				k.m[p] = e
			} else if e != nil {
				unix.Close(e.fd)
			}
			procs[i] = sandboxProc{pid: p, ppid: ppid, ns: ns}
		} else {
			ppid := e.ppid
			if e.parent == nil || k.m[ppid] != e.parent {
				ppid = 0 // not vouched for (the agent, a zygote: the check does not use it)
			}
			procs[i] = sandboxProc{pid: p, ppid: ppid, ns: e.ns}
		}
		if len(procs[i].ns) == 1 {
			zygotes[p] = true
		}
	}
	return procs, zygotes
}

// close releases every pidfd (the sandbox is gone).
func (k *knownProcs) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closeLocked()
}

func (k *knownProcs) closeLocked() {
	for p, e := range k.m {
		unix.Close(e.fd)
		delete(k.m, p)
	}
}
