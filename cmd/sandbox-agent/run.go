package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// runnerSource is the runner every run executes (package pyrunner).
var runnerSource = pyrunner.Source

// bootstrap is Python's -c program: it reads the runner from fd 3 — argv[1] is "<kind><length>":
// kind "s" source it compiles, "d" source it compiles and whose code object it then writes to fd
// 7 with marshal (and closes fd 7), "c" such a code object it loads — then waits for the run: a
// block "<8 hex digits: length>K=V\0K=V\0…" with the run's environment, which replaces
// os.environ, after which it runs the runner, which reads the user code from the rest of fd 3. The
// agent starts the next run's process as soon as a run ends, so a run finds its Python started and
// waiting (a fresh process per run all the same). (Passing the runner itself with -c would put all
// of it in every process listing.)
const bootstrap = bootstrapRead + bootstrapLoad + bootstrapRun

// bootstrapRead defines _rd(n): n bytes from fd 3 (exit 0 at its end).
const bootstrapRead = `import os, sys
def _rd(n):
    b = b""
    while len(b) < n:
        c = os.read(3, n - len(b))
        if not c: raise SystemExit(0)
        b += c
    return b
`

// bootstrapLoad reads the runner into _r (the launched processes only).
const bootstrapLoad = `_k, sys.argv[1] = sys.argv[1][0], sys.argv[1][1:]
_r = _rd(int(sys.argv[1]))
if _k == "c":
    import marshal
    _r = marshal.loads(_r)
else:
    _r = compile(_r, "<sandbox-runner>", "exec")
if _k == "d":
    import marshal
    _w = marshal.dumps(_r)
    try:
        while _w:
            _w = _w[os.write(7, _w):]
    except OSError:
        pass
    os.close(7)
    del _w
`

// bootstrapRun is the end of every run process's start, launched or forked by the zygote: it
// reads the run's environment block from fd 3, makes it os.environ, and runs the runner _r. A
// process forked by the zygote has _zenv, the block the zygote's own os.environ holds: a run
// whose block is the same keeps it (most runs: rebuilding os.environ writes to dozens of pages
// the zygote shares with it, each a copy-on-write fault, ~30 µs apiece on these VMs), and
// _sandbox_dumpable, which makes it dumpable (as a launched process is) now that its run is here:
// idle, it is not (see zygote.py). A context's interpreter turns it on for its runs only (runner.py).
const bootstrapRun = `_e = _rd(int(_rd(8), 16))
if "_sandbox_dumpable" in globals() and "_sandbox_context_fd" not in globals():
    _sandbox_dumpable(1)
if _e != globals().get("_zenv"):
    os.environ.clear()
    for _kv in _e.split(b"\0")[:-1]:
        _k, _, _v = _kv.partition(b"=")
        os.environb[_k] = _v
    del _kv, _k, _v
del _rd, _e
exec(_r)
`

const (
	killTimeout  = 2 * time.Second // to wait for every process of a run to be gone after SIGKILL
	drainTimeout = 2 * time.Second // to read what is left in the pipes once the processes are gone
	chunkSize    = 32 << 10        // max bytes of one stdout/stderr event
)

// proc is a started run process (the launcher, then Python waiting on fd 3 for its run) with the
// agent's ends of its descriptors.
type proc struct {
	pid                              int
	exited                           <-chan exitInfo
	allowSpawn                       bool
	maxOut                           int
	runnerSent                       chan struct{} // closed once the runner is in the code pipe
	dumped                           chan struct{} // kind "d": closed once the compiled runner is read (nil: other kinds)
	zyg                              *zygote       // the zygote that forked it (nil: launched by the agent)
	outR, errR, codeW, resR, statusR *os.File
	calls                            *os.File // the agent's end of the run's agent channel (pollable)
}

func (p *proc) close() {
	for _, f := range []*os.File{p.outR, p.errR, p.codeW, p.resR, p.statusR, p.calls} {
		f.Close()
	}
}

// spawn starts a run process: the launcher with descriptors 0 /dev/null, 1 stdout, 2 stderr,
// 3 code, 4 result, 5 status (see launch.go), 6 the agent channel (pyrunner.AgentFD), which
// execs Python with the bootstrap; Python compiles the runner and waits for the run on fd 3.
func (a *agentServer) spawn(allowSpawn bool, maxOut int) (*proc, error) {
	return a.spawnHow(allowSpawn, maxOut, true)
}

