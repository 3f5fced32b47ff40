package agent_test

// These tests build cmd/sandbox-agent, start it as an ordinary process (not PID 1) with its
// listening socket (agent.Listen, in a temporary directory) and /usr/bin/python3, and drive it
// with the client. One test
// (TestPID1) runs it as PID 1 of a new pid namespace; it needs root.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

const python = "/usr/bin/python3"

var agentBin string // built by TestMain

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if _, err := os.Stat(python); err != nil {
		fmt.Fprintf(os.Stderr, "agent tests need %s: %v\n", python, err)
		if os.Getenv("CI") != "" {
			return 1
		}
		return 0
	}
	dir, err := os.MkdirTemp("", "agent-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755) // TestPID1 runs the binary as another uid
	agentBin = filepath.Join(dir, "sandbox-agent")
	cmd := exec.Command("go", "build", "-o", agentBin, "github.com/sandboxd/sandboxd/cmd/sandbox-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building sandbox-agent: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// startAgent starts the agent on the host and returns its socket path once it is ready.
func startAgent(t *testing.T, args ...string) string {
	t.Helper()
	sock, ln := listen(t, t.TempDir())
	var logs bytes.Buffer
	cmd := exec.Command(agentBin, append([]string{"--python", python}, args...)...)
	cmd.Stderr = &syncWriter{w: &logs}
	cmd.ExtraFiles = []*os.File{ln}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := cmd.Start()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := agent.WaitReady(ctx, sock); err != nil {
		t.Fatal(err)
	}
	return sock
}

// listen binds the agent's socket in dir and returns its path and the listening file.
func listen(t *testing.T, dir string) (string, *os.File) {
	t.Helper()
	sock := filepath.Join(dir, agent.SocketName)
	ln, err := agent.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	return sock, ln
}

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func run(t *testing.T, sock string, req agent.RunRequest) agent.RunResult {
	t.Helper()
	if req.TimeoutMS == 0 {
		req.TimeoutMS = 10000
	}
	if req.MaxOutput == 0 {
		req.MaxOutput = 1 << 20
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := agent.Run(ctx, sock, req, nil, nil)
	if err != nil {
		t.Fatalf("Run(%q): %v", req.Code, err)
	}
	if res.AgentError != "" {
		t.Fatalf("Run(%q): agent error: %s", req.Code, res.AgentError)
	}
	return res
}

func TestRuns(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	tests := []struct {
		name     string
		code     string
		env      map[string]string
		exit     int
		signal   int
		stdout   string // exact, unless "*"
		stderr   string // substring
		result   string // JSON, compared semantically; "" means absent
		resultRe string // prefix of a string result
		errType  string
		errMsg   string
		errTB    []string // substrings of the traceback
	}{
		{name: "print", code: "print(1)", stdout: "1\n"},
		{name: "result int", code: "result = 6*7", result: "42"},
		{name: "result dict", code: `result = {"a": [1, 2]}`, result: `{"a": [1, 2]}`},
		{name: "result str", code: `result = "héllo\n"`, result: `"héllo\n"`},
		{name: "result repr", code: "result = object()", resultRe: "<object object at 0x"},
		{name: "result nan is repr", code: "result = float('nan')", result: `"nan"`},
		{name: "result none", code: "result = None"},
		{name: "zero division", code: "x = 1\n1/0", exit: 1, errType: "ZeroDivisionError", errMsg: "division by zero",
			errTB: []string{"Traceback (most recent call last)", `File "<run>", line 2, in <module>`, "1/0"}, stderr: "ZeroDivisionError: division by zero"},
		{name: "nested frames", code: "def f():\n    raise ValueError('bad')\nf()", exit: 1, errType: "ValueError", errMsg: "bad",
			errTB: []string{`File "<run>", line 3, in <module>`, `File "<run>", line 2, in f`}},
		{name: "syntax error", code: "print(1)\n1 +", exit: 1, errType: "SyntaxError", errMsg: "invalid syntax",
			errTB: []string{`File "<run>", line 2`}, stdout: ""},
		{name: "exit 3", code: "import sys; sys.exit(3)", exit: 3},
		{name: "exit 0", code: "import sys; print('a'); sys.exit(0)", stdout: "a\n"},
		{name: "exit message", code: "import sys; sys.exit('bye')", exit: 1, stderr: "bye"},
		{name: "keyboard interrupt", code: "raise KeyboardInterrupt", exit: 130, signal: 2, errType: "KeyboardInterrupt"},
		{name: "result with error", code: "result = 5\nraise RuntimeError('x')", exit: 1, result: "5", errType: "RuntimeError", errMsg: "x"},
		{name: "stderr", code: "import sys; sys.stderr.write('oops\\n'); print('out')", stdout: "out\n", stderr: "oops\n"},
		{name: "env and cwd", code: "import os; print(os.environ['FOO'], os.environ['HOME'], os.getcwd(), os.environ['LANG'], __name__)",
			env: map[string]string{"FOO": "bar baz"}, stdout: "bar baz /tmp /tmp C.UTF-8 __main__\n"},
		{name: "main module", code: "import sys, __main__\nx = 1\nresult = [__main__.x, sys.modules['__main__'].__dict__ is globals()]", result: "[1, true]"},
		{name: "user exception class", code: "class MyErr(Exception): pass\nraise MyErr('m')", exit: 1, errType: "MyErr", errMsg: "m"},
		{name: "threads join at exit", code: "import threading, time\ndef f():\n    time.sleep(0.1); print('thread')\nthreading.Thread(target=f).start()", stdout: "thread\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := run(t, sock, agent.RunRequest{Code: tc.code, Env: tc.env})
			if res.ExitCode != tc.exit || res.Signal != tc.signal {
				t.Errorf("exit %d signal %d, want %d %d (stderr %q)", res.ExitCode, res.Signal, tc.exit, tc.signal, res.Stderr)
			}
			if tc.stdout != "*" && string(res.Stdout) != tc.stdout {
				t.Errorf("stdout %q, want %q", res.Stdout, tc.stdout)
			}
			if !strings.Contains(string(res.Stderr), tc.stderr) {
				t.Errorf("stderr %q, want it to contain %q", res.Stderr, tc.stderr)
			}
			switch {
			case tc.resultRe != "":
				var s string
				if err := json.Unmarshal(res.Result, &s); err != nil || !strings.HasPrefix(s, tc.resultRe) {
					t.Errorf("result %s, want a string starting %q", res.Result, tc.resultRe)
				}
			case tc.result == "":
				if res.Result != nil {
					t.Errorf("result %s, want none", res.Result)
				}
			default:
				if !jsonEqual(t, res.Result, tc.result) {
					t.Errorf("result %s, want %s", res.Result, tc.result)
				}
			}
			if tc.errType == "" {
				if res.Error != nil {
					t.Errorf("error %+v, want none", res.Error)
				}
				return
			}
			if res.Error == nil {
				t.Fatalf("no error, want %s (stderr %q)", tc.errType, res.Stderr)
			}
			if res.Error.Type != tc.errType || (tc.errMsg != "" && res.Error.Message != tc.errMsg) {
				t.Errorf("error %s: %q, want %s: %q", res.Error.Type, res.Error.Message, tc.errType, tc.errMsg)
			}
			for _, s := range tc.errTB {
				if !strings.Contains(res.Error.Traceback, s) {
					t.Errorf("traceback %q does not contain %q", res.Error.Traceback, s)
				}
			}
			if strings.Contains(res.Error.Traceback, "<string>") {
				t.Errorf("traceback shows the runner's frames: %q", res.Error.Traceback)
			}
		})
	}
}

func jsonEqual(t *testing.T, got json.RawMessage, want string) bool {
	t.Helper()
	if got == nil {
		return false
	}
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Errorf("result %s is not JSON: %v", got, err)
		return false
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	return bytes.Equal(gb, wb)
}

func TestUsage(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	res := run(t, sock, agent.RunRequest{Code: "x = bytearray(50 << 20)\nt = 0\nfor i in range(300000): t += i"})
	if res.DurationUS <= 0 || res.CPUUS <= 0 || res.MaxRSSBytes < 50<<20 {
		t.Errorf("duration %dµs cpu %dµs maxrss %d: want >0, >0, ≥50 MiB", res.DurationUS, res.CPUUS, res.MaxRSSBytes)
	}
}

func TestTimeout(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	// (3 s: time enough, even on a loaded machine, for Python to start and print before the kill)
	res := run(t, sock, agent.RunRequest{Code: "print('start', flush=True)\nwhile True: pass", TimeoutMS: 3000})
	if !res.TimedOut || res.ExitCode != 137 || res.Signal != 9 {
		t.Errorf("timed_out %v exit %d signal %d, want true 137 9", res.TimedOut, res.ExitCode, res.Signal)
	}
	if string(res.Stdout) != "start\n" {
		t.Errorf("stdout %q", res.Stdout)
	}
	// The agent is usable afterwards.
	if res := run(t, sock, agent.RunRequest{Code: "print(2)"}); string(res.Stdout) != "2\n" {
		t.Errorf("next run: stdout %q", res.Stdout)
	}
}

func TestTruncation(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	const max = 1000
	var mu sync.Mutex
	streamed := map[string]int{}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code := "import sys\nfor i in range(200): print('x' * 99)\nsys.stderr.write('e' * 300000)\nprint('end')\nresult = 'r' * 5000"
	res, err := agent.Run(ctx, sock, agent.RunRequest{Code: code, TimeoutMS: 10000, MaxOutput: max}, func(ev agent.Event) {
		mu.Lock()
		streamed[ev.Type] += len(ev.Data)
		mu.Unlock()
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exit %d", res.ExitCode)
	}
	if len(res.Stdout) != max || !res.StdoutTruncated || len(res.Stderr) != max || !res.StderrTruncated {
		t.Errorf("stdout %d bytes (truncated %v), stderr %d bytes (truncated %v); want %d, true each",
			len(res.Stdout), res.StdoutTruncated, len(res.Stderr), res.StderrTruncated, max)
	}
	if want := strings.Repeat(strings.Repeat("x", 99)+"\n", 10); string(res.Stdout) != want {
		t.Errorf("stdout is not the first %d bytes", max)
	}
	if streamed["stdout"] != max || streamed["stderr"] != max {
		t.Errorf("streamed %v, want %d per stream", streamed, max)
	}
	var s string
	if json.Unmarshal(res.Result, &s); !strings.Contains(s, "omitted") {
		t.Errorf("oversized result: %s", res.Result)
	}
	// Exactly at the limit: not truncated.
	res = run(t, sock, agent.RunRequest{Code: "import sys; sys.stdout.write('y' * 1000)", MaxOutput: max})
	if len(res.Stdout) != max || res.StdoutTruncated {
		t.Errorf("at the limit: %d bytes, truncated %v", len(res.Stdout), res.StdoutTruncated)
	}
}

func TestLargeOutput(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	// 1 MiB kept per stream, base64 in the exit event, plus a large result.
	code := "import sys\nsys.stdout.write('o' * (3 << 20))\nsys.stderr.write('e' * (1 << 20))\nresult = ['v' * 1000] * 900"
	res := run(t, sock, agent.RunRequest{Code: code, MaxOutput: 1 << 20})
	if len(res.Stdout) != 1<<20 || !res.StdoutTruncated || len(res.Stderr) != 1<<20 || res.StderrTruncated {
		t.Errorf("stdout %d %v stderr %d %v", len(res.Stdout), res.StdoutTruncated, len(res.Stderr), res.StderrTruncated)
	}
	var r []string
	if err := json.Unmarshal(res.Result, &r); err != nil || len(r) != 900 {
		t.Errorf("result: %v (%d bytes)", err, len(res.Result))
	}
	// 1 MiB of code (more than a pipe buffer).
	res = run(t, sock, agent.RunRequest{Code: "x = '" + strings.Repeat("a", 1<<20) + "'\nresult = len(x)"})
	if string(res.Result) != "1048576" {
		t.Errorf("1 MiB of code: result %s, error %+v", res.Result, res.Error)
	}
}

const spawnProbe = `
import os, subprocess, threading, concurrent.futures
out = {}
try:
    out["subprocess"] = subprocess.run(["true"]).returncode
except PermissionError as e:
    out["subprocess"] = "PermissionError"
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    out["fork"] = "ok"
except PermissionError:
    out["fork"] = "PermissionError"
box = []
th = threading.Thread(target=lambda: box.append(1))
th.start(); th.join()
out["thread"] = box == [1]
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    out["pool"] = sum(ex.map(lambda x: x * x, range(10)))
result = out
`

func TestAllowSpawn(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	for _, tc := range []struct {
		allow bool
		want  string
	}{
		{false, `{"subprocess": "PermissionError", "fork": "PermissionError", "thread": true, "pool": 285}`},
		{true, `{"subprocess": 0, "fork": "ok", "thread": true, "pool": 285}`},
	} {
		t.Run(fmt.Sprintf("allow_spawn=%v", tc.allow), func(t *testing.T) {
			res := run(t, sock, agent.RunRequest{Code: spawnProbe, AllowSpawn: tc.allow})
			if res.Error != nil || !jsonEqual(t, res.Result, tc.want) {
				t.Errorf("result %s error %+v, want %s", res.Result, res.Error, tc.want)
			}
		})
	}
	t.Run("os.system", func(t *testing.T) {
		res := run(t, sock, agent.RunRequest{Code: "import os\nresult = os.system('true')"})
		if string(res.Result) == "0" {
			t.Errorf("os.system worked without allow_spawn")
		}
	})
}

func alive(pid int) bool {
	// Zombies are not alive: the agent (their parent or subreaper) reaps them.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || !bytes.HasPrefix(b[i:], []byte(") Z"))
}

func waitGone(t *testing.T, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				t.Errorf("process %d still alive", pid)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestCancel(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	ctx, cancel := context.WithCancel(context.Background())
	pids := make(chan int, 2)
	var buf []byte
	code := "import os, subprocess, time\np = subprocess.Popen(['sleep', '100'])\nprint(os.getpid(), p.pid, flush=True)\ntime.sleep(100)"
	done := make(chan error, 1)
	go func() {
		_, err := agent.Run(ctx, sock, agent.RunRequest{Code: code, TimeoutMS: 60000, AllowSpawn: true, MaxOutput: 1000}, func(ev agent.Event) {
			buf = append(buf, ev.Data...)
			if bytes.HasSuffix(buf, []byte("\n")) {
				for _, f := range strings.Fields(string(buf)) {
					n, _ := strconv.Atoi(f)
					pids <- n
				}
				cancel()
			}
		}, nil)
		done <- err
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if len(pids) != 2 {
		t.Fatalf("got %d pids", len(pids))
	}
	waitGone(t, <-pids, <-pids)
	// The agent serves the next run.
	if res := run(t, sock, agent.RunRequest{Code: "print(3)"}); string(res.Stdout) != "3\n" {
		t.Errorf("next run: stdout %q", res.Stdout)
	}
}

func TestBackgroundKilledAfterRun(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	res := run(t, sock, agent.RunRequest{AllowSpawn: true,
		Code: "import subprocess\nresult = subprocess.Popen(['sleep', '100']).pid"})
	pid, err := strconv.Atoi(string(res.Result))
	if err != nil {
		t.Fatalf("result %s", res.Result)
	}
	waitGone(t, pid)
}

func TestStreaming(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	type stamp struct {
		ev agent.Event
		at time.Time
	}
	var evs []stamp
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := agent.Run(ctx, sock, agent.RunRequest{Code: "import time, sys\nprint('a')\nsys.stderr.write('b\\n')\ntime.sleep(0.4)\nprint('c')", TimeoutMS: 5000, MaxOutput: 1000},
		func(ev agent.Event) { evs = append(evs, stamp{ev, time.Now()}) }, nil)
	end := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Stdout) != "a\nc\n" || string(res.Stderr) != "b\n" {
		t.Errorf("stdout %q stderr %q", res.Stdout, res.Stderr)
	}
	if len(evs) < 3 {
		t.Fatalf("%d events, want 3", len(evs))
	}
	// stdout and stderr are separate pipes: only the order within a stream is defined; and with
	// unbuffered stdout print() writes "a" and "\n" separately.
	var got string
	var at time.Time
	for _, s := range evs {
		if s.ev.Type == "stdout" && !strings.HasSuffix(got, "\n") {
			got += string(s.ev.Data)
			at = s.at
		}
	}
	if got != "a\n" {
		t.Fatalf("first stdout line %q", got)
	}
	if lead := end.Sub(at); lead < 200*time.Millisecond { // half the 0.4 s sleep that follows it: streamed
		t.Errorf("first line arrived only %v before the end", lead)
	}
}

func TestSerialConnections(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	// Two concurrent runs: the second waits for the first (one run at a time).
	var wg sync.WaitGroup
	ends := make([]time.Time, 2)
	starts := make([]string, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := run(t, sock, agent.RunRequest{Code: "import time\nresult = time.time()\ntime.sleep(0.3)"})
			starts[i] = string(res.Result)
			ends[i] = time.Now()
		}()
	}
	wg.Wait()
	a, _ := strconv.ParseFloat(starts[0], 64)
	b, _ := strconv.ParseFloat(starts[1], 64)
	if d := b - a; d < 0.29 && d > -0.29 {
		t.Errorf("runs overlapped: started %.3fs apart", d)
	}
}

func TestWaitReady(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := agent.WaitReady(ctx, filepath.Join(t.TempDir(), "none.sock"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitReady on a missing socket: %v", err)
	}
	// A bound socket accepts connections before any agent serves it: not ready.
	bound, ln := listen(t, t.TempDir())
	defer ln.Close()
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := agent.WaitReady(ctx, bound); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "ping") {
		t.Errorf("WaitReady on a socket no agent serves: %v", err)
	}
	sock := startAgent(t)
	for range 3 { // probes leave nothing behind
		if err := agent.WaitReady(context.Background(), sock); err != nil {
			t.Fatal(err)
		}
	}
	if res := run(t, sock, agent.RunRequest{Code: "print(1)"}); string(res.Stdout) != "1\n" {
		t.Errorf("stdout %q", res.Stdout)
	}
	_, err = agent.Run(context.Background(), filepath.Join(t.TempDir(), "none.sock"), agent.RunRequest{Code: "1"}, nil, nil)
	if err == nil {
		t.Error("Run on a missing socket: no error")
	}
}

func TestAgentErrors(t *testing.T) {
	t.Parallel()
	sock := startAgent(t, "--python", "/nonexistent/python3")
	res, err := agent.Run(context.Background(), sock, agent.RunRequest{Code: "print(1)", TimeoutMS: 5000}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.AgentError, "/nonexistent/python3") {
		t.Errorf("agent_error %q, want the missing interpreter named", res.AgentError)
	}
	res, err = agent.Run(context.Background(), sock, agent.RunRequest{Code: "1", Env: map[string]string{"A=B": "x"}}, nil, nil)
	if err != nil || res.AgentError == "" {
		t.Errorf("invalid env: err %v, agent_error %q", err, res.AgentError)
	}
}

// TestPID1 runs the agent as PID 1 of a new pid namespace, as uid 10000, like in a sandbox: a
// run's background processes (even in another session) are gone after the run, and processes in
// the sandbox cannot connect to the agent.
func TestPID1(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if os.Geteuid() != 0 || err != nil {
		reason := "needs root and unshare(1) for a pid namespace"
		if os.Getenv("CI") != "" {
			t.Fatal(reason)
		}
		t.Skip(reason)
	}
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	os.Chown(dir, 10000, 10000)
	sock, ln := listen(t, dir)
	os.Chmod(sock, 0o777) // so that the test's attack below gets as far as the peer check
	var logs bytes.Buffer
	cmd := exec.Command(unshare, "--pid", "--fork", "--mount-proc", "--kill-child", "-S", "10000", "-G", "10000",
		agentBin, "--python", python)
	cmd.Stderr = &syncWriter{w: &logs}
	cmd.ExtraFiles = []*os.File{ln}
	// The agent loses a parent-death signal when unshare changes its uid: kill the whole group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = time.Second
	err = cmd.Start()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := agent.WaitReady(ctx, sock); err != nil {
		t.Fatal(err)
	}

	const listProcs = "import os\nresult = sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid())"
	res := run(t, sock, agent.RunRequest{Code: "import os\nresult = [os.getpid(), os.getuid()]"})
	var who []int
	json.Unmarshal(res.Result, &who)
	if len(who) != 2 || who[0] == 1 || who[1] != 10000 {
		t.Fatalf("run saw pid/uid %s", res.Result)
	}

	// Background processes: a child in the run's group, one in its own session, a zombie-to-be.
	res = run(t, sock, agent.RunRequest{AllowSpawn: true, Code: `
import subprocess
a = subprocess.Popen(["sleep", "100"])
b = subprocess.Popen(["sleep", "100"], start_new_session=True)
subprocess.Popen(["sh", "-c", "sleep 0.05 & exit 0"])
result = [a.pid, b.pid]
`})
	if res.ExitCode != 0 || res.Error != nil {
		t.Fatalf("exit %d error %+v stderr %s", res.ExitCode, res.Error, res.Stderr)
	}
	// The agent kills them as the run ends and reaps them as they exit (the orphaned sleep
	// after its 0.05 s).
	waitfor.True(t, 10*time.Second, func() bool {
		res = run(t, sock, agent.RunRequest{Code: listProcs})
		return string(res.Result) == "[1]"
	})

	// Code in the sandbox that reaches the agent's socket (in a sandbox it can't: the socket is in
	// the host's directory; here it shares the host's mount namespace) cannot use it: a request it
	// queues is never run.
	marker := filepath.Join(dir, "pwned")
	res = run(t, sock, agent.RunRequest{Code: fmt.Sprintf(`
import json, socket
s = socket.socket(socket.AF_UNIX)
s.connect(%q)
try:
    s.sendall(json.dumps({"code": "open(%%r, 'w').write('x')" %% %q, "timeout_ms": 1000}).encode() + b"\n")
except BrokenPipeError:
    pass  # refused at once
`, sock, marker)})
	if res.ExitCode != 0 {
		t.Fatalf("exit %d, stderr %s", res.ExitCode, res.Stderr)
	}
	run(t, sock, agent.RunRequest{Code: "print(1)"})
	if _, err := os.Stat(marker); err == nil {
		t.Errorf("a request sent from inside the sandbox was run")
	}

	// Timeout as PID 1.
	res = run(t, sock, agent.RunRequest{AllowSpawn: true, TimeoutMS: 300,
		Code: "import subprocess, time\nsubprocess.Popen(['sleep', '100'], start_new_session=True)\ntime.sleep(100)"})
	if !res.TimedOut {
		t.Errorf("timed_out false")
	}
	res = run(t, sock, agent.RunRequest{Code: listProcs})
	if string(res.Result) != "[1]" {
		t.Errorf("processes other than the agent after a timeout: %s, want [1]", res.Result)
	}

	// SIGTERM from inside the sandbox does not stop the agent.
	res = run(t, sock, agent.RunRequest{Code: "import os, signal\nos.kill(1, signal.SIGTERM)\nimport time; time.sleep(0.1)\nresult = 1"})
	if string(res.Result) != "1" {
		t.Errorf("result %s", res.Result)
	}
	run(t, sock, agent.RunRequest{Code: "print(1)"})
}

// A run finds its Python pre-started: the standby the previous run reported serves the next one,
// with the next one's own environment, and nothing of a run's state reaches the next.
func TestStandby(t *testing.T) {
	t.Parallel()
	sock := startAgent(t, "--prestart", "1")
	first := run(t, sock, agent.RunRequest{Code: "import os\nos.environ['LEAK'] = 'x'\nglobal_state = 1\nresult = os.getpid()", AllowSpawn: true})
	if first.StandbyPID == 0 {
		t.Fatal("no standby reported")
	}
	second := run(t, sock, agent.RunRequest{Code: "import os\nresult = [os.getpid(), os.environ.get('LEAK'), os.environ.get('MINE'), 'global_state' in globals()]",
		Env: map[string]string{"MINE": "yes"}, AllowSpawn: true})
	if string(second.Result) != fmt.Sprintf("[%d,null,\"yes\",false]", first.StandbyPID) {
		t.Errorf("second run: %s (standby was %d)", second.Result, first.StandbyPID)
	}
	// A standby of the wrong kind is replaced, not used.
	third := run(t, sock, agent.RunRequest{Code: "import os\nresult = os.getpid()", AllowSpawn: false})
	if string(third.Result) == fmt.Sprint(second.StandbyPID) {
		t.Error("a standby started with allow_spawn true served a run with allow_spawn false")
	}
}

// The runner is compiled once: the first run process compiles it and hands its code object to the
// agent, later ones load that ("c" in their command line) — and behave the same: results,
// tracebacks without the runner's frames, SystemExit.
func TestCompiledRunner(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	kind := "import sys\nresult = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[6].decode()[:1]"
	var kinds []string
	for range 3 {
		var k string
		if err := json.Unmarshal(run(t, sock, agent.RunRequest{Code: kind}).Result, &k); err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, k)
	}
	if kinds[0] != "d" || kinds[2] != "c" {
		t.Fatalf("runner kinds of three runs: %v, want d first and c by the third", kinds)
	}
	res := run(t, sock, agent.RunRequest{Code: "def f():\n    raise ValueError('boom')\nf()"})
	if res.ExitCode != 1 || res.Error == nil || res.Error.Type != "ValueError" ||
		!strings.Contains(res.Error.Traceback, `File "<run>", line 3`) || strings.Contains(res.Error.Traceback, "sandbox-runner") {
		t.Fatalf("exception from a loaded runner: %+v", res)
	}
	if res = run(t, sock, agent.RunRequest{Code: "raise SystemExit(3)"}); res.ExitCode != 3 || res.Error != nil {
		t.Fatalf("SystemExit from a loaded runner: %+v", res)
	}
}

// What the launcher needs for itself (GOMAXPROCS) does not reach the run, not even its process's
// initial environment.
func TestLauncherEnvDoesNotLeak(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	for range 2 { // a process started for the run, then a standby
		res := run(t, sock, agent.RunRequest{Code: "import os\nresult = ['GOMAXPROCS' in os.environ, b'GOMAXPROCS' in open('/proc/self/environ', 'rb').read()]"})
		if string(res.Result) != "[false,false]" {
			t.Fatalf("GOMAXPROCS in the run's environment: %s", res.Result)
		}
	}
}

// A run ends as Python's own exit would (the runner skips only the interpreter's teardown):
// what it leaves behind is finalised and flushed, atexit handlers run in order, daemon threads
// do not hold it up, the status is Python's.
func TestExitLikePython(t *testing.T) {
	t.Parallel()
	sock := startAgent(t)
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, code, stdout, stderr string
		exit                       int
	}{
		{"atexit handlers, last registered first", "import atexit\natexit.register(print, 'first')\natexit.register(print, 'second')", "second\nfirst\n", "", 0},
		{"atexit exception is reported, exit unchanged", "import atexit\ndef f(): raise ValueError('in atexit')\natexit.register(f)", "", "ValueError: in atexit", 0},
		{"__del__ of a global", "class A:\n    def __del__(self): print('del')\na = A()", "del\n", "", 0},
		{"__del__ in a cycle", "class A:\n    def __del__(self): print('cycle')\na = A()\na.me = a", "cycle\n", "", 0},
		{"unclosed file flushed", "f = open(" + fmt.Sprintf("%q", dir+"/f") + ", 'w')\nf.write('kept')", "", "", 0},
		{"daemon thread does not hold the exit", "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nprint('done')", "done\n", "", 0},
		{"exit status wraps like Python's", "raise SystemExit(300)", "", "", 44},
		{"exit with None", "raise SystemExit", "", "", 0},
		{"output of atexit after an error", "import atexit\natexit.register(print, 'ae')\n1/0", "ae\n", "ZeroDivisionError", 1},
	}
	for _, c := range cases {
		// A run held by what it left behind (the daemon thread's 60 s) is killed at this timeout,
		// and its exit code says so.
		res := run(t, sock, agent.RunRequest{Code: c.code, TimeoutMS: 30_000})
		if string(res.Stdout) != c.stdout || !strings.Contains(string(res.Stderr), c.stderr) || res.ExitCode != c.exit {
			t.Errorf("%s: exit %d stdout %q stderr %q", c.name, res.ExitCode, res.Stdout, res.Stderr)
		}
	}
	if b, err := os.ReadFile(dir + "/f"); err != nil || string(b) != "kept" {
		t.Errorf("a file the run left open holds %q (%v), want it flushed", b, err)
	}
}
