package main

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
)

//go:embed runner.py
var runnerSource string

// bootstrap is Python's -c program: it reads argv[1] bytes of runner source from fd 3 and runs
// them; the runner then reads the user code from the rest of fd 3. (Passing the runner itself
// with -c would put all of it in every process listing.)
const bootstrap = `import os, sys
n = int(sys.argv[1]); b = b""
while len(b) < n:
    c = os.read(3, n - len(b))
    if not c: raise SystemExit("sandbox-agent: short runner")
    b += c
del n, c
exec(compile(b, "<sandbox-runner>", "exec"))
`

const (
	killTimeout  = 2 * time.Second // to wait for every process of a run to be gone after SIGKILL
	drainTimeout = 2 * time.Second // to read what is left in the pipes once the processes are gone
	chunkSize    = 32 << 10        // max bytes of one stdout/stderr event
)

var baseEnv = map[string]string{
	"PATH":                    "/usr/local/bin:/usr/bin:/bin",
	"HOME":                    "/tmp",
	"LANG":                    "C.UTF-8",
	"PYTHONDONTWRITEBYTECODE": "1",
	"PYTHONUNBUFFERED":        "1",
}

// run executes one request and returns its result; output chunks go to s as they arrive.
func (a *agentServer) run(req *agent.RunRequest, s *sender) *agent.RunResult {
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
	dir := "/"
	if st, err := os.Stat("/tmp"); err == nil && st.IsDir() {
		dir = "/tmp"
	}

	// Descriptors of the launcher (and then Python): see launch.go.
	var parentEnds, childEnds []*os.File
	defer func() {
		for _, f := range append(parentEnds, childEnds...) {
			f.Close()
		}
	}()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		res.AgentError = "open /dev/null: " + err.Error()
		return res
	}
	childEnds = append(childEnds, devnull)
	pipe := func(childReads bool) (parent, child *os.File, err error) {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, nil, err
		}
		if childReads {
			parent, child = w, r
		} else {
			parent, child = r, w
		}
		parentEnds = append(parentEnds, parent)
		childEnds = append(childEnds, child)
		return parent, child, nil
	}
	var files [6]*os.File
	var parents [6]*os.File
	files[0] = devnull
	for fd := 1; fd <= 5; fd++ {
		p, c, err := pipe(fd == 3)
		if err != nil {
			res.AgentError = "pipe: " + err.Error()
			return res
		}
		parents[fd], files[fd] = p, c
	}
	outR, errR, codeW, resR, statusR := parents[1], parents[2], parents[3], parents[4], parents[5]
	fds := make([]uintptr, len(files))
	for i, f := range files {
		fds[i] = f.Fd() // also puts the child's ends in blocking mode
	}

	spawn := "0"
	if req.AllowSpawn {
		spawn = "1"
	}
	argv := []string{"sandbox-agent", launchCommand, spawn, a.python,
		a.python, "-I", "-u", "-B", "-c", bootstrap, strconv.Itoa(len(runnerSource)), strconv.Itoa(maxOut)}
	attr := &syscall.ProcAttr{
		Dir:   dir,
		Env:   env,
		Files: fds,
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL},
	}
	start := time.Now()
	pid, exited, err := a.reaper.start(func() (int, error) {
		return syscall.ForkExec("/proc/self/exe", argv, attr)
	})
	for _, f := range childEnds {
		f.Close()
	}
	childEnds = nil
	if err != nil {
		res.AgentError = "starting the launcher: " + err.Error()
		return res
	}

	var wg sync.WaitGroup
	wg.Add(5)
	go func() {
		defer wg.Done()
		// Writes fail only if Python is gone.
		if _, err := io.WriteString(codeW, runnerSource); err == nil {
			io.WriteString(codeW, req.Code)
		}
		codeW.Close()
	}()
	stdout := &capture{typ: "stdout", max: maxOut}
	stderr := &capture{typ: "stderr", max: maxOut}
	go func() { defer wg.Done(); stdout.drain(outR, s) }()
	go func() { defer wg.Done(); stderr.drain(errR, s) }()
	var resultDoc, status []byte
	go func() { defer wg.Done(); resultDoc = readCapped(resR, int64(maxOut)+1<<20) }()
	go func() { defer wg.Done(); status = readCapped(statusR, 64<<10) }()

	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	var ex exitInfo
	select {
	case ex = <-exited:
	case <-timeout:
		res.TimedOut = true
		a.killRun(pid)
		ex = <-exited
	case <-s.gone:
		log.Printf("host closed the connection; killing the run")
		a.killRun(pid)
		ex = <-exited
	case <-s.broken:
		log.Printf("writing to the host failed; killing the run")
		a.killRun(pid)
		ex = <-exited
	}
	a.killRun(pid) // whatever the run started is not to outlive it

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
	switch ws := ex.status; {
	case res.TimedOut:
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	case ws.Exited():
		res.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		res.Signal = int(ws.Signal())
		res.ExitCode = 128 + res.Signal
	}
	res.Stdout, res.StdoutTruncated = stdout.buf, stdout.truncated
	res.Stderr, res.StderrTruncated = stderr.buf, stderr.truncated
	if len(status) > 0 {
		res.AgentError = "launcher: " + string(status)
		return res
	}
	if len(resultDoc) > 0 {
		var doc struct {
			Result json.RawMessage `json:"result"`
			Error  *agent.PyError  `json:"error"`
		}
		if err := json.Unmarshal(resultDoc, &doc); err != nil {
			log.Printf("unreadable result document (%d bytes): %v", len(resultDoc), err)
		} else {
			if len(doc.Result) > 0 && string(doc.Result) != "null" {
				res.Result = doc.Result
			}
			res.Error = doc.Error
		}
	}
	return res
}

// killRun kills the run's processes with SIGKILL: as PID 1 every other process of the sandbox
// (kill(-1)), otherwise the run's process group. It returns once the agent has no children left
// (everything the run started is dead and reaped; orphans come to the agent as PID 1 or
// subreaper), or after killTimeout.
func (a *agentServer) killRun(pgid int) {
	deadline := time.Now().Add(killTimeout)
	for {
		var err error
		if a.pid1 {
			err = unix.Kill(-1, unix.SIGKILL)
		} else {
			err = unix.Kill(-pgid, unix.SIGKILL)
		}
		if err != nil && err != unix.ESRCH && err != unix.EPERM {
			log.Printf("kill: %v", err)
		}
		var info unix.Siginfo
		if werr := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); werr == unix.ECHILD {
			return
		}
		if err == unix.ESRCH && !a.pid1 {
			return // the group is gone; other children are not the run's process group
		}
		if time.Now().After(deadline) {
			log.Printf("processes of the run survive %v after SIGKILL", killTimeout)
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

// readCapped reads f to EOF (or error), keeping at most max bytes; nil if there were more.
func readCapped(f *os.File, max int64) []byte {
	b, _ := io.ReadAll(io.LimitReader(f, max+1))
	if int64(len(b)) > max {
		io.Copy(io.Discard, f)
		log.Printf("result document over %d bytes; dropped", max)
		return nil
	}
	return b
}

func buildEnv(extra map[string]string) ([]string, error) {
	m := make(map[string]string, len(baseEnv)+len(extra))
	for k, v := range baseEnv {
		m[k] = v
	}
	for k, v := range extra {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return nil, fmt.Errorf("invalid environment variable %q", k)
		}
		m[k] = v
	}
	env := make([]string, 0, len(m))
	for k, v := range m {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env, nil
}