// spawnHow is spawn; with launch false it only forks from the zygote (and fails without one).
func (a *agentServer) spawnHow(allowSpawn bool, maxOut int, launch bool) (*proc, error) {
	var parents, children []*os.File
	fail := func(err error) (*proc, error) {
		for _, f := range append(parents, children...) {
			f.Close()
		}
		return nil, err
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fail(fmt.Errorf("open /dev/null: %w", err))
	}
	children = append(children, devnull)
	for fd := 1; fd <= 5; fd++ {
		r, w, err := os.Pipe()
		if err != nil {
			return fail(fmt.Errorf("pipe: %w", err))
		}
		if fd == 3 {
			parents, children = append(parents, w), append(children, r)
		} else {
			parents, children = append(parents, r), append(children, w)
		}
	}
	calls, callsChild, err := agentChannel()
	if err != nil {
		return fail(err)
	}
	parents, children = append(parents, calls), append(children, callsChild)
	if z := a.zyg; z != nil && z.alive() {
		fds := make([]int, len(children))
		for i, f := range children {
			fds[i] = int(f.Fd())
		}
		pid, exited, err := z.fork(allowSpawn, maxOut, fds)
		if err == nil {
			for _, f := range children {
				f.Close()
			}
			sent := make(chan struct{})
			close(sent) // the zygote has the runner
			return &proc{pid: pid, exited: exited, allowSpawn: allowSpawn, maxOut: maxOut, runnerSent: sent, zyg: z,
				outR: parents[0], errR: parents[1], codeW: parents[2], resR: parents[3], statusR: parents[4], calls: parents[5]}, nil
		}
		if !launch {
			return fail(err)
		}
		a.log.Warn("forking from the zygote failed: launching the run instead", "err", err)
	}
	if !launch {
		return fail(errors.New("no zygote"))
	}
	// The runner: compiled once by the first process, which hands its code object back on fd 7,
	// and loaded by the next ones (compiling costs ~1.3 ms of CPU per run, loading ~0.02 ms).
	kind, runner := "s", []byte(runnerSource)
	var dumpR *os.File
	a.runnerMu.Lock()
	switch {
	case a.runnerCode != nil:
		kind, runner = "c", a.runnerCode
	case !a.dumping:
		r, w, err := os.Pipe()
		if err != nil {
			a.runnerMu.Unlock()
			return fail(fmt.Errorf("pipe: %w", err))
		}
		kind, dumpR, a.dumping = "d", r, true
		children = append(children, w)
	}
	a.runnerMu.Unlock()
	fds := make([]uintptr, len(children))
	for i, f := range children {
		fds[i] = f.Fd() // also puts the child's ends in blocking mode
	}
	spawn := "0"
	if allowSpawn {
		spawn = "1"
	}
	argv := []string{"sandbox-agent", launchCommand, spawn, a.python,
		a.python, "-I", "-u", "-B", "-c", bootstrap, kind + strconv.Itoa(len(runner)), strconv.Itoa(maxOut)}
	env, _ := buildEnv(nil)
	env = append(env, launcherGOMAXPROCS) // the launcher's own; it unsets it before exec
	dir := runDir()
	attr := &syscall.ProcAttr{
		Dir: dir, Env: env, Files: fds,
		Sys: &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL},
	}
	pid, exited, err := a.reaper.start(func() (int, error) {
		return syscall.ForkExec("/proc/self/exe", argv, attr)
	})
	if err != nil {
		if dumpR != nil {
			dumpR.Close()
			a.runnerMu.Lock()
			a.dumping = false
			a.runnerMu.Unlock()
		}
		return fail(fmt.Errorf("starting the launcher: %w", err))
	}
	for _, f := range children {
		f.Close()
	}
	p := &proc{pid: pid, exited: exited, allowSpawn: allowSpawn, maxOut: maxOut, runnerSent: make(chan struct{}),
		outR: parents[0], errR: parents[1], codeW: parents[2], resR: parents[3], statusR: parents[4], calls: parents[5]}
	// The runner goes first; the pipe holds it while Python starts.
	go func() {
		defer close(p.runnerSent)
		if _, err := p.codeW.Write(runner); err != nil {
			a.log.Warn("writing the runner", "err", err)
		}
	}()
	if dumpR != nil {
		p.dumped = make(chan struct{})
		go a.readCompiled(dumpR, p.dumped)
	}
	return p, nil
}

