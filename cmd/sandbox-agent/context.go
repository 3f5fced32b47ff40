package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/pseudofs"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Code contexts: long-lived interpreters that run one run after another in the same globals
// (runner.py, _sandbox_context, has the protocol). A context's interpreter is forked by the
// zygote like a run's process — same uid, session of its own, the no-spawn filter unless
// allow_spawn — or, without a zygote, launched like one. The agent knows each one's PID because it
// started it: the kill after every run spares them (and nothing else: what a context's run
// started is killed like a fresh run's leftovers).
//
// The interpreter belongs to the code it runs, so nothing it says is trusted beyond its own run:
// output is capped as for fresh runs; a run ends at the agent's deadline (SIGINT, then after
// agent.ContextInterruptGrace SIGKILL, which resets the context) whatever the process claims; a
// reply that is not the one expected kills it. It is a process of its own: other contexts and fresh
// runs share only the sandbox's limits with it.

// pyContext is one code context's interpreter as the agent sees it. Only the serve loop uses it.
type pyContext struct {
	id     string
	dir    string // its working directory, made by the agent (kept over restarts of its interpreter)
	pid    int    // 0: no interpreter (it ended; the next run starts one)
	exited <-chan exitInfo
	ctl    *net.UnixConn
	br     *bufio.Reader
	seq    uint32
	lost   string // why its interpreter ended when no answer could say so (the next run reports it)
	// lastCPU is the interpreter's own CPU count (µs, itself and its reaped children) at the end of
	// its last run.
	lastCPU int64
	// noSpawn: the interpreter runs under the no-spawn filter (started without allow_spawn), set
	// before any code it runs and never lifted: its runs cannot make a process (see runInContext).
	noSpawn bool
}

// contextParent is the directory the contexts' working directories are made in.
func contextParent() string {
	if st, err := os.Stat("/tmp"); err == nil && st.IsDir() {
		return "/tmp"
	}
	return runDir()
}

// contextBootstrap is the -c program of a launched context (no zygote): the launcher's with the
// context's socket named (runner.py dispatches on it).
const contextBootstrap = "_sandbox_context_fd = 3\n" + bootstrap

