package wasm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/deathsig"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
)

// proc is the driver's handle of one worker process.
type proc struct {
	cmd   *exec.Cmd
	pid   int
	group string           // the cgroup the worker was started in (see startProc)
	conn  *net.UnixConn    // the driver's end of the worker's control socket (its stdin)
	br    *bufio.Reader    // over conn
	fw    *protocol.Writer // over conn
	ready protocol.Ready
	log   *tailBuffer // the worker's stderr, last bytes

	exited  chan struct{} // closed when the process has been waited for
	state   *os.ProcessState
	logDone chan struct{}
	killed  sync.Once
}

// Tunables of worker processes.
const (
	workerStartTimeout = 5 * time.Minute // start to ready: a cold compile takes seconds, more under load, minutes under software emulation
	configTimeout      = 10 * time.Second
	workerLogTail      = 4096
)

// startProc starts a worker for image, in a cgroup of its own (a child of the driver's), and
// waits until it is ready (the module compiled). A background start (the pool's filler) gets the
// least CPU weight, so compiling never competes with sandboxes. On error nothing is left.
//
// The worker's cgroup becomes the cgroup of the sandbox that claims it (Create sets its limits):
// moving a process between cgroups costs milliseconds (the kernel waits for an RCU grace period
// per hierarchy), so Create never moves one.
func (d *Driver) startProc(ctx context.Context, image string, background bool) (*proc, error) {
	return d.startProcCache(ctx, image, background, d.cacheDir())
}

