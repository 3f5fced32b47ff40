package wasm

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// The standby (see instance in package worker): each run of a sandbox is served by an instance started
// after the previous run ended, and sees nothing of earlier runs but the sandbox's /tmp.

// pySandbox returns a driver with a new python.wasm sandbox (destroyed at the test's end), its id
// and its box.
func pySandbox(t *testing.T) (*Driver, string, *box) {
	t.Helper()
	needPython(t)
	d := openDriver(t, "py")
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	b, err := d.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	return d, id, b
}

// TestStandbyRuns: the cases run one after the other in one sandbox, each checking what it sees
// and whether the standby served it.
func TestStandbyRuns(t *testing.T) {
	d, id, b := pySandbox(t)
	wantEnv, err := buildEnv(map[string]string{"A": "1", "B": "x=y z"})
	if err != nil {
		t.Fatal(err)
	}
	envDoc := map[string]string{}
	for _, kv := range wantEnv {
		k, v, _ := strings.Cut(kv, "=")
		envDoc[k] = v
	}
	wantEnvJSON, _ := json.Marshal(envDoc)
	for _, tc := range []struct {
		name      string
		code      string
		env       map[string]string
		maxOutput int
		fresh     bool   // served by an instance started for it, not the standby
		stdout    string // exact
		result    string // JSON, "" for none
	}{
		{name: "leave state behind",
			code: "x = 41\nimport sys, os, json\nsys.sandbox_marker = 1\nos.environ['LEFT'] = '1'\nos.putenv('LEFT_C', '1')\n" +
				"open('/tmp/standby-file', 'w').write('kept')\nprint('ok')",
			stdout: "ok\n"},
		{name: "no globals, module state or environment of the last run",
			code:   "import sys, os\nprint('x' in globals(), hasattr(sys, 'sandbox_marker'), 'LEFT' in os.environ, 'json' in sys.modules)",
			stdout: "False False False False\n"},
		{name: "the sandbox's /tmp persists", code: "print(open('/tmp/standby-file').read())", stdout: "kept\n"},
		{name: "environment reaches the run", env: map[string]string{"A": "1", "B": "x=y z"},
			code: "result = dict(__import__('os').environ)", result: string(wantEnvJSON)},
		{name: "the run's environment does not stay", code: "import os\nprint(os.environ.get('B'))", stdout: "None\n"},
		{name: "working directory, argv, __main__", code: "import os, sys\nprint(os.getcwd(), sys.argv, __name__)",
			stdout: pyrunner.WorkDir + " ['-c'] __main__\n"},
		{name: "the run's output limit", maxOutput: 20, code: "print('x' * 50)\nresult = 'y' * 100",
			stdout: strings.Repeat("x", 20), result: `"<result omitted: 102 bytes of JSON exceed the 20-byte limit>"`},
		{name: "a locale variable gets an instance started with it", env: map[string]string{"LC_ALL": "C.UTF-8"}, fresh: true,
			code: "import os\nprint(os.environ['LC_ALL'])", stdout: "C.UTF-8\n"},
		{name: "the standby again", code: "print(1)", stdout: "1\n"},
		{name: "an uncaught exception", code: "raise KeyError('k')", result: ""},
		{name: "after a failure", code: "print(2)", stdout: "2\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := b.standbyRuns.Load()
			// MaxOutput 0: the driver's default.
			req := driver.ExecRequest{Code: tc.code, Env: tc.env, Timeout: 30 * time.Second, MaxOutput: tc.maxOutput}
			res, err := d.Exec(context.Background(), id, req)
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(tc.code, "raise") {
				if res.Status != driver.StatusFailed || res.Error == nil || res.Error.Type != "KeyError" {
					t.Errorf("status %s, error %+v, want failed with KeyError", res.Status, res.Error)
				}
			} else if res.Status != driver.StatusCompleted {
				t.Fatalf("status %s exit %d, stderr %s", res.Status, res.ExitCode, res.Stderr)
			}
			if string(res.Stdout) != tc.stdout && !strings.HasPrefix(tc.code, "raise") {
				t.Errorf("stdout %q, want %q", res.Stdout, tc.stdout)
			}
			if tc.result != "" && !jsonEqual(res.Result, []byte(tc.result)) {
				t.Errorf("result %s, want %s", res.Result, tc.result)
			}
			if warm := b.standbyRuns.Load() > before; warm == tc.fresh {
				t.Errorf("served by the standby: %v, want %v", warm, !tc.fresh)
			}
		})
	}
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	ja, _ := json.Marshal(x)
	jb, _ := json.Marshal(y)
	return string(ja) == string(jb)
}

// TestStandbyCountsOnlyTheRun: a run's timeout, duration and CPU time start when the run is
// handed to the standby, not when the standby started.
func TestStandbyCountsOnlyTheRun(t *testing.T) {
	d, id, b := pySandbox(t)
	// The subject: the standby, started by Create, waits a second that the run must not be
	// charged for.
	time.Sleep(time.Second)

	res := drivertest.Exec(t, d, id, "import time\ntime.sleep(0.3)", 800*time.Millisecond)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("a 0.3 s run with a 0.8 s timeout, a second after its standby started: %s", res.Status)
	}
	if res.Duration < 300*time.Millisecond { // and under the timeout, or it had not completed
		t.Errorf("duration %v, want the run's 0.3 s and a little", res.Duration)
	}
	if b.standbyRuns.Load() != 1 {
		t.Errorf("%d runs served by the standby, want 1", b.standbyRuns.Load())
	}

	// CPU: a run served by a waiting standby against one that starts its interpreter (a locale
	// variable makes the worker start a fresh instance).
	cpu := func(env map[string]string) time.Duration {
		var cs []time.Duration
		for i := 0; i < 5; i++ {
			// The standby the last run's end started has time to wait (nothing outside the
			// worker sees it waiting, so there is no event to wait for).
			time.Sleep(300 * time.Millisecond)
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)", Env: env, Timeout: 30 * time.Second})
			if err != nil || res.Status != driver.StatusCompleted {
				t.Fatalf("print(1): %v %s", err, res.Status)
			}
			cs = append(cs, res.CPU)
		}
		slices.Sort(cs)
		return cs[len(cs)/2]
	}
	warm, fresh := cpu(nil), cpu(map[string]string{"LANG": "C"})
	t.Logf("CPU of print(1): %v served by the standby, %v with a start-up", warm, fresh)
	if warm >= fresh {
		t.Errorf("a run served by the standby used %v of CPU, one with its own start-up %v: the standby's start-up is counted", warm, fresh)
	}
}