func validContextID(id string) bool {
	if id == "" || len(id) > agent.ContextIDMax {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// contextPIDs are the live contexts' interpreters, by name. One that has ended is not listed (its
// PID may be another process's by now): its end is taken here, and its next run reports it.
func (a *agentServer) contextPIDs() map[string]int {
	pids := map[string]int{}
	for _, c := range a.contexts {
		if a.checkContext(c) {
			pids[c.id] = c.pid
		}
	}
	return pids
}

// checkContext reports whether c has a live interpreter. One that ended while idle is forgotten,
// and why it ended is kept in c.lost for its next run.
func (a *agentServer) checkContext(c *pyContext) bool {
	if c.pid == 0 {
		return false
	}
	select {
	case ex := <-c.exited:
		c.ctl.Close()
		c.pid, c.exited, c.ctl, c.br = 0, nil, nil, nil
		c.lost = describeExit(ex) + " between runs"
		return false
	default:
		return true
	}
}

// handleContext serves OpContextCreate and OpContextDelete.
func (a *agentServer) handleContext(req *agent.RunRequest) *agent.RunResult {
	res := &agent.RunResult{}
	if !validContextID(req.Context) {
		res.AgentError = fmt.Sprintf("invalid context name %q", req.Context)
		return res
	}
	switch req.Op {
	case agent.OpContextCreate:
		c := a.contexts[req.Context]
		fresh := c == nil
		if fresh {
			if len(a.contexts) >= agent.MaxContexts {
				res.AgentError = fmt.Sprintf("this sandbox already has %d code contexts", agent.MaxContexts)
				return res
			}
			c = &pyContext{id: req.Context}
		}
		if c.pid == 0 {
			if err := a.startContext(c, req); err != nil {
				if fresh && c.dir != "" { // a context that never was leaves no directory
					if rerr := removeContextDir(c.dir); rerr != nil {
						a.log.Warn("removing a context's directory", "err", rerr)
					}
				}
				res.AgentError = "starting the context's interpreter: " + err.Error()
				return res
			}
		}
		a.contexts[c.id] = c
	case agent.OpContextDelete:
		if c := a.contexts[req.Context]; c != nil {
			a.stopContext(c)
			if c.dir != "" {
				if err := removeContextDir(c.dir); err != nil {
					a.log.Warn("removing a context's directory", "err", err)
				}
			}
			delete(a.contexts, req.Context)
		}
	default:
		res.AgentError = fmt.Sprintf("unknown op %q", req.Op)
	}
	return res
}

func removeContextDir(dir string) error {
	root, err := os.OpenRoot(filepath.Dir(dir))
	if err != nil {
		return err
	}
	defer root.Close()
	return root.RemoveAll(filepath.Base(dir))
}

// startContext starts c's interpreter (in c.dir, made first if it has none) and waits until it
// says it is ready.
func (a *agentServer) startContext(c *pyContext, req *agent.RunRequest) (err error) {
	if c.dir == "" {
		dir, err := os.MkdirTemp(contextParent(), ".context-")
		if err != nil {
			return fmt.Errorf("working directory: %w", err)
		}
		c.dir = dir
	}
	maxOut := req.MaxOutput
	if maxOut <= 0 {
		maxOut = agent.DefaultMaxOutput
	}
	env, err := buildEnv(req.Env)
	if err != nil {
		return err
	}
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socketpair: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(sp[0]), "context"), os.NewFile(uintptr(sp[1]), "context")
	defer theirs.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		mine.Close()
		return err
	}
	defer devnull.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		mine.Close()
		return err
	}
	defer statusR.Close()
	nul, sock, st := int(devnull.Fd()), int(theirs.Fd()), int(statusW.Fd())
	fds := []int{nul, nul, nul, sock, nul, st, nul} // as a run's (zygote.py): fd 6, its agent channel, is per run here
	var pid int
	var exited <-chan exitInfo
	var prefix []byte // what the socket carries before the environment (a launched process: the runner)
	if z := a.zyg; z != nil && z.alive() {
		pid, exited, err = z.forkAs('C', req.AllowSpawn, maxOut, fds)
	} else {
		spawn := "0"
		if req.AllowSpawn {
			spawn = "1"
		}
		prefix = []byte(runnerSource)
		argv := []string{"sandbox-agent", launchCommand, spawn, a.python,
			a.python, "-I", "-u", "-B", "-c", contextBootstrap, "s" + strconv.Itoa(len(prefix)), strconv.Itoa(maxOut)}
		lenv, _ := buildEnv(nil)
		attr := &syscall.ProcAttr{
			Dir: c.dir, Env: append(lenv, launcherGOMAXPROCS),
			Files: []uintptr{uintptr(nul), uintptr(nul), uintptr(nul), uintptr(sock), uintptr(nul), uintptr(st)},
			Sys:   &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL},
		}
		pid, exited, err = a.reaper.start(func() (int, error) {
			return syscall.ForkExec("/proc/self/exe", argv, attr)
		})
	}
	statusW.Close()
	if err != nil {
		mine.Close()
		return err
	}
	fc, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		unix.Kill(pid, unix.SIGKILL)
		<-exited
		return err
	}
	conn := fc.(*net.UnixConn)
	fail := func(err error) error {
		conn.Close()
		unix.Kill(-pid, unix.SIGKILL)
		unix.Kill(pid, unix.SIGKILL)
		<-exited
		statusR.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if b, _ := io.ReadAll(io.LimitReader(statusR, 4096)); len(b) > 0 {
			err = fmt.Errorf("%w (%s)", err, b)
		}
		return err
	}
	var block bytes.Buffer
	block.Write(prefix)
	fmt.Fprintf(&block, "%s%s\n", envHeader(env), c.dir)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(block.Bytes()); err != nil {
		return fail(fmt.Errorf("writing to the interpreter: %w", err))
	}
	br := bufio.NewReaderSize(conn, 256)
	line, err := agent.ReadLine(br, 64)
	if err != nil || string(line) != "H" {
		return fail(fmt.Errorf("the interpreter did not start (%q, %v)", line, err))
	}
	conn.SetDeadline(time.Time{})
	c.pid, c.exited, c.ctl, c.br, c.lost, c.lastCPU, c.noSpawn = pid, exited, conn, br, "", 0, !req.AllowSpawn
	return nil
}

