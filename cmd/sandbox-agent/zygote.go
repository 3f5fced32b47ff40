package main

import (
	"bufio"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// The zygote: one Python per sandbox that has started once and forks each run's process, so a run
// does not pay for an interpreter's start-up (5–7 ms of CPU here) nor for the launcher (1.7 ms).
//
// Where it lives. The host (sandboxd) starts it, as root, with
//
//	nsenter -t <agent> -m -n -i -u -C -- /.sandbox/bin/sandbox-agent zygote <uid> <gid> <nofile> <python>
//
// with the sandbox's PID namespace on fd 4, which the launcher enters with setns (that decides only
// where its children go, so it is in every namespace of the sandbox except its PID namespace), and
// on fd 5 a connection to the agent that the host made (the agent's socket is not reachable from
// inside the sandbox). Its children are processes of the sandbox like any run; the
// zygote itself is not in the sandbox's /proc and cannot be signalled from it, so a run sees the
// agent and itself, as with the launcher. The host moves it into every cgroup of the sandbox and
// sets its oom_score_adj to 1000 before it lets it go on (by closing fd 3).
//
// What "sandbox-agent zygote" does (zygoteMain), in order: reads fd 3 to its end (the container's
// seccomp profile as a BPF program, sandboxd compiles it from the same profile it gives the
// runtime); writes its Python program to a pipe; enters the PID namespace on fd 4; drops every capability from the bounding set; drops to the sandbox's uid and gid
// with no supplementary groups (which empties its capabilities); sets umask 022, RLIMIT_NOFILE and
// RLIMIT_CORE 0; sets no_new_privs and installs the profile on every thread; then execs
// `python -I -u -B -c zygoteBootstrap <socket>` with the same environment as the agent's and, on
// fd 3, zygote.py, NUL, the runner, NUL, the end of the launcher's bootstrap (run.go), NUL, the
// no-spawn filter (see launch.go). zygote.py says "zygote" on fd 5 (the agent's peer check sees
// the host, which connected it: allowed) and forks runs on request (protocol: see zygote.py).
//
// The agent keeps launching runs itself (launch.go) until a zygote has said hello, and again if
// its zygote goes away.

const zygoteCommand = "zygote"

// zygoteConnFD is the zygote's connection to the agent, made and passed by the host.
const zygoteConnFD = 5

//go:embed zygote.py
var zygoteSource string

// zygoteHello is the line a zygote sends on connecting to the agent.
const zygoteHello = "zygote"

// zygoteBootstrap is the zygote's -c program: it reads fd 3 to its end and runs zygote.py with
// _blob (the rest: see zygote.py).
const zygoteBootstrap = `import os
_b = b""
while True:
    _c = os.read(3, 1 << 16)
    if not _c: break
    _b += _c
os.close(3)
_src, _, _blob = _b.partition(b"\0")
del _b, _c
exec(compile(_src, "<sandbox-zygote>", "exec"))
`

// zygoteMain is "sandbox-agent zygote <uid> <gid> <nofile> <python>" (see above). It does not return.
func zygoteMain(args []string) {
	runtime.LockOSThread() // the bounding set and no_new_privs are per thread: this one execs
	log := newLogger("zygote")
	fail := func(format string, a ...any) {
		log.Error(fmt.Sprintf(format, a...))
		os.Exit(launchFailed)
	}
	if len(args) != 4 {
		fail("usage: sandbox-agent zygote UID GID NOFILE PYTHON")
	}
	var n [3]int
	for i := range n {
		v, err := strconv.Atoi(args[i])
		if err != nil || v <= 0 {
			fail("bad number %q", args[i])
		}
		n[i] = v
	}
	uid, gid, nofile, python := n[0], n[1], uint64(n[2]), args[3]

	r, w, err := os.Pipe() // before fd 3 is closed: neither end may be fd 3
	if err != nil {
		fail("pipe: %v", err)
	}
	in := os.NewFile(3, "profile")
	profile, err := io.ReadAll(in)
	in.Close()
	if err != nil {
		fail("reading the seccomp profile: %v", err)
	}
	if len(profile) == 0 || len(profile)%8 != 0 || len(profile)/8 > 0xffff {
		fail("the seccomp profile is %d bytes: not a BPF program", len(profile))
	}
	nospawn, err := noSpawnProgram()
	if err != nil {
		fail("no-spawn filter: %v", err)
	}
	raw, err := bpf.Assemble(nospawn)
	if err != nil {
		fail("no-spawn filter: %v", err)
	}
	blob := zygoteSource + "\x00" + runnerSource + "\x00" + bootstrapRead + bootstrapRun + "\x00" + string(agent.FilterBytes(raw))
	if _, err := io.WriteString(w, blob); err != nil { // well under the pipe's 64 KiB
		fail("writing the zygote's program: %v", err)
	}
	w.Close()
	if err := unix.Dup2(int(r.Fd()), 3); err != nil { // Dup2 leaves fd 3 inheritable
		fail("dup2: %v", err)
	}
	// The PID namespace last of all the namespaces (fd 4: the sandbox's), and only for this thread:
	// a process whose children go to another PID namespace cannot start threads, and the Go
	// runtime starts its new threads from a thread that is not locked (its template thread).
	if err := unix.Setns(4, unix.CLONE_NEWPID); err != nil {
		fail("setns(PID namespace): %v", err)
	}
	unix.Close(4)
	for c := 0; c < 64; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			fail("prctl(PR_CAPBSET_DROP, %d): %v", c, err)
		}
	}
	// The syscall package changes the ids of every thread.
	if err := syscall.Setgroups(nil); err != nil {
		fail("setgroups: %v", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		fail("setgid: %v", err)
	}
	if err := syscall.Setuid(uid); err != nil {
		fail("setuid: %v", err)
	}
	unix.Umask(0o022)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: nofile, Max: nofile}); err != nil {
		fail("setrlimit(RLIMIT_NOFILE): %v", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		fail("setrlimit(RLIMIT_CORE): %v", err)
	}
	if err := installFilter(rawFilter(profile)); err != nil {
		fail("seccomp: %v", err)
	}

	// The environment: the runs' base and what the driver adds to every run of the sandbox (its
	// egress proxy's variables, in ours), so that a run that asks for nothing else finds os.environ
	// as it wants it (zygote.py, _zenv).
	extra := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			extra[k] = v
		}
	}
	env, err := buildEnv(extra)
	if err != nil {
		fail("environment: %v", err)
	}
	err = syscall.Exec(python, []string{python, "-I", "-u", "-B", "-c", zygoteBootstrap, strconv.Itoa(zygoteConnFD)}, env)
	fail("exec %s: %v", python, err)
}