// TestStandbyReplaced: a standby lost with its worker (killed while the sandbox is idle), ended for
// a run with a command line of its own, or one that ends by itself (the probe module is no
// Python: it exits at once) is replaced, and no run notices.
func TestStandbyReplaced(t *testing.T) {
	t.Run("worker killed while idle", func(t *testing.T) {
		d, id, b := pySandbox(t)
		// While idle: give its standby the time to start (nothing outside the worker sees
		// it waiting; the sleep is that idle period, not a guess at an event).
		time.Sleep(300 * time.Millisecond)
		w := currentWorker(t, b)
		pid := w.pid
		if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitExited(t, w)
		for i, want := range []string{"1\n", "2\n"} {
			if got := drivertest.MustExec(t, d, id, "print("+itoa(i+1)+")"); got != want {
				t.Errorf("run %d: %q, want %q", i, got, want)
			}
		}
		if n := b.standbyRuns.Load(); n != 2 {
			t.Errorf("%d runs served by a standby, want 2 (the new worker starts one when configured)", n)
		}
		if procs := processesIn(sandboxGroup(t, d, id)); len(procs) != 1 || procs[0] == pid {
			t.Errorf("processes in the sandbox's cgroup %v, want one new worker", procs)
		}
	})
	t.Run("run with its own command line", func(t *testing.T) {
		d, id, b := pySandbox(t)
		env, _ := buildEnv(nil)
		res, err := d.exec(context.Background(), b, protocol.Run{Env: env, Args: []string{"python", "-I", "-c", "print(7)"}}, driver.ExecRequest{Timeout: 30 * time.Second})
		if err != nil || res.Status != driver.StatusCompleted || string(res.Stdout) != "7\n" {
			t.Fatalf("plain python: %v %s %q %q", err, res.Status, res.Stdout, res.Stderr)
		}
		for i, warm := range []bool{false, true} {
			before := b.standbyRuns.Load()
			if got := drivertest.MustExec(t, d, id, "print(8)"); got != "8\n" {
				t.Errorf("run %d: %q", i, got)
			}
			if got := b.standbyRuns.Load() > before; got != warm {
				t.Errorf("run %d served by a standby: %v, want %v", i, got, warm)
			}
		}
	})
	t.Run("standby ends by itself", func(t *testing.T) {
		drivertest.Need(t, "the wasm driver's tests", setupErr)
		d := openDriver(t, "probe")
		id := harness.Sandbox(t, d, baseSpec(t, probeImage))
		b, _ := d.lookup(id)
		for i := 0; i < 2; i++ {
			// The probe standby exits by itself, unseen by the driver (the subject: a run
			// after it must not be served by it); no event marks it.
			time.Sleep(100 * time.Millisecond)
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)", Timeout: 30 * time.Second})
			if err != nil || res.Status != driver.StatusCompleted {
				t.Fatalf("run %d: %v %s", i, err, res.Status)
			}
			// The probe prints one line per argument: the fresh instance's, once; what the
			// standby printed is no run's.
			if n := strings.Count(string(res.Stdout), "-I unknown op\n"); n != 1 {
				t.Errorf("run %d: the probe's output %d times, want once: %q", i, n, res.Stdout)
			}
		}
		if n := b.standbyRuns.Load(); n != 0 {
			t.Errorf("%d runs served by a standby that had exited", n)
		}
	})
}

// TestIdleWorkerMemory (a measurement, logged with -v): what the worker of an idle sandbox holds
// after a few runs, once it has settled (with its standby waiting).
//
//	SANDBOXD_PYTHON_WASM=… go test -run TestIdleWorkerMemory -v ./internal/driver/wasm/
func TestIdleWorkerMemory(t *testing.T) {
	d, id, b := pySandbox(t)
	time.Sleep(time.Second) // a measurement of an idle worker: this is its idle time
	rss, pss := smapsRollup(t, workerPid(t, b))
	t.Logf("idle sandbox worker, no run yet: RSS %.1f MiB, PSS %.1f MiB", float64(rss)/(1<<20), float64(pss)/(1<<20))
	for i := 0; i < 10; i++ {
		drivertest.MustExec(t, d, id, "import json, re\nresult = json.dumps([1])")
	}
	time.Sleep(time.Second) // idle again, settled
	rss, pss = smapsRollup(t, workerPid(t, b))
	t.Logf("idle sandbox worker after 10 runs: RSS %.1f MiB, PSS %.1f MiB", float64(rss)/(1<<20), float64(pss)/(1<<20))
	if pss > WorkerOverhead {
		t.Errorf("an idle worker's PSS %d MiB is over WorkerOverhead (%d MiB)", pss>>20, WorkerOverhead>>20)
	}
}
