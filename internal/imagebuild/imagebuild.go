// Package imagebuild runs the command that builds an image while the server already serves, and
// says where it is: building (with an estimate of the time left), ready (with the directory the
// command printed) or failed (with the reason and the log).
//
// The command runs under /bin/sh -c in its own process group, with stdin from /dev/null and its
// stdout and stderr appended to a log file. It succeeds when it exits 0 and the last line of its
// stdout names an existing directory, which Config.Accept then checks and readies. The estimate
// comes from the duration of the last successful build, kept in a small file beside the log, or
// DefaultEstimate. Close (or the end of the build) kills the whole process group: nothing the
// command started outlives the Build.
package imagebuild

import (
	"bytes"
	"context"
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
	"time"

	"github.com/sandboxd/sandboxd/internal/deathsig"
)

// State is where a build is.
type State string

// The states of a build: Building → Ready | Failed; nothing leaves Ready or Failed.
const (
	Building State = "building"
	Ready    State = "ready"
	Failed   State = "failed"
)

// Defaults.
const (
	// DefaultEstimate is a build's estimated duration when no successful build was recorded:
	// CPython for wasm32-wasi takes 4–8 minutes on 2 cores (scripts/build-python-wasm.sh).
	DefaultEstimate = 8 * time.Minute
	// DefaultMinRecorded: a success quicker than this found its cache (it built nothing), so its
	// duration says nothing about a build's and is not recorded.
	DefaultMinRecorded = 10 * time.Second
	// killGrace is how long the process group has between SIGTERM and SIGKILL.
	killGrace = 3 * time.Second
	// overdue is the time left reported once a build outlasts its estimate.
	overdue = 10 * time.Second
)

// Config describes one build.
type Config struct {
	Name    string // what is built, for messages (an image name)
	Command string // run with /bin/sh -c; the last line of its stdout is the result's directory
	Dir     string // the command's working directory ("": the server's)
	Log     string // the log file: created (with its directory) or truncated
	// History is the file keeping the duration of the last successful build ("": Log + ".last").
	History string
	// DefaultEstimate is the estimate without a recorded build (0: DefaultEstimate);
	// MinRecorded, the shortest success recorded (0: DefaultMinRecorded).
	DefaultEstimate time.Duration
	MinRecorded     time.Duration
	// Accept checks the directory the command printed and readies it for use; it returns the
	// result's digest ("" if unknown). An error fails the build. Its ctx ends with Close. nil:
	// any directory is accepted.
	Accept func(ctx context.Context, dir string) (digest string, err error)
}

// Status is a snapshot of a build.
type Status struct {
	State    State
	Dir      string        // Ready: the directory the command printed
	Digest   string        // Ready: what Accept returned
	Started  time.Time     // when the command started
	Took     time.Duration // Ready, Failed: how long the build took
	Left     time.Duration // Building: the estimated time left, at least a second
	Progress float64       // Building: the share of the estimate elapsed, 0 to 0.99
	Reason   string        // Failed: why, in one line
	Log      string        // the log file
}

// Build is one build, started by Start. Its methods are safe for concurrent use.
type Build struct {
	cfg      Config
	estimate time.Duration
	started  time.Time
	cancel   context.CancelFunc
	done     chan struct{} // closed when the build has ended and its processes are gone

	mu sync.Mutex
	st Status
}