// readCompiled reads the compiled runner a kind-"d" process writes to fd 7 (the bootstrap closes
// its end before it reads the run, so what arrives here was written before any user code ran) and
// keeps it for the next processes. If none arrives, the next process compiles and dumps again.
func (a *agentServer) readCompiled(r *os.File, done chan<- struct{}) {
	defer close(done)
	defer r.Close()
	code, err := io.ReadAll(io.LimitReader(r, maxCompiledRunner+1))
	a.runnerMu.Lock()
	defer a.runnerMu.Unlock()
	a.dumping = false
	if err != nil || len(code) == 0 || len(code) > maxCompiledRunner {
		a.log.Warn("no compiled runner from the first run process: the next one compiles again", "bytes", len(code), "err", err)
		return
	}
	a.runnerCode = code
}

// maxCompiledRunner bounds the compiled runner the agent keeps.
const maxCompiledRunner = 1 << 20

// adoptZygote makes z the zygote runs are forked from (replacing the previous one) and replaces
// the idle pre-started process with one of z's.
func (a *agentServer) adoptZygote(z *zygote) {
	if a.zyg != nil {
		a.zyg.close()
	}
	a.zyg = z
	a.warmMu.Lock()
	old := a.warm
	a.warmMu.Unlock()
	if old != nil {
		a.prestart(old.allowSpawn, old.maxOut)
	}
}

// prestart starts the next run's process now (after a run has ended and its processes are
// gone; the fork is quick, Python's start-up goes on in the background) and returns its pid. The
// next run takes it if it fits.
func (a *agentServer) prestart(allowSpawn bool, maxOut int) int {
	return a.prestartHow(allowSpawn, maxOut, true)
}

// prestartHow is prestart; with launch false only from the zygote (see spawnHow).
func (a *agentServer) prestartHow(allowSpawn bool, maxOut int, launch bool) int {
	p, err := a.spawnHow(allowSpawn, maxOut, launch)
	if err != nil {
		a.log.Warn("pre-starting a run process", "err", err)
		return 0
	}
	a.warmMu.Lock()
	old := a.warm
	a.warm = p
	a.warmMu.Unlock()
	if old != nil {
		a.discard(old)
	}
	return p.pid
}

// take returns the pre-started process if it fits and is alive, else starts one. A process
// forked by a zygote that is gone is not used: it lives on, but its parent is now outside the
// sandbox (the reaper of the zygote's PID namespace), so its end could not be observed — the
// agent would report the run killed while its code still ran.
func (a *agentServer) take(allowSpawn bool, maxOut int) (*proc, error) {
	a.warmMu.Lock()
	p := a.warm
	a.warm = nil
	a.warmMu.Unlock()
	if p != nil {
		select {
		case ex := <-p.exited: // died while waiting (e.g. killed): not usable
			a.log.Warn("pre-started run process ended while idle", "pid", p.pid, "status", ex.status)
			p.close()
		default:
			switch {
			case p.zyg != nil && !p.zyg.alive():
				a.log.Info("the zygote that forked the pre-started run process is gone: launching the run instead", "pid", p.pid)
				a.discard(p)
			case p.allowSpawn == allowSpawn && p.maxOut == maxOut:
				return p, nil
			default:
				a.discard(p)
			}
		}
	}
	return a.spawn(allowSpawn, maxOut)
}

// discard kills an unused process.
func (a *agentServer) discard(p *proc) {
	unix.Kill(-p.pid, unix.SIGKILL)
	<-p.exited
	p.close()
}