// rawFilter is the inverse of agent.FilterBytes.
func rawFilter(b []byte) []unix.SockFilter {
	f := make([]unix.SockFilter, len(b)/8)
	for i := range f {
		x := b[8*i:]
		f[i] = unix.SockFilter{Code: binary.NativeEndian.Uint16(x), Jt: x[2], Jf: x[3], K: binary.NativeEndian.Uint32(x[4:])}
	}
	return f
}

// installFilter sets no_new_privs and installs filter on every thread (TSYNC).
func installFilter(filter []unix.SockFilter) error {
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(filter)
	if errno != 0 {
		return fmt.Errorf("seccomp(SET_MODE_FILTER, TSYNC): %w", errno)
	}
	if r != 0 {
		return fmt.Errorf("seccomp(SET_MODE_FILTER, TSYNC): thread %d could not be synchronised", r)
	}
	return nil
}

// zygote is the agent's side of the connection to its zygote.
type zygote struct {
	conn *net.UnixConn
	dead chan struct{} // closed when the connection ends
	log  *slog.Logger  // the agent's

	mu      sync.Mutex // guards pending against read; fork is called by one goroutine at a time (the agent's serve loop)
	next    uint32
	pending map[string]*zchild
}

// zchild is a process the zygote forked. If the zygote goes away first, the process lives on with a
// parent outside the sandbox (the reaper of the zygote's PID namespace: the agent cannot wait for
// it), and exited receives a SIGKILL status at once: a run in progress is then killed by the agent
// (killRun), which makes the status true; an idle standby is not used (take).
type zchild struct {
	pid    chan int      // receives the pid once ("P")
	exited chan exitInfo // receives the exit once ("X"), or a SIGKILL status if the zygote goes away
}

func newZygote(conn *net.UnixConn, br *bufio.Reader, log *slog.Logger) *zygote {
	z := &zygote{conn: conn, dead: make(chan struct{}), log: log, pending: map[string]*zchild{}}
	go z.read(br)
	return z
}