// Start starts the build and returns at once; the build runs until it ends or Close is called.
func Start(cfg Config) *Build {
	if cfg.DefaultEstimate <= 0 {
		cfg.DefaultEstimate = DefaultEstimate
	}
	if cfg.MinRecorded <= 0 {
		cfg.MinRecorded = DefaultMinRecorded
	}
	if cfg.History == "" {
		cfg.History = cfg.Log + ".last"
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Build{cfg: cfg, estimate: lastDuration(cfg.History, cfg.DefaultEstimate), started: time.Now(),
		cancel: cancel, done: make(chan struct{})}
	b.st = Status{State: Building, Started: b.started, Log: cfg.Log}
	go func() {
		defer close(b.done)
		defer cancel()
		dir, digest, err := b.run(ctx)
		took := time.Since(b.started)
		b.mu.Lock()
		defer b.mu.Unlock()
		b.st.Took = took
		if err != nil {
			b.st.State, b.st.Reason = Failed, err.Error()
			return
		}
		b.st.State, b.st.Dir, b.st.Digest = Ready, dir, digest
		if took >= cfg.MinRecorded {
			_ = os.WriteFile(cfg.History, []byte(strconv.FormatFloat(took.Seconds(), 'f', 1, 64)+"\n"), 0o644)
		}
	}()
	return b
}

// Estimate is the build's expected duration: the last recorded build's, or the default.
func (b *Build) Estimate() time.Duration { return b.estimate }

// Status returns where the build is. It never blocks on the build.
func (b *Build) Status() Status {
	b.mu.Lock()
	st := b.st
	b.mu.Unlock()
	if st.State == Building {
		elapsed := time.Since(b.started)
		st.Left = max(b.estimate-elapsed, overdue).Round(time.Second)
		st.Progress = min(float64(elapsed)/float64(b.estimate), 0.99)
	}
	return st
}

// Done is closed when the build has ended (ready or failed) and its processes are gone.
func (b *Build) Done() <-chan struct{} { return b.done }

// Close stops a build still running (its process group gets SIGTERM, then SIGKILL after a few
// seconds; the build ends Failed) and waits until the build has ended. Idempotent.
func (b *Build) Close() {
	b.cancel()
	<-b.done
}

// run runs the command and Accept; it returns the directory and its digest.
func (b *Build) run(ctx context.Context) (string, string, error) {
	if err := os.MkdirAll(filepath.Dir(b.cfg.Log), 0o755); err != nil {
		return "", "", fmt.Errorf("log: %w", err)
	}
	logf, err := os.OpenFile(b.cfg.Log, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return "", "", fmt.Errorf("log: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "sandboxd: building %s: %s (started %s; expected to take about %s)\n",
		b.cfg.Name, b.cfg.Command, b.started.UTC().Format(time.RFC3339), b.estimate.Round(time.Second))
	dir, err := b.command(ctx, logf)
	var digest string
	if err == nil && b.cfg.Accept != nil {
		digest, err = b.cfg.Accept(ctx, dir)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = errors.New("stopped before it ended (the server is stopping)")
		}
		fmt.Fprintf(logf, "sandboxd: building %s failed: %v\n", b.cfg.Name, err)
		return "", "", err
	}
	fmt.Fprintf(logf, "sandboxd: %s is ready: %s (%s)\n", b.cfg.Name, dir, time.Since(b.started).Round(time.Millisecond))
	return dir, digest, nil
}

// command runs the command in its own process group and returns the last line of its stdout,
// checked to be a directory.
func (b *Build) command(ctx context.Context, logf *os.File) (string, error) {
	cmd := exec.Command("/bin/sh", "-c", b.cfg.Command)
	cmd.Dir = b.cfg.Dir
	// stdout's last line is the result; stderr's (else stdout's) the reason of a failure. (Two
	// pipes: which of them was written last is not known.)
	out, errs := &lastLine{}, &lastLine{}
	cmd.Stdout = io.MultiWriter(logf, out)
	cmd.Stderr = io.MultiWriter(logf, errs)
	// Its own process group (Close kills the group), killed with its parent thread as well.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 10 * time.Second // a descendant that keeps stdout open does not hold Wait forever
	if err := deathsig.Start(cmd); err != nil {
		return "", fmt.Errorf("start %q: %w", b.cfg.Command, err)
	}
	pgid := cmd.Process.Pid
	exited := make(chan struct{})
	killed := make(chan struct{})
	go func() { // stops the group when ctx ends; the command's Wait below waits for it
		defer close(killed)
		select {
		case <-exited:
			return
		case <-ctx.Done():
		}
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(killGrace):
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // the group outlives its leader while a member lives
	}()
	err := cmd.Wait()
	close(exited)
	<-killed
	if err != nil {
		reason := "the command failed: " + err.Error()
		if l := errs.last(); l != "" {
			reason += ": " + l
		} else if l := out.last(); l != "" {
			reason += ": " + l
		}
		return "", errors.New(truncate(reason, 300))
	}
	dir := out.last()
	if dir == "" {
		return "", errors.New("the command exited 0 but printed no directory on stdout")
	}
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(b.cfg.Dir, dir)
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return "", fmt.Errorf("the command printed %q, which is not a directory", truncate(dir, 200))
	}
	return dir, nil
}

// lastLine keeps the last non-empty line written to it.
type lastLine struct {
	mu   sync.Mutex
	line []byte // the last complete non-empty line
	cur  []byte // the line being written
}

func (l *lastLine) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range p {
		if c == '\n' {
			if len(bytes.TrimSpace(l.cur)) > 0 {
				l.line = append(l.line[:0], l.cur...)
			}
			l.cur = l.cur[:0]
			continue
		}
		if len(l.cur) < 4096 {
			l.cur = append(l.cur, c)
		}
	}
	return len(p), nil
}

func (l *lastLine) last() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := strings.TrimSpace(string(l.cur)); s != "" {
		return s
	}
	return strings.TrimSpace(string(l.line))
}

// lastDuration reads the recorded duration of the last successful build, or returns def.
func lastDuration(path string, def time.Duration) time.Duration {
	b, err := os.ReadFile(path)
	if err != nil {
		return def
	}
	s, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
	if err != nil || s <= 0 || s > 24*3600 {
		return def
	}
	return time.Duration(s * float64(time.Second))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