// run executes one request and returns its result; output chunks and agent calls go to s as they
// arrive, the host's answers to the calls come from answers.
func (a *agentServer) run(req *agent.RunRequest, s *sender, answers <-chan []byte) *agent.RunResult {
	res := &agent.RunResult{ExitCode: -1}
	maxOut := req.MaxOutput
	if maxOut <= 0 {
		maxOut = agent.DefaultMaxOutput
	}
	env, err := buildEnv(req.Env)
	if err != nil {
		res.AgentError = err.Error()
		return res
	}
	p, err := a.take(req.AllowSpawn, maxOut)
	if err != nil {
		res.AgentError = err.Error()
		return res
	}
	defer p.close()
	pid, exited := p.pid, p.exited
	outR, errR, codeW, resR, statusR := p.outR, p.errR, p.codeW, p.resR, p.statusR
	start := time.Now()
	header := envHeader(env)

	var wg sync.WaitGroup
	runEnd := make(chan struct{})
	var callsDone sync.WaitGroup
	callsDone.Add(1)
	go func() { defer callsDone.Done(); a.serveCalls(p.calls, req.Agent, s, answers, runEnd) }()
	defer func() {
		// No call event may follow the exit event: the channel's server is gone before it.
		close(runEnd)
		p.calls.Close()
		callsDone.Wait()
	}()
	wg.Add(5)
	go func() {
		defer wg.Done()
		// Writes fail only if Python is gone. The runner source was written at spawn.
		<-p.runnerSent
		if p.dumped != nil {
			<-p.dumped // the compiled runner is in before the code goes in (or Python is gone)
		}
		if _, err := io.WriteString(codeW, header); err == nil {
			io.WriteString(codeW, req.Code)
		}
		codeW.Close()
	}()
	stdout := &capture{typ: "stdout", max: maxOut}
	stderr := &capture{typ: "stderr", max: maxOut}
	go func() { defer wg.Done(); stdout.drain(outR, s) }()
	go func() { defer wg.Done(); stderr.drain(errR, s) }()
	var resultDoc, status []byte
	go func() { defer wg.Done(); resultDoc = readCapped(a.log, "result document", resR, resultDocCap(maxOut)) }()
	go func() { defer wg.Done(); status = readCapped(a.log, "launcher status", statusR, 64<<10) }()

	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	var ex exitInfo
	hostGone := false
	select {
	case ex = <-exited:
	case <-timeout:
		res.TimedOut = true
		a.killRun(pid)
		ex = <-exited
	case <-s.gone:
		a.log.Info("host closed the connection: killing the run")
		hostGone = true
		a.killRun(pid)
		ex = <-exited
	case <-s.broken:
		a.log.Warn("writing to the host failed: killing the run")
		hostGone = true
		a.killRun(pid)
		ex = <-exited
	}
	a.killRun(pid) // whatever the run started is not to outlive it
	// The next run starts in an empty working directory (its standby, started below, is there).
	if err := pyrunner.EmptyDir(pyrunner.WorkDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("emptying the working directory", "err", err)
	}
	switch {
	case hostGone:
		// The host learns the standby's PID from this result; a host that went away (a
		// cancelled run) would take it for a leftover of the run, so the next run starts its own.
	case a.zyg != nil && a.zyg.alive():
		// The host tells the zygote's children from a run's processes without their PID: the
		// standby is forked once the host has the answer.
		a.afterExit = func() { a.prestartHow(req.AllowSpawn, maxOut, false) }
	default:
		res.StandbyPID = a.prestart(req.AllowSpawn, maxOut)
	}

	deadline := time.Now().Add(drainTimeout)
	for _, f := range []*os.File{outR, errR, resR, statusR} {
		f.SetReadDeadline(deadline)
	}
	codeW.SetWriteDeadline(deadline)
	wg.Wait()

	res.DurationUS = ex.at.Sub(start).Microseconds()
	ru := &ex.rusage
	res.CPUUS = ru.Utime.Sec*1e6 + ru.Utime.Usec + ru.Stime.Sec*1e6 + ru.Stime.Usec
	res.MaxRSSBytes = ru.Maxrss * 1024
	if res.TimedOut {
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	} else {
		res.ExitCode, res.Signal = exitStatus(ex.status)
	}
	res.Stdout, res.StdoutTruncated = stdout.buf, stdout.truncated
	res.Stderr, res.StderrTruncated = stderr.buf, stderr.truncated
	if len(status) > 0 {
		res.AgentError = "launcher: " + string(status)
		return res
	}
	if len(resultDoc) > 0 {
		parseResultDoc(a.log, resultDoc, res)
	}
	return res
}