// alive reports whether the zygote is still there: its connection has not ended, as read saw
// it, nor hung up, as the socket says now. A zygote that died closed its end before its exit
// could be seen (the kernel closes a process's files before it reports the exit), but read may
// not have run since: without the second check a run that comes after the zygote's death could
// be given the zygote's standby, whose end the agent cannot observe (see take).
func (z *zygote) alive() bool {
	select {
	case <-z.dead:
		return false
	default:
	}
	rc, err := z.conn.SyscallConn()
	if err != nil {
		return false
	}
	hup := false
	if err := rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		for {
			_, err := unix.Poll(pfd, 0)
			if err != unix.EINTR {
				hup = err != nil || pfd[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
				return
			}
		}
	}); err != nil {
		return false
	}
	return !hup
}

func (z *zygote) close() { z.conn.Close() }

// read dispatches the zygote's reports until the connection ends, then fails what is pending.
func (z *zygote) read(br *bufio.Reader) {
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			break
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			z.log.Warn("unexpected report from the zygote", "report", line)
			continue
		}
		z.mu.Lock()
		c := z.pending[f[1]]
		z.mu.Unlock()
		switch {
		case c == nil:
			z.log.Warn("unexpected report from the zygote", "report", line)
		case f[0] == "P" && len(f) == 3:
			pid, _ := strconv.Atoi(f[2])
			c.pid <- pid
		case f[0] == "X" && len(f) == 6:
			var v [4]int64
			for i := range v {
				v[i], _ = strconv.ParseInt(f[2+i], 10, 64)
			}
			ex := exitInfo{status: unix.WaitStatus(v[0]), at: time.Now()}
			ex.rusage.Utime = unix.NsecToTimeval(v[1] * 1000)
			ex.rusage.Stime = unix.NsecToTimeval(v[2] * 1000)
			ex.rusage.Maxrss = v[3]
			z.mu.Lock()
			delete(z.pending, f[1])
			z.mu.Unlock()
			c.exited <- ex
		default:
			z.log.Warn("unexpected report from the zygote", "report", line)
		}
	}
	z.conn.Close()
	close(z.dead)
	z.log.Info("zygote gone: runs are launched by the agent again")
	z.mu.Lock()
	defer z.mu.Unlock()
	for id, c := range z.pending {
		select {
		case c.pid <- 0:
		default:
		}
		c.exited <- exitInfo{status: unix.WaitStatus(unix.SIGKILL), at: time.Now()}
		delete(z.pending, id)
	}
}

// fork asks for a run process with descriptors fds (0–6, see zygote.py) and returns its pid in
// the sandbox and the channel of its exit.
func (z *zygote) fork(allowSpawn bool, maxOut int, fds []int) (int, <-chan exitInfo, error) {
	return z.forkAs('F', allowSpawn, maxOut, fds)
}

// forkAs is fork with the request's kind: 'F' a run's process, 'C' a code context's interpreter
// (fds: /dev/null, /dev/null, /dev/null, its socket to the agent, /dev/null, status).
func (z *zygote) forkAs(kind byte, allowSpawn bool, maxOut int, fds []int) (int, <-chan exitInfo, error) {
	z.mu.Lock()
	z.next++
	id := fmt.Sprintf("%08x", z.next)
	c := &zchild{pid: make(chan int, 1), exited: make(chan exitInfo, 1)}
	z.pending[id] = c
	z.mu.Unlock()
	spawn := '0'
	if allowSpawn {
		spawn = '1'
	}
	msg := fmt.Sprintf("%c%s %c %010d\n", kind, id, spawn, maxOut)
	_, _, err := z.conn.WriteMsgUnix([]byte(msg), unix.UnixRights(fds...), nil)
	if err != nil {
		z.mu.Lock()
		delete(z.pending, id)
		z.mu.Unlock()
		return 0, nil, fmt.Errorf("zygote: %w", err)
	}
	select {
	case <-z.dead:
		return 0, nil, errors.New("zygote: gone")
	case pid := <-c.pid:
		if pid <= 0 {
			<-c.exited
			return 0, nil, errors.New("zygote: the process ended before it started")
		}
		return pid, c.exited, nil
	case <-time.After(5 * time.Second):
		z.close() // a zygote that does not answer is not used again
		return 0, nil, errors.New("zygote: no answer in 5 s")
	}
}