// stopContext kills c's interpreter (and its process group) and waits for it.
func (a *agentServer) stopContext(c *pyContext) {
	if c.pid == 0 {
		return
	}
	c.ctl.Close()
	unix.Kill(-c.pid, unix.SIGKILL)
	unix.Kill(c.pid, unix.SIGKILL)
	select {
	case <-c.exited:
	case <-time.After(killTimeout):
		a.log.Error("a context's interpreter survives SIGKILL", "pid", c.pid)
	}
	c.pid, c.exited, c.ctl, c.br = 0, nil, nil, nil
}

// describeExit says how an interpreter ended, for a context's reset reason.
func describeExit(ex exitInfo) string {
	switch ws := ex.status; {
	case ws.Exited():
		return fmt.Sprintf("the interpreter exited with status %d", ws.ExitStatus())
	case ws.Signaled() && ws.Signal() == unix.SIGKILL:
		return "the interpreter was killed (SIGKILL: the sandbox's memory limit, or a kill)"
	case ws.Signaled():
		return fmt.Sprintf("the interpreter was killed by signal %d (%s)", ws.Signal(), unix.SignalName(ws.Signal()))
	}
	return "the interpreter ended"
}

// ctxSendTimeout bounds the write of a run's request to a context's interpreter.
const ctxSendTimeout = time.Second

// ctxReply is the interpreter's answer to one run (or why there is none).
type ctxReply struct {
	line []byte
	err  error
}

