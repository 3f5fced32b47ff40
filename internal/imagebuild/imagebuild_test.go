package imagebuild

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// script writes a shell script into the test's directory and returns the command running it.
func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "build.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func wait(t *testing.T, b *Build) Status {
	t.Helper()
	select {
	case <-b.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the build did not end")
	}
	return b.Status()
}

// TestStates: a real command that builds (sleeps, talks on stderr, prints its directory), fails,
// prints nothing or something that is not a directory, or is refused by Accept.
func TestStates(t *testing.T) {
	out := t.TempDir()
	cases := []struct {
		name    string
		body    string
		accept  error
		state   State
		dir     string
		reasons []string // what the reason of a failure says
	}{
		{"built", "echo compiling >&2\nsleep 0.3\necho 'some output'\necho " + out + "\n", nil, Ready, out, nil},
		{"relative dir", "echo .\n", nil, Ready, "", nil},
		{"fails", "echo compiling\necho 'cc: fatal error: no input files' >&2\nexit 3\n", nil, Failed, "",
			[]string{"exit status 3", "cc: fatal error: no input files"}},
		{"no directory", "true\n", nil, Failed, "", []string{"printed no directory"}},
		{"not a directory", "echo /nonexistent/x\n", nil, Failed, "", []string{`"/nonexistent/x"`, "not a directory"}},
		{"refused", "echo " + out + "\n", errors.New("no python.wasm"), Failed, "", []string{"no python.wasm"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			data := t.TempDir()
			var accepted string
			b := Start(Config{Name: "python:3.11-wasi", Command: script(t, c.body), Dir: data,
				Log: filepath.Join(data, "logs", "wasm-build.log"), DefaultEstimate: time.Minute,
				Accept: func(ctx context.Context, dir string) (string, error) {
					accepted = dir
					return "sha256:feed", c.accept
				}})
			defer b.Close()
			st := b.Status()
			if st.State != Building || st.Left <= 0 || st.Left > time.Minute || st.Progress < 0 || st.Progress > 0.1 ||
				st.Log != filepath.Join(data, "logs", "wasm-build.log") {
				t.Fatalf("at the start: %+v", st)
			}
			st = wait(t, b)
			if st.State != c.state {
				t.Fatalf("state %s, want %s: %+v", st.State, c.state, st)
			}
			want := c.dir
			if c.name == "relative dir" {
				want = data
			}
			if c.state == Ready && (st.Dir != want || accepted != want || st.Digest != "sha256:feed" || st.Took <= 0) {
				t.Errorf("ready: %+v (accepted %q), want dir %s", st, accepted, want)
			}
			for _, r := range c.reasons {
				if !strings.Contains(st.Reason, r) {
					t.Errorf("reason %q lacks %q", st.Reason, r)
				}
			}
			if st.Left != 0 || st.Progress != 0 {
				t.Errorf("an ended build has no estimate: %+v", st)
			}
			log, _ := os.ReadFile(st.Log)
			if !strings.HasPrefix(string(log), "sandboxd: building python:3.11-wasi: ") ||
				!strings.Contains(string(log), map[State]string{Ready: "is ready", Failed: "failed: "}[c.state]) {
				t.Errorf("log:\n%s", log)
			}
			if c.name == "fails" && !strings.Contains(string(log), "compiling\n") {
				t.Errorf("the command's output is not in the log:\n%s", log)
			}
		})
	}
}

// TestEstimate: without a record, the default; a successful build at least MinRecorded long
// records its duration, which the next build's estimate is; a quicker success (a cache hit) and
// a failure record nothing; an overdue build says "soon", never zero.
func TestEstimate(t *testing.T) {
	data := t.TempDir()
	out := t.TempDir()
	cfg := Config{Name: "img", Log: filepath.Join(data, "logs", "b.log"), DefaultEstimate: 42 * time.Second,
		MinRecorded: 400 * time.Millisecond}
	history := cfg.Log + ".last"

	cfg.Command = "echo " + out // a cache hit: too quick to be recorded
	b := Start(cfg)
	if b.Estimate() != 42*time.Second {
		t.Fatalf("estimate without a record: %s", b.Estimate())
	}
	if st := wait(t, b); st.State != Ready {
		t.Fatalf("%+v", st)
	}
	if _, err := os.Stat(history); !os.IsNotExist(err) {
		t.Fatalf("a cache hit was recorded: %v", err)
	}

	cfg.Command = "sleep 0.5; echo " + out
	if st := wait(t, Start(cfg)); st.State != Ready {
		t.Fatalf("%+v", st)
	}
	rec, err := os.ReadFile(history)
	if err != nil {
		t.Fatal(err)
	}
	secs, err := strconv.ParseFloat(strings.TrimSpace(string(rec)), 64)
	if err != nil || secs < 0.5 || secs > 5 {
		t.Fatalf("recorded %q", rec)
	}

	cfg.Command = "sleep 0.5; exit 1"
	b = Start(cfg)
	if d := b.Estimate(); d != time.Duration(secs*float64(time.Second)) {
		t.Fatalf("estimate %s, want the recorded %gs", d, secs)
	}
	st := b.Status() // 0.5 s of about 0.5 s: overdue soon
	if st.State != Building || st.Left < time.Second {
		t.Fatalf("%+v", st)
	}
	waitfor.True(t, 10*time.Second, func() bool { st := b.Status(); return st.Left == overdue || st.State != Building })
	if st := b.Status(); st.Left != overdue || st.Progress > 0.99 {
		t.Errorf("overdue: %+v", st)
	}
	wait(t, b)
	if again, _ := os.ReadFile(history); string(again) != string(rec) {
		t.Errorf("a failure changed the record: %q → %q", rec, again)
	}

	os.WriteFile(history, []byte("nonsense\n"), 0o644)
	b = Start(Config{Name: "img", Command: "true", Log: cfg.Log})
	defer b.Close()
	if d := b.Estimate(); d != DefaultEstimate {
		t.Errorf("estimate with a bad record: %s", d)
	}
}

// TestClose: Close kills the whole process group — the command and what it started, also a
// child that ignores SIGTERM — and the build ends failed, without approving anything.
func TestClose(t *testing.T) {
	data := t.TempDir()
	pids := filepath.Join(data, "pids")
	b := Start(Config{Name: "img", Log: filepath.Join(data, "b.log"), Command: script(t, `
(trap '' TERM; sleep 300) &
echo $! >`+pids+`
sleep 300 &
echo $! >>`+pids+`
echo $$ >>`+pids+`
wait
echo /
`),
		Accept: func(ctx context.Context, dir string) (string, error) {
			t.Error("Accept called for a stopped build")
			return "", nil
		}})
	var list []int
	for deadline := time.Now().Add(5 * time.Second); len(list) < 3; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the script did not start its children")
		}
		b, _ := os.ReadFile(pids)
		list = list[:0]
		for _, f := range strings.Fields(string(b)) {
			n, _ := strconv.Atoi(f)
			list = append(list, n)
		}
	}
	start := time.Now()
	b.Close()
	if d := time.Since(start); d < killGrace { // (the grace given; the processes' end is checked below)
		t.Errorf("Close took %s: want the grace of %s for the child that ignores SIGTERM", d, killGrace)
	}
	st := b.Status()
	if st.State != Failed || !strings.Contains(st.Reason, "stopped") {
		t.Errorf("after Close: %+v", st)
	}
	for _, pid := range list { // (a killed orphan may be a zombie for a moment, until init reaps it)
		for deadline := time.Now().Add(2 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Errorf("process %d outlived Close", pid)
				break
			}
		}
	}
	b.Close() // idempotent
}