// resultDocCap bounds a runner's report: the result's JSON (at most maxOut bytes), the error, and
// the rich outputs (pyrunner.MaxReportExtra). A larger report is dropped whole.
func resultDocCap(maxOut int) int64 { return int64(maxOut) + 1<<20 + pyrunner.MaxReportExtra }

// parseResultDoc sets res's Result and Error from the runner's result document.
func parseResultDoc(log *slog.Logger, resultDoc []byte, res *agent.RunResult) {
	rep, err := pyrunner.ParseReport(resultDoc)
	if err != nil {
		log.Warn("unreadable result document", "bytes", len(resultDoc), "err", err)
		return
	}
	if len(rep.Result) > 0 {
		res.Result = rep.Result
	}
	res.Error = (*agent.PyError)(rep.Error)
	res.Rich = rep.Rich
}

// killRun kills the run's processes with SIGKILL: as PID 1 every other process of the sandbox
// (kill(-1)), otherwise the run's process group. It returns once the agent has no children left
// (everything the run started is dead and reaped; orphans come to the agent as PID 1 or
// subreaper), or after killTimeout. While code contexts live (or for a context's run, pgid 0) it
// spares their interpreters and the standby instead (killAllBut).
func (a *agentServer) killRun(pgid int) {
	if len(a.contexts) > 0 && (a.pid1 || pgid == 0) {
		a.killAllBut(a.keepPIDs())
		return
	}
	if pgid == 0 {
		return
	}
	deadline := time.Now().Add(killTimeout)
	for {
		var err error
		if a.pid1 {
			err = unix.Kill(-1, unix.SIGKILL)
		} else {
			err = unix.Kill(-pgid, unix.SIGKILL)
		}
		if err != nil && err != unix.ESRCH && err != unix.EPERM {
			a.log.Warn("kill", "err", err)
		}
		var info unix.Siginfo
		if werr := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); werr == unix.ECHILD {
			return
		}
		if err == unix.ESRCH && !a.pid1 {
			return // the group is gone; other children are not the run's process group
		}
		if time.Now().After(deadline) {
			a.log.Error("processes of the run survive SIGKILL", "after", killTimeout)
			return
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// capture keeps the first max bytes of a stream, sends them to the host as they arrive, and
// drains (and drops) the rest.
type capture struct {
	typ       string
	max       int
	buf       []byte
	truncated bool
}

func (c *capture) drain(f *os.File, s *sender) {
	b := make([]byte, chunkSize)
	for {
		n, err := f.Read(b)
		if n > 0 {
			take := min(n, c.max-len(c.buf))
			if take > 0 {
				c.buf = append(c.buf, b[:take]...)
				s.output(c.typ, b[:take])
			}
			if take < n {
				c.truncated = true
			}
		}
		if err != nil {
			return
		}
	}
}

// readCapped reads f (what it holds: what) to EOF (or error), keeping at most max bytes; nil if
// there were more.
func readCapped(log *slog.Logger, what string, f *os.File, max int64) []byte {
	b, _ := io.ReadAll(io.LimitReader(f, max+1))
	if int64(len(b)) > max {
		io.Copy(io.Discard, f)
		log.Warn("over its cap: dropped", "what", what, "max_bytes", max)
		return nil
	}
	return b
}

func buildEnv(extra map[string]string) ([]string, error) { return pyrunner.Env(nil, extra) }

// envHeader is the environment block the bootstrap (and a context) reads before the code:
// "<8 hex digits: length>K=V\0K=V\0…".
func envHeader(env []string) string {
	var b strings.Builder
	for _, kv := range env {
		b.WriteString(kv)
		b.WriteByte(0)
	}
	return fmt.Sprintf("%08x", b.Len()) + b.String()
}

// runDir is the working directory of runs: pyrunner.WorkDir (the driver mounts it), else /tmp,
// else / (a sandbox without them: tests on a host).
func runDir() string {
	for _, d := range []string{pyrunner.WorkDir, "/tmp"} {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d
		}
	}
	return "/"
}