// runInContext executes req in its context's interpreter (starting one if it has none).
func (a *agentServer) runInContext(req *agent.RunRequest, s *sender, answers <-chan []byte) *agent.RunResult {
	res := &agent.RunResult{ExitCode: -1}
	if !validContextID(req.Context) {
		res.AgentError = fmt.Sprintf("invalid context name %q", req.Context)
		return res
	}
	c := a.contexts[req.Context]
	if c == nil {
		if len(a.contexts) >= agent.MaxContexts {
			res.AgentError = fmt.Sprintf("this sandbox already has %d code contexts", agent.MaxContexts)
			return res
		}
		c = &pyContext{id: req.Context, lost: "the context had no interpreter"}
		a.contexts[c.id] = c
	}
	if !a.checkContext(c) {
		res.ContextRestarted = c.lost
		if res.ContextRestarted == "" {
			res.ContextRestarted = "the interpreter had ended"
		}
		if err := a.startContext(c, req); err != nil {
			res.AgentError = "starting the context's interpreter: " + err.Error()
			return res
		}
	}
	maxOut := req.MaxOutput
	if maxOut <= 0 {
		maxOut = agent.DefaultMaxOutput
	}
	env, err := pyrunner.Env(nil, req.Env) // the run's variables, set on top of the context's
	if err != nil {
		res.AgentError = err.Error()
		return res
	}
	// The run's descriptors: stdout, stderr, code, result (ours: read, read, write, read), then the agent channel.
	var ours, theirs []*os.File
	defer func() {
		for _, f := range append(ours, theirs...) {
			f.Close()
		}
	}()
	for i := 0; i < 4; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			res.AgentError = "pipe: " + err.Error()
			return res
		}
		if i == 2 {
			ours, theirs = append(ours, w), append(theirs, r)
		} else {
			ours, theirs = append(ours, r), append(theirs, w)
		}
	}
	outR, errR, codeW, resR := ours[0], ours[1], ours[2], ours[3]
	// The run's agent channel, served as a fresh run's is (its `agent` object is the run's own).
	calls, callsChild, err := agentChannel()
	if err != nil {
		res.AgentError = err.Error()
		return res
	}
	theirs = append(theirs, callsChild)
	runEnd := make(chan struct{})
	var callsDone sync.WaitGroup
	callsDone.Add(1)
	go func() { defer callsDone.Done(); a.serveCalls(calls, req.Agent, s, answers, runEnd) }()
	defer func() {
		// No call event may follow the exit event: the channel's server is gone before it.
		close(runEnd)
		calls.Close()
		callsDone.Wait()
	}()
	a.dropLaunchedStandby()
	pid, spawnless := c.pid, c.noSpawn
	// (Its peak RSS is reset by the interpreter itself as the run starts: between runs it is not
	// dumpable, and its /proc files are not ours to write.)
	ticks0, _ := procCPUTicks(pid)
	c.seq++
	fds := make([]int, len(theirs))
	for i, f := range theirs {
		fds[i] = int(f.Fd())
	}
	start := time.Now()
	// The socket is the code's too: code that fills it (its own writes are not read between runs)
	// or stops reading it must not hold the agent's serve loop.
	c.ctl.SetWriteDeadline(start.Add(ctxSendTimeout))
	_, _, err = c.ctl.WriteMsgUnix([]byte(fmt.Sprintf("R%08x\n", c.seq)), unix.UnixRights(fds...), nil)
	c.ctl.SetWriteDeadline(time.Time{})
	if err != nil {
		// It cannot take a run: it is ending, broken, or does not read. The next run starts a fresh one.
		a.stopContext(c)
		c.lost = "the interpreter did not take the run"
		res.AgentError = "sending the run to the context: " + err.Error()
		return res
	}
	for _, f := range theirs {
		f.Close()
	}
	theirs = nil

	header := envHeader(env)
	var wg sync.WaitGroup
	wg.Add(4)
	go func() {
		defer wg.Done()
		if _, err := io.WriteString(codeW, header); err == nil {
			io.WriteString(codeW, req.Code)
		}
		codeW.Close()
	}()
	stdout := &capture{typ: "stdout", max: maxOut}
	stderr := &capture{typ: "stderr", max: maxOut}
	go func() { defer wg.Done(); stdout.drain(outR, s) }()
	go func() { defer wg.Done(); stderr.drain(errR, s) }()
	var resultDoc []byte
	go func() { defer wg.Done(); resultDoc = readCapped(a.log, "result document", resR, resultDocCap(maxOut)) }()
	replies := make(chan ctxReply, 1)
	br := c.br
	go func() {
		line, err := agent.ReadLine(br, 256)
		replies <- ctxReply{line, err}
	}()

	var timeout, grace <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	interrupt := func() {
		if grace != nil {
			return
		}
		unix.Kill(pid, unix.SIGINT)
		t := time.NewTimer(agent.ContextInterruptGrace)
		grace = t.C
		timeout = nil
	}
	hostGone, gone, broken := false, s.gone, s.broken
	var reply ctxReply
	gotReply := false
	var died *exitInfo
	killedAt := ""