// startProcCache is startProc with the worker's compilation cache in directory cache.
func (d *Driver) startProcCache(ctx context.Context, image string, background bool, cache string) (_ *proc, err error) {
	group := d.cgParent + "/w-" + statedir.RandomHex(8)
	lim := cgroup.Limits{CPUWeight: 100}
	if background {
		lim.CPUWeight = 1
	}
	if err := d.cg.Create(group, lim); err != nil {
		_ = d.cg.Remove(group)
		return nil, fmt.Errorf("wasm worker cgroup: %w", err)
	}
	defer func() {
		if err != nil {
			_ = d.cg.Remove(group)
		}
	}()
	args := append(append([]string(nil), d.workerCmd[1:]...), "--image", image, "--cache", cache,
		"--parent", strconv.Itoa(os.Getpid()))
	cmd := exec.Command(d.workerCmd[0], args...)
	cmd.Env = workerEnv()
	cmd.Dir = "/"
	// Its own process group (signals for sandboxd's group do not reach it; the driver kills the
	// whole group), SIGKILL when sandboxd goes away, and a network namespace of its own with
	// nothing in it: a guest that escaped wazero would still have no network (WASM mode has none).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Cloneflags: syscall.CLONE_NEWNET}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	child := os.NewFile(uintptr(pair[1]), "worker-control")
	hostEnd := os.NewFile(uintptr(pair[0]), "host-control")
	fc, err := net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		child.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	conn := fc.(*net.UnixConn)
	errR, errW, err := os.Pipe()
	if err != nil {
		child.Close()
		conn.Close()
		return nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = child, errW, errW
	err = deathsig.Start(cmd)
	child.Close()
	errW.Close()
	if err != nil {
		conn.Close()
		errR.Close()
		return nil, fmt.Errorf("start wasm worker %q: %w", d.workerCmd[0], err)
	}
	p := &proc{
		cmd: cmd, pid: cmd.Process.Pid, group: group, conn: conn, br: bufio.NewReaderSize(conn, 64<<10),
		fw: protocol.NewWriter(conn), log: &tailBuffer{max: workerLogTail},
		exited: make(chan struct{}), logDone: make(chan struct{}),
	}
	go func() {
		defer close(p.logDone)
		defer errR.Close()
		buf := make([]byte, 4096)
		for {
			n, err := errR.Read(buf)
			p.log.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	go func() {
		_ = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.exited)
	}()
	if err := d.cg.AddProc(group, p.pid); err != nil {
		if p.waitExit(time.Second) { // it died first: its log says why
			p.kill()
			return nil, fmt.Errorf("wasm worker did not start: it exited (%s)%s", p.state, p.logTail())
		}
		p.kill()
		return nil, fmt.Errorf("wasm worker cgroup: %w", err)
	}
	var rm protocol.Ready
	if err := p.expect(ctx, workerStartTimeout, protocol.FrameReady, &rm); err != nil {
		p.kill()
		return nil, fmt.Errorf("wasm worker did not start: %w", err)
	}
	p.ready = rm
	return p, nil
}

// discard kills a worker no sandbox has claimed and removes its cgroup.
func (d *Driver) discard(p *proc) {
	p.kill()
	_ = d.cg.Remove(p.group)
}

// workerEnv is the environment of a worker: sandboxd's own, except variables that would change
// how the Go runtime of the worker behaves, plus a small GOMAXPROCS (a worker runs one guest at a
// time; its CPU is bounded by the sandbox's cgroup anyway).
func workerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "GOMAXPROCS=") || strings.HasPrefix(kv, "GOGC=") || strings.HasPrefix(kv, "GODEBUG=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "GOMAXPROCS=2")
}

// alive reports whether the process has not exited yet.
func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill SIGKILLs the worker's process group and waits until it is reaped and its output closed.
// Idempotent.
func (p *proc) kill() {
	p.killed.Do(func() {
		_ = syscall.Kill(-p.pid, syscall.SIGKILL)
		_ = p.cmd.Process.Kill()
	})
	<-p.exited
	select {
	case <-p.logDone:
	case <-time.After(time.Second):
	}
	p.conn.Close()
}

// expect reads the next frame, which must be of type typ, into v (JSON), within timeout.
func (p *proc) expect(ctx context.Context, timeout time.Duration, typ byte, v any) error {
	type result struct {
		typ byte
		p   []byte
		err error
	}
	_ = p.conn.SetReadDeadline(time.Now().Add(timeout))
	defer p.conn.SetReadDeadline(time.Time{})
	done := make(chan result, 1)
	go func() {
		t, b, err := protocol.ReadFrame(p.br)
		done <- result{t, b, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		p.kill() // unblocks the reader
		<-done
		return ctx.Err()
	}
	if r.err != nil {
		if p.waitExit(500 * time.Millisecond) {
			return fmt.Errorf("worker exited (%s)%s", p.state, p.logTail())
		}
		return fmt.Errorf("reading from the worker: %w%s", r.err, p.logTail())
	}
	if r.typ != typ {
		return fmt.Errorf("worker sent frame %q, want %q", r.typ, typ)
	}
	if err := json.Unmarshal(r.p, v); err != nil {
		return fmt.Errorf("worker message %q: %w", typ, err)
	}
	return nil
}

// waitExit waits up to d for the process to end, and for its log to be read to its end.
func (p *proc) waitExit(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for _, c := range []chan struct{}{p.exited, p.logDone} {
		select {
		case <-c:
		case <-t.C:
			return false
		}
	}
	return true
}

// logTail returns the end of the worker's stderr, formatted for an error message.
func (p *proc) logTail() string {
	s := strings.TrimSpace(p.log.String())
	if s == "" {
		return ""
	}
	return "; worker log: " + s
}

// configure hands the worker its sandbox: c, and a descriptor of each mount's directory, opened
// here (the worker, unprivileged, could not open them).
func (p *proc) configure(ctx context.Context, c protocol.Config) error {
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	c.Mounts = append([]protocol.Mount(nil), c.Mounts...)
	for i := range c.Mounts {
		c.Mounts[i].FD = -1
		if c.Mounts[i].Empty {
			continue
		}
		fd, err := unix.Open(c.Mounts[i].HostDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("configure worker: mount %s: open %s: %w", c.Mounts[i].Path, c.Mounts[i].HostDir, err)
		}
		c.Mounts[i].FD = len(fds)
		fds = append(fds, fd)
	}
	if len(fds) > protocol.MaxFDs {
		return fmt.Errorf("configure worker: %d mounts, at most %d", len(fds), protocol.MaxFDs)
	}
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	if err := p.fw.SendFDs(protocol.FrameConfig, b, fds); err != nil {
		return fmt.Errorf("configure worker: %w%s", err, p.logTail())
	}
	var rep protocol.Reply
	if err := p.expect(ctx, configTimeout, protocol.FrameConfigured, &rep); err != nil {
		return fmt.Errorf("configure worker: %w", err)
	}
	if rep.Error != "" {
		return fmt.Errorf("configure worker: %s", rep.Error)
	}
	return nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// errWorkerGone is returned when a worker died while the driver was talking to it.
var errWorkerGone = errors.New("wasm worker died")