wait:
	for {
		select {
		case reply = <-replies:
			gotReply = true
			break wait
		case ex := <-c.exited:
			died = &ex
			break wait
		case <-timeout:
			res.TimedOut = true
			interrupt()
		case <-gone:
			a.log.Info("host closed the connection: interrupting the context's run")
			hostGone, gone, broken = true, nil, nil
			interrupt()
		case <-broken:
			a.log.Warn("writing to the host failed: interrupting the context's run")
			hostGone, gone, broken = true, nil, nil
			interrupt()
		case <-grace:
			killedAt = fmt.Sprintf("the run did not stop within %v of the interrupt: the interpreter was killed", agent.ContextInterruptGrace)
			break wait
		}
	}
	end := time.Now()
	exitCode, selfUS, childUS, ok := -1, int64(-1), int64(-1), false
	if died == nil && killedAt == "" && reply.err != nil {
		// The socket ended: the interpreter is ending (os._exit, a crash); say how it ended.
		select {
		case ex := <-c.exited:
			died = &ex
		case <-time.After(killTimeout):
		}
	}
	if died == nil && killedAt == "" {
		exitCode, selfUS, childUS, ok = parseContextReply(reply, c.seq)
		if !ok {
			killedAt = fmt.Sprintf("the interpreter's reply was not the one expected (%q): it was killed", reply.line)
		}
	}
	ticks1, err := procCPUTicks(pid)
	if err != nil {
		ticks1 = ticks0
	}
	hwm := procHWM(pid)
	lost := ""
	switch {
	case died != nil:
		lost = describeExit(*died)
		res.ExitCode, res.Signal = exitStatus(died.status)
		c.ctl.Close()
		c.pid, c.exited, c.ctl, c.br = 0, nil, nil, nil
	case killedAt != "":
		lost = killedAt
		a.stopContext(c)
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	default:
		res.ExitCode = exitCode
	}
	if lost != "" && !gotReply {
		<-replies // the socket is closed: the reader is done
	}
	if lost != "" {
		if hostGone {
			c.lost = lost // nobody hears this answer: the next run says it
		} else {
			res.ContextLost = lost
		}
	}
	// What the run started is not to outlive it (the contexts and the standby are spared). An
	// interpreter under the no-spawn filter cannot have started anything: fork, vfork, clone
	// without CLONE_THREAD and clone3 fail for it and for its threads, the filter is installed
	// before its first line of code and cannot be removed, and every other process of the sandbox
	// that code reaches (other contexts, fresh runs, the standby) is under the same filter, as
	// allow_spawn is the sandbox's. The scan of /proc is then skipped; the driver's straggler
	// check on the host still lists the sandbox's cgroups after every run.
	if !spawnless {
		a.killRun(0)
	}
	if err := pyrunner.EmptyDir(pyrunner.WorkDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("emptying the working directory", "err", err)
	}

	deadline := time.Now().Add(drainTimeout)
	for _, f := range []*os.File{outR, errR, resR} {
		f.SetReadDeadline(deadline)
	}
	codeW.SetWriteDeadline(deadline)
	wg.Wait()

	res.DurationUS = end.Sub(start).Microseconds()
	res.CPUUS = contextCPU(ticks1-ticks0, selfUS+childUS-c.lastCPU, ok)
	if ok {
		c.lastCPU = selfUS + childUS
	} else {
		c.lastCPU = 0
	}
	res.MaxRSSBytes = hwm
	res.Stdout, res.StdoutTruncated = stdout.buf, stdout.truncated
	res.Stderr, res.StderrTruncated = stderr.buf, stderr.truncated
	if len(resultDoc) > 0 {
		parseResultDoc(a.log, resultDoc, res)
	}
	return res
}

// dropLaunchedStandby discards the standby if the agent launched it: a launched process is
// dumpable from its exec, so a context's run (same uid) could write into its memory and the next
// fresh run would start poisoned. One the zygote forked is not dumpable until its run arrives.
func (a *agentServer) dropLaunchedStandby() {
	a.warmMu.Lock()
	p := a.warm
	if p != nil && p.zyg == nil {
		a.warm = nil
	} else {
		p = nil
	}
	a.warmMu.Unlock()
	if p != nil {
		a.discard(p)
	}
}

// parseContextReply reads "D<seq> <exit status> <self µs> <children µs>".
func parseContextReply(r ctxReply, seq uint32) (exit int, self, children int64, ok bool) {
	if r.err != nil || len(r.line) < 9 || r.line[0] != 'D' || string(r.line[1:9]) != fmt.Sprintf("%08x", seq) {
		return 0, 0, 0, false
	}
	f := strings.Fields(string(r.line[9:]))
	if len(f) != 3 {
		return 0, 0, 0, false
	}
	e, err1 := strconv.Atoi(f[0])
	s, err2 := strconv.ParseInt(f[1], 10, 64)
	c, err3 := strconv.ParseInt(f[2], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || s < 0 || c < 0 {
		return 0, 0, 0, false
	}
	return e, s, c, true
}

// contextCPU is a context run's CPU time in µs. The kernel's count (clock ticks of the
// interpreter and its reaped children, /proc) cannot be faked but is coarse (10 ms); the
// interpreter's own (rusage, µs) is fine but comes from the code's process. The own figure is
// taken when it agrees with the kernel's within two ticks; otherwise the kernel's.
func contextCPU(ticks int64, reported int64, ok bool) int64 {
	tick := int64(1e6) / clockTicks
	kernel := ticks * tick
	if ok && reported >= 0 && reported >= kernel-2*tick && reported <= kernel+2*tick {
		return reported
	}
	return max(kernel, 0)
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times (100 on Linux).
const clockTicks = 100

// procStat returns the fields of /proc/<pid>/stat after the command's ")": state(0) ppid pgrp
// session tty tpgid flags minflt cminflt majflt cmajflt utime(11) stime cutime cstime …
func procStat(pid int) ([]string, error) {
	b, err := pseudofs.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, errors.New("unreadable stat")
	}
	return strings.Fields(string(b[i+1:])), nil
}

// procCPUTicks returns utime+stime+cutime+cstime of process pid, in clock ticks.
func procCPUTicks(pid int) (int64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	if len(f) < 15 {
		return 0, errors.New("short stat")
	}
	var sum int64
	for _, x := range f[11:15] {
		v, err := strconv.ParseInt(x, 10, 64)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}

// procHWM returns the peak RSS (VmHWM) of process pid in bytes, 0 if unknown.
func procHWM(pid int) int64 {
	b, err := pseudofs.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}

// exitStatus is the exit code (128+signal when killed) and signal of a wait status.
func exitStatus(ws unix.WaitStatus) (int, int) {
	switch {
	case ws.Exited():
		return ws.ExitStatus(), 0
	case ws.Signaled():
		return 128 + int(ws.Signal()), int(ws.Signal())
	}
	return -1, 0
}

// keepPIDs are the processes the kill after a run spares: the contexts' interpreters and the
// next run's standby.
func (a *agentServer) keepPIDs() map[int]bool {
	keep := map[int]bool{}
	for _, pid := range a.contextPIDs() {
		keep[pid] = true
	}
	a.warmMu.Lock()
	if a.warm != nil {
		keep[a.warm.pid] = true
	}
	a.warmMu.Unlock()
	return keep
}

// killAllBut kills every process it may see but the agent and keep (as PID 1: all of the
// sandbox's; otherwise those in the process groups of keep's processes, which are what their
// runs started) until none is left or killTimeout has passed. A zombie whose parent is kept is
// left to that parent (a context reaps its children before its next run).
func (a *agentServer) killAllBut(keep map[int]bool) {
	deadline := time.Now().Add(killTimeout)
	self := os.Getpid()
	for {
		left := 0
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == self || keep[pid] {
				continue
			}
			state, ppid, pgrp, ok := procState(pid)
			if !ok || (state == 'Z' && keep[ppid]) {
				continue
			}
			if !a.pid1 && !keep[pgrp] {
				continue
			}
			if state == 'Z' && ppid == self {
				left++ // the reaper is on it
				continue
			}
			if err := unix.Kill(pid, unix.SIGKILL); err == nil || err == unix.EPERM {
				left++
			}
		}
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			a.log.Error("processes of the run survive SIGKILL", "after", killTimeout, "left", left)
			return
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// procState reads process pid's state, parent and process group from /proc.
func procState(pid int) (state byte, ppid, pgrp int, ok bool) {
	f, err := procStat(pid)
	if err != nil || len(f) < 3 || len(f[0]) != 1 {
		return 0, 0, 0, false
	}
	ppid, _ = strconv.Atoi(f[1])
	pgrp, _ = strconv.Atoi(f[2])
	return f[0][0], ppid, pgrp, true
}
