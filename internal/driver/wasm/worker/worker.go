// Package worker is the WASM driver's worker process, `sandboxd wasm-worker`: the one process
// that runs a WASM sandbox's code (python.wasm under wazero). The guest never runs inside
// sandboxd, so a crash of the guest, of wazero or of the worker, or its kill, never reaches the
// server.
//
// # Who starts it
//
// Only the wasm driver (package wasm), through sandboxd's hidden subcommand, which cmd/sandboxd
// hands to Main before anything else happens: in a process group of its own, with
// PR_SET_PDEATHSIG=SIGKILL, in an empty network namespace and a cgroup of its own (which becomes
// its sandbox's), with its control socket as stdin (package protocol: the frames, and the flags).
// It starts as root, compiles python.wasm with wazero's compiler engine through the compilation
// cache the driver names, tells the driver it is ready and waits, in the driver's pool, to be
// given a sandbox. Configured, it drops to that sandbox's own unprivileged uid and gid (no
// supplementary groups, so no capabilities; no_new_privs) and serves that one sandbox until the
// driver kills it or closes the socket (EOF ends it at once, also mid-run).
//
// # What it may touch
//
//   - Before its configuration, as root: the image's python.wasm and the compilation cache.
//   - After it: no host path. Its mounts come as directory descriptors the driver opened
//     (SCM_RIGHTS), and every guest path is resolved by the kernel beneath its mount's descriptor
//     (hostFS: openat2 RESOLVE_BENEATH, no magic links). Link creation is refused; blocked paths
//     inside a mount are cut out of it (lookups ENOENT, creation EACCES, hidden from listings,
//     the directories leading to them cannot be renamed; in such a mount no symlink is
//     followed). Between runs it empties the runs' working directory (pyrunner.WorkDir) through
//     its descriptor, as the sandbox's user.
//   - The guest sees those mounts and nothing else — the standard library (read-only) at
//     /usr/local/lib, the sandbox's /tmp, the working directory, the sandbox's own mounts — and
//     the run's private in-memory directory at protocol.RunDir (runDir).
//
// # Runs
//
// Every run is a fresh instance of the compiled module running `python -I -u -B -c BOOTSTRAP`,
// which runs the runner shared with the container driver (package pyrunner) from the run's
// private directory; output streams to the driver as the guest writes it. The interpreter is
// started ahead of its run (the standby, see instance): once configured, and after each run when
// the driver says so (protocol.FrameStandby), the worker instantiates the next run's instance;
// CPython starts up in it and waits in the bootstrap until a run hands it its environment and
// code. A trap of the guest ends its run with exit code 134 and a crash line on stderr, named a
// stack overflow when it is one (stackOverflow); the next run gets a fresh instance.
//
// A run in a code context (protocol.Run.Context) is the exception: it runs in its context's
// long-lived instance, which loops over runs in the same globals (context.go). All instances of
// the worker draw on one memory budget, the sandbox's cap (memoryBudget).
//
// # The four traps of wazero
//
//  1. Symlink escape: sysfs.DirFS lets the guest create relative symlinks that the host then
//     follows out of the mount. hostFS refuses Symlink and Link (EPERM) and resolves every path in
//     the kernel beneath the mount, so neither guest-made nor pre-existing host symlinks, nor
//     "..", leave it.
//  2. time.sleep ignores deadlines: nothing inside the worker is trusted to stop on time. The
//     driver enforces a run's timeout and cancellation by SIGKILLing the worker's process group,
//     whatever the guest is doing.
//  3. WithCloseOnContextDone makes CPU-bound Python 2–3.5× slower: it is off. Killing the worker
//     is the way a run is stopped; the sandbox then gets a fresh worker for its next run.
//  4. The default memory allocator grows linear memory by copying (host RSS ≈ 4× the guest's):
//     memoryAllocator reserves the sandbox's cap with mmap and grows in place, and enforces the
//     cap (a grow past it fails, and Python raises MemoryError).
package worker

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/experimental/sysfs"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"github.com/tetratelabs/wazero/sys"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// compileLimitPages is the memory limit the module is compiled with: wasm32's whole 4 GiB. The
// limit is fixed when a module is compiled (wazero bakes it into the module's memory section), and
// a worker is compiled before it knows its sandbox, so each sandbox's own cap is enforced by the
// memory allocator instead (see memoryAllocator), which the guest cannot tell apart.
const compileLimitPages = 65536

// bootstrap is the -c program of every run. It compiles the runner from the run's private
// directory, then reads the run's header from /.sandbox/run — which blocks until the run is
// handed to the instance: an instance is started ahead of its run (a standby, see instance) and
// waits here. The header is "<max output>\n" followed by the run's environment as "K=V\0"…; the
// environment replaces os.environ (and so the C environment), the limit becomes the runner's
// argv[2]. Then it enters pyrunner.WorkDir (the working directory of runs in every mode; /tmp or
// "/" when the sandbox has none) and executes the runner, which reads the code from the same
// directory (see pyrunner). An empty header (a standby that was not needed) ends the instance at once.
const bootstrap = `import os, sys
def _start():
    with open("` + protocol.RunDir + `/runner", "rb") as f:
        r = compile(f.read(), "<sandbox-runner>", "exec")
    with open("` + protocol.RunDir + `/run", "rb") as f:
        h = f.read()
    if not h:
        raise SystemExit(0)
    limit, _, env = h.partition(b"\n")
    sys.argv[2] = limit.decode()
    os.environ.clear()
    for kv in env.split(b"\0")[:-1]:
        k, _, v = kv.partition(b"=")
        os.environb[k] = v
    for d in ("` + pyrunner.WorkDir + `", "/tmp"):
        try:
            os.chdir(d)
            break
        except OSError:
            pass
    return r
exec(_start())
`

// runArgs is the command line of a runner instance: the runner's limit (argv[2]) is a
// placeholder until the bootstrap reads the run's.
var runArgs = []string{"python", "-I", "-u", "-B", "-c", bootstrap, "0", "0", protocol.RunDir + "/code", protocol.RunDir + "/result",
	protocol.RunDir + "/" + pyrunner.AgentFile}

// runHeader is what the bootstrap reads from /.sandbox/run: the output limit and the environment.
func runHeader(maxOut int, env []string) []byte {
	b := []byte(strconv.Itoa(maxOut) + "\n")
	for _, kv := range env {
		b = append(append(b, kv...), 0)
	}
	return b
}

// Main runs a worker process (the protocol.WorkerCommand subcommand) and returns its exit code. Its
// arguments: --image DIR (holding python.wasm), --cache DIR (wazero's compilation cache), --parent
// PID (the driver's process). Started as root, it becomes its sandbox's user when configured. It
// speaks package protocol on its stdin, a unix socket; it is not meant to be run by hand. It
// exits when the socket reaches EOF, and dies with its parent (Pdeathsig).
func Main(args []string) int {
	fl := flag.NewFlagSet(protocol.WorkerCommand, flag.ContinueOnError)
	var o workerOptions
	fl.StringVar(&o.image, "image", "", "directory holding python.wasm")
	fl.StringVar(&o.cache, "cache", "", "wazero compilation cache directory")
	fl.IntVar(&o.parent, "parent", 0, "the driver's pid")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if o.image == "" || o.cache == "" {
		fmt.Fprintln(os.Stderr, "wasm-worker: --image and --cache are required")
		return 2
	}
	if err := runWorker(o); err != nil {
		fmt.Fprintf(os.Stderr, "wasm-worker: %v\n", err)
		return 1
	}
	return 0
}

// worker is the worker process's state.
type worker struct {
	rt       wazero.Runtime
	compiled wazero.CompiledModule
	base     wazero.ModuleConfig
	fw       *protocol.Writer

	parent     int // the driver's pid
	configured bool
	memory     int64
	budget     *memoryBudget // the linear memory all its instances may hold together (memory)
	contexts   map[string]*codeContext
	env        []string // a standby's environment (protocol.Config.Env)
	mounts     []workerMount
	standby    *instance                 // the next run's instance, started and waiting (nil: none)
	answers    chan []byte               // the host's answers to the running run's agent calls (FrameAnswer)
	serving    atomic.Pointer[agentChan] // the running run's agent channel (nil: no run)
}

type workerOptions struct {
	image, cache string
	parent       int
}

type workerMount struct {
	path string
	fs   *hostFS // nil for an empty directory
}

// emptyDir is the file system of an Empty mount: a read-only directory with nothing in it.
var emptyDir = &runDir{entries: map[string]*runEntry{}}

func runWorker(o workerOptions) error {
	in, out, err := protocolFiles()
	if err != nil {
		return err
	}
	// Nothing the worker does may gain privileges (it runs no program, but say so anyway). The
	// flag is per thread and the Go runtime has started several already: set it on all of them
	// (threads started later inherit it). A build with cgo cannot (ENOTSUP): this thread only.
	_, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0)
	if errno == syscall.ENOTSUP {
		errno = 0
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			errno = err.(syscall.Errno)
		}
	}
	if errno != 0 {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", errno)
	}

	ctx := context.Background()
	start := time.Now()
	bin, err := os.ReadFile(filepath.Join(o.image, "python.wasm"))
	if err != nil {
		return err
	}
	cache, err := wazero.NewCompilationCacheWithDir(o.cache)
	if err != nil {
		return fmt.Errorf("compilation cache: %w", err)
	}
	rc := wazero.NewRuntimeConfigCompiler().
		WithCompilationCache(cache).
		WithCloseOnContextDone(false). // trap 3: runs end by killing the process instead
		WithMemoryLimitPages(compileLimitPages)
	rt := wazero.NewRuntimeWithConfig(ctx, rc)
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, rt); err != nil {
		return fmt.Errorf("wasi: %w", err)
	}
	compiled, err := rt.CompileModule(ctx, bin)
	if err != nil {
		return fmt.Errorf("compile %s: %w", filepath.Join(o.image, "python.wasm"), err)
	}
	took := time.Since(start)
	bin = nil
	runtime.GC()
	debug.FreeOSMemory()

	w := &worker{
		rt: rt, compiled: compiled, fw: protocol.NewWriter(out), parent: o.parent, answers: make(chan []byte, 1),
		contexts: map[string]*codeContext{},
		base: wazero.NewModuleConfig().WithName("").
			WithSysWalltime().WithSysNanotime().WithSysNanosleep().
			WithRandSource(rand.Reader),
	}
	if err := w.fw.SendJSON(protocol.FrameReady, protocol.Ready{Pid: os.Getpid(), CompileNS: took.Nanoseconds()}); err != nil {
		return err
	}
	// Frames are read by their own goroutine so that the end of the host (EOF on stdin) ends the
	// worker at once, also in the middle of a run (Pdeathsig does it too; this covers the rest).
	frames := make(chan inFrame)
	fdr := protocol.NewFDReader(in)
	go readFrames(bufio.NewReaderSize(fdr, 64<<10), frames, w.answers)
	for f := range frames {
		switch f.typ {
		case protocol.FrameConfig:
			var rep protocol.Reply
			if err := w.configure(f.p, fdr.Take()); err != nil {
				rep.Error = err.Error()
			}
			if err := w.fw.SendJSON(protocol.FrameConfigured, rep); err != nil {
				return err
			}
		case protocol.FrameRun:
			var m protocol.Run
			if err := json.Unmarshal(f.p, &m); err != nil {
				return fmt.Errorf("run message: %w", err)
			}
			if !w.configured {
				return errors.New("run before config")
			}
			ex, inst := w.run(m)
			if err := w.fw.SendJSON(protocol.FrameExit, ex); err != nil {
				return err
			}
			inst.alloc.release()
			w.emptyWorkDir() // before the next frame: a standby or a run
		case protocol.FrameContext:
			if !w.configured {
				return errors.New("context operation before config")
			}
			var rep protocol.Reply
			if err := w.contextOp(f.p); err != nil {
				if errors.Is(err, errStuck) {
					return err
				}
				rep.Error = err.Error()
			}
			if err := w.fw.SendJSON(protocol.FrameContextDone, rep); err != nil {
				return err
			}
		case protocol.FrameStandby:
			if !w.configured {
				return errors.New("standby before config")
			}
			w.startStandby()
		default:
			return fmt.Errorf("unexpected frame %q", f.typ)
		}
	}
	return nil
}

type inFrame struct {
	typ byte
	p   []byte
}

// readFrames passes the host's frames to the worker's loop — but answers to agent calls to
// answers, for the run waiting for them (the loop waits for the run) —; at EOF (the host closed
// its end or is gone) it ends the process, whatever the loop is doing.
func readFrames(r io.Reader, out chan<- inFrame, answers chan<- []byte) {
	for {
		typ, p, err := protocol.ReadFrame(r)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				fmt.Fprintf(os.Stderr, "wasm-worker: reading from the host: %v\n", err)
				os.Exit(1)
			}
			os.Exit(0)
		}
		if typ == protocol.FrameAnswer {
			select {
			case answers <- p:
			default:
				fmt.Fprintln(os.Stderr, "wasm-worker: an answer no agent call waits for: dropped")
			}
			continue
		}
		out <- inFrame{typ, p}
	}
}

// protocolFiles moves the control socket off descriptor 0 (to a fresh close-on-exec one) and
// puts /dev/null on 0 and stderr on 1, so nothing printed by accident can corrupt the protocol.
func protocolFiles() (in *net.UnixConn, out io.Writer, err error) {
	fd, err := unix.FcntlInt(0, unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, nil, fmt.Errorf("dup stdin: %w", err)
	}
	null, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := unix.Dup2(null, 0); err != nil {
		return nil, nil, err
	}
	unix.Close(null)
	if err := unix.Dup2(2, 1); err != nil {
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fd), "control")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("stdin is not a unix socket")
	}
	return uc, uc, nil
}

// dropPrivileges makes a worker started as root the unprivileged uid/gid, its sandbox's, with no
// supplementary groups and so no capabilities, once it is given its sandbox (it has compiled its
// module: the compilation cache is the only path it writes; mounts come as descriptors from the
// driver). Changing credentials clears the parent-death signal, so it is set again, and the
// worker exits if the driver (parent) died in between.
func dropPrivileges(uid, gid, parent int) error {
	if os.Geteuid() != 0 {
		return nil
	}
	if uid <= 0 || gid <= 0 {
		return fmt.Errorf("no user to run as (uid %d, gid %d)", uid, gid)
	}
	// The syscall package applies these to every thread of the process.
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("pdeathsig: %w", err)
	}
	if parent != 0 && os.Getppid() != parent {
		return errors.New("the driver is gone")
	}
	return nil
}

// configure builds the sandbox's mounts (see protocol.Config) on the directory descriptors fds. A
// worker is configured once.
func (w *worker) configure(p []byte, fds []int) error {
	used := map[int]bool{}
	defer func() {
		for i, fd := range fds {
			if !used[i] {
				unix.Close(fd)
			}
		}
	}()
	if w.configured {
		return errors.New("already configured")
	}
	var c protocol.Config
	if err := json.Unmarshal(p, &c); err != nil {
		return err
	}
	if c.MemoryBytes < wasmPage {
		return fmt.Errorf("memory cap %d is below one page", c.MemoryBytes)
	}
	if err := dropPrivileges(c.UID, c.GID, w.parent); err != nil {
		return err
	}
	mounts, err := buildMounts(c, fds, used)
	if err != nil {
		for _, m := range mounts {
			if m.fs != nil {
				m.fs.close()
			}
		}
		return err
	}
	w.mounts, w.memory, w.env, w.configured = mounts, c.MemoryBytes, c.Env, true
	w.budget = newMemoryBudget(c.MemoryBytes)
	w.emptyWorkDir() // what a killed worker's run left
	return nil
}

// emptyWorkDir empties the runs' working directory (pyrunner.WorkDir), if the sandbox has one.
func (w *worker) emptyWorkDir() {
	for _, m := range w.mounts {
		if m.path == pyrunner.WorkDir && m.fs != nil {
			if err := pyrunner.EmptyDir(procFD(m.fs.root)); err != nil {
				fmt.Fprintf(os.Stderr, "wasm-worker: emptying the working directory: %v\n", err)
			}
		}
	}
}

// buildMounts makes every mount on its descriptor (marking it used) and wires nested mounts and
// blocked paths into the mount that holds them (see hostFS).
func buildMounts(c protocol.Config, fds []int, used map[int]bool) ([]workerMount, error) {
	ms := append([]protocol.Mount(nil), c.Mounts...)
	sort.SliceStable(ms, func(i, j int) bool { return ms[i].Path < ms[j].Path })
	var out []workerMount
	for _, m := range ms {
		if !path.IsAbs(m.Path) || path.Clean(m.Path) != m.Path || m.Path == "/" {
			return out, fmt.Errorf("mount path %q is not an absolute clean path below /", m.Path)
		}
		if m.Empty {
			// Reached by absolute paths only (the longest mount prefix wins); through a directory
			// descriptor of an enclosing mount the path is whatever that mount holds.
			out = append(out, workerMount{path: m.Path})
			continue
		}
		if m.FD < 0 || m.FD >= len(fds) || used[m.FD] {
			return out, fmt.Errorf("mount %s: no directory descriptor", m.Path)
		}
		used[m.FD] = true
		h := newHostFS(fds[m.FD], m.HostDir, m.ReadOnly)
		if parent := holder(out, m.Path); parent != nil && parent.fs != nil {
			parent.fs.nest(relTo(m.Path, parent.path), h)
		}
		out = append(out, workerMount{path: m.Path, fs: h})
	}
	for _, b := range c.Blocked {
		parent := holder(out, b)
		if parent == nil || parent.fs == nil {
			continue // outside every mount (or in an empty one): absent anyway
		}
		if parent.path == b {
			return out, fmt.Errorf("blocked path %s is a mount (the driver drops such mounts)", b)
		}
		parent.fs.block(relTo(b, parent.path))
	}
	return out, nil
}

// holder returns the innermost mount strictly containing p (or equal to it), or nil.
func holder(ms []workerMount, p string) *workerMount {
	var best *workerMount
	for i := range ms {
		if p == ms[i].path || strings.HasPrefix(p, ms[i].path+"/") {
			if best == nil || len(ms[i].path) > len(best.path) {
				best = &ms[i]
			}
		}
	}
	return best
}

func relTo(p, base string) string { return strings.TrimPrefix(strings.TrimPrefix(p, base), "/") }

// stream forwards a guest's output stream to the host as it is written, keeping at most max
// bytes; the rest is dropped and flagged. Until its run is attached (a standby's start-up) it
// holds what the guest writes, at most maxHeld bytes, and passes it on at attach, as part of the
// run's output — where a start-up's output went before instances were started ahead of runs.
type stream struct {
	fw  *protocol.Writer
	typ byte

	mu        sync.Mutex
	attached  bool
	held      []byte
	max       int
	n         int
	truncated bool
}

// maxHeld bounds what a stream holds before its run is attached.
const maxHeld = 64 << 10

func (s *stream) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.attached {
		take := min(len(p), maxHeld-len(s.held))
		s.held = append(s.held, p[:take]...)
		s.truncated = s.truncated || take < len(p)
		return len(p), nil
	}
	s.forward(p)
	return len(p), nil
}

// forward sends p, within the budget (s.mu held).
func (s *stream) forward(p []byte) {
	take := min(len(p), s.max-s.n)
	if take > 0 {
		if err := s.fw.Send(s.typ, p[:take]); err != nil {
			// The host is gone: nobody wants the run any more.
			os.Exit(1)
		}
		s.n += take
	}
	if take < len(p) {
		s.truncated = true
	}
}

// attach makes the stream its run's, with a budget of max bytes, and sends what it held.
func (s *stream) attach(max int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.attached {
		return
	}
	s.attached, s.max = true, max
	if len(s.held) > 0 {
		s.forward(s.held)
		s.held = nil
	}
}

func (s *stream) wasTruncated() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.truncated
}

// instance is one fresh instance of the compiled module, running in its own goroutine. A runner
// instance (rd set) can start before its run: CPython starts up and the bootstrap waits in its
// read of /.sandbox/run until deliver hands it the run (or discard tells it to exit). The
// worker keeps one such standby per sandbox, started after the previous run's instance has
// ended (protocol.FrameStandby), so a run finds its interpreter started: still a fresh
// instance, which has run nothing before its run and is closed after it.
type instance struct {
	env            []string // the environment it was started with (WASI environ)
	rd             *runDir  // nil for a run with its own command line (protocol.Run.Args)
	stdout, stderr *stream
	alloc          *memoryAllocator
	maxOutput      int           // the run's output budget per stream, set before deliver
	done           chan struct{} // closed when the instance has ended and been closed
	err            error         // instantiate's, set before done closes
	overflow       bool          // err is a trap caused by a stack overflow, set before done closes
	ended          time.Time     // set before done closes
}

// start starts a fresh instance with command line args and environment env; rd, if not nil, is
// mounted at /.sandbox. Output is held until the run is attached.
func (w *worker) start(args, env []string, rd *runDir) *instance {
	inst := &instance{env: env, rd: rd,
		stdout: &stream{fw: w.fw, typ: protocol.FrameStdout}, stderr: &stream{fw: w.fw, typ: protocol.FrameStderr},
		alloc: newMemoryAllocator(w.memory, w.budget), done: make(chan struct{})}
	var dir experimentalsys.FS
	if rd != nil {
		dir = rd
	}
	w.launch(inst, args, dir, inst.stdout, inst.stderr)
	return inst
}

// launch instantiates inst's module in a goroutine of its own, with command line args,
// environment inst.env, dir (if not nil) mounted at protocol.RunDir, and stdout and stderr.
func (w *worker) launch(inst *instance, args []string, dir experimentalsys.FS, stdout, stderr io.Writer) {
	env := inst.env
	fsc := wazero.NewFSConfig()
	for _, mt := range w.mounts {
		if mt.fs == nil {
			fsc = fsc.(sysfs.FSConfig).WithSysFSMount(emptyDir, mt.path)
		} else {
			fsc = fsc.(sysfs.FSConfig).WithSysFSMount(mt.fs, mt.path)
		}
	}
	if dir != nil {
		fsc = fsc.(sysfs.FSConfig).WithSysFSMount(dir, protocol.RunDir)
	}
	cfg := w.base.WithArgs(args...).WithStdout(stdout).WithStderr(stderr).WithFSConfig(fsc)
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			cfg = cfg.WithEnv(k, v)
		}
	}
	ctx := experimental.WithMemoryAllocator(context.Background(), inst.alloc)
	go func() {
		inst.overflow, inst.err = instantiate(ctx, w.rt, w.compiled, cfg)
		inst.ended = time.Now()
		close(inst.done)
	}()
}

// isDone reports whether the instance has ended.
func (inst *instance) isDone() bool { return isClosed(inst.done) }

// isClosed reports whether ch is closed (or has a value ready), without waiting.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// discard ends an instance that will get no run (a standby waiting for one ends at once; one
// still starting up ends when it reaches the wait) and waits until it is gone.
func (inst *instance) discard() {
	if inst.rd != nil {
		inst.rd.cancel()
	}
	<-inst.done
	inst.alloc.release()
}

// startStandby starts the sandbox's standby, unless it has one. A standby that ended by itself
// (it failed to start) is replaced.
func (w *worker) startStandby() {
	if w.standby != nil {
		if !w.standby.isDone() {
			return
		}
		w.standby.discard()
	}
	inst := w.startRunner(w.env)
	rd := inst.rd
	w.standby = inst
	go func() {
		select {
		case <-rd.parked:
		case <-inst.done:
			return
		}
		select {
		case <-rd.handed: // a run is waiting: no collection now (the Go runtime's pacing does it)
		default:
			// Collect what the last instances left on the Go heap, and give the memory back,
			// while the sandbox is idle: an idle worker holds little, and no run pays for (or is
			// throttled by its CPU quota for) a collection.
			debug.FreeOSMemory()
		}
	}()
}

// startRunner starts a runner instance with environment env: it waits in the bootstrap for its
// run, whose output it takes on when it takes the run.
func (w *worker) startRunner(env []string) *instance {
	var inst *instance
	rd := newRunDir([]byte(pyrunner.Source), func() { inst.attach() })
	inst = w.start(runArgs, env, rd)
	return inst
}

// dropStandby ends the standby, if any.
func (w *worker) dropStandby() {
	if w.standby != nil {
		w.standby.discard()
		w.standby = nil
	}
}

// attach makes the instance's output the run's, with the run's budget.
func (inst *instance) attach() {
	inst.stdout.attach(inst.maxOutput)
	inst.stderr.attach(inst.maxOutput)
}

// startupEnv reports whether variable k is read by CPython (under -I) while it starts, before
// the bootstrap sets the run's environment: the locale's. A run that sets one of these
// differently from the standby gets a fresh instance started with its environment.
func startupEnv(k string) bool {
	return k == "LANG" || strings.HasPrefix(k, "LC_") || strings.HasPrefix(k, "PYTHON")
}

// sameStartupEnv reports whether two environments agree on every startupEnv variable.
func sameStartupEnv(a, b []string) bool {
	pick := func(env []string) map[string]string {
		m := map[string]string{}
		for _, kv := range env {
			if k, v, _ := strings.Cut(kv, "="); startupEnv(k) {
				m[k] = v
			}
		}
		return m
	}
	return maps.Equal(pick(a), pick(b))
}

// run executes one run in a fresh instance of the compiled module: the standby when there is one
// that fits (its start-up then is not part of the run), else one started now. It returns how the
// run ended and its instance, ended, whose memory the caller releases once the run is reported.
func (w *worker) run(m protocol.Run) (protocol.Exit, *instance) {
	maxOut := m.MaxOutput
	if maxOut <= 0 {
		maxOut = protocol.DefaultMaxOutput
	}
	if len(m.Args) > 0 {
		// A command line of its own (Baseline, tests): no runner, so no use for the standby,
		// which is ended first so that it takes no memory and no CPU from the run.
		w.dropStandby()
		from := time.Now()
		inst := w.start(m.Args, m.Env, nil)
		inst.stdout.attach(maxOut)
		inst.stderr.attach(maxOut)
		<-inst.done
		return inst.exit(from, false), inst
	}
	if m.Context != "" {
		return w.runContext(m, maxOut)
	}
	inst := w.standby
	w.standby = nil
	if inst != nil && (inst.isDone() || !sameStartupEnv(inst.env, m.Env)) {
		inst.discard()
		inst = nil
	}
	header := runHeader(maxOut, m.Env)
	for {
		warm := inst != nil
		if !warm {
			inst = w.startRunner(m.Env)
		}
		from := time.Now()
		inst.maxOutput = maxOut
		agent := w.runAgentChan(m.Agent)
		inst.rd.deliver(header, []byte(m.Code), agent)
		<-inst.done
		w.endAgentChan(agent)
		if warm && !inst.rd.took() {
			// The standby ended before it took the run (it failed to start): what it printed is
			// not the run's; the run gets a fresh instance.
			inst.alloc.release()
			inst = nil
			continue
		}
		// An instance that failed before it took the run: its output is the run's.
		inst.attach()
		return inst.exit(from, warm), inst
	}
}

// exit describes how the instance's run ended; from is when the run began (for a standby: when
// it was handed the run, so its start-up is not counted).
func (inst *instance) exit(from time.Time, warm bool) protocol.Exit {
	ex := protocol.Exit{DurationNS: inst.ended.Sub(from).Nanoseconds(), Standby: warm}
	err := inst.err
	var exit *sys.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		ex.ExitCode = int(exit.ExitCode())
	default:
		ex.ExitCode = protocol.TrapExitCode
		ex.Trap = err.Error()
		if len(ex.Trap) > 4096 {
			ex.Trap = ex.Trap[:4096]
		}
		first, _, _ := strings.Cut(ex.Trap, "\n")
		if inst.overflow {
			ex.StackOverflow = true
			first = protocol.StackOverflowMessage + "; " + first
		}
		fmt.Fprintf(inst.stderr, "sandbox: the interpreter crashed (%s)\n", first)
	}
	peak, refused := inst.alloc.stats()
	ex.MemoryPeak, ex.GrowRefused = int64(peak), refused
	ex.StdoutTruncated, ex.StderrTruncated = inst.stdout.wasTruncated(), inst.stderr.wasTruncated()
	if inst.rd != nil {
		if rep := inst.rd.report(); len(rep) > 0 && json.Valid(rep) {
			ex.Report = rep
		}
	}
	return ex
}

// instantiate runs the module's _start in a fresh instance and closes it. A panic of the runtime
// (e.g. a memory cap below the module's initial memory) is returned as an error. overflow reports
// whether the run ended in a trap caused by a stack overflow (see stackOverflow).
func instantiate(ctx context.Context, rt wazero.Runtime, compiled wazero.CompiledModule, cfg wazero.ModuleConfig) (overflow bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("wasm runtime panic: %v", r)
		}
	}()
	// _start is called here rather than by InstantiateModule, which closes the instance on a
	// trap: the stack pointer is read after it.
	mod, err := rt.InstantiateModule(ctx, compiled, cfg.WithStartFunctions())
	if err != nil {
		return false, err
	}
	defer mod.Close(ctx)
	sp := mod.ExportedGlobal(stackPointerExport)
	var top uint32 // the stack pointer before the guest ran: with the stack first, the stack's end
	if sp != nil {
		top = uint32(sp.Get())
	}
	start := mod.ExportedFunction("_start")
	if start == nil {
		return false, errors.New("python.wasm exports no _start function")
	}
	if _, err = start.Call(ctx); err != nil {
		var exit *sys.ExitError
		if errors.As(err, &exit) {
			if exit.ExitCode() == 0 {
				err = nil
			}
			return false, err
		}
		return stackOverflow(err, sp, top), err
	}
	return false, nil
}

// stackPointerExport is the global python.wasm exports its C stack pointer as
// (scripts/build-python-wasm.sh links it with -Wl,--export=__stack_pointer).
const stackPointerExport = "__stack_pointer"

// stackMargin is how close to address 0 the stack pointer must be for an out-of-bounds access to
// count as a stack overflow: more than the largest stack frame of a function that does not move
// the global stack pointer (a leaf), far less than the 8 MiB stack.
const stackMargin = 64 << 10

// stackOverflow reports whether trap err of an instance was a stack overflow. Two stacks can
// overflow. The C stack that clang keeps in linear memory (for locals whose address is taken):
// python.wasm has it first, at addresses 0 up to top, growing down, so an overflow moves the
// stack pointer (the exported global sp) below 0, where it wraps past top, and the next access
// is out of bounds; a function that has not yet stored its lowered stack pointer leaves it within
// stackMargin of 0. And wazero's own call stack, which holds the rest of every frame (about
// 100 MB at most: wazero's ceiling, which the heaviest recursion, Python through C functions,
// reaches with about 3 MiB of the C stack used): past it wazero fails the call with
// "stack overflow" (without its "wasm error: " prefix). Any other trap (an out-of-bounds access
// with the stack pointer in the stack's body, an invalid table access, ...) is not one. Without
// the export (an image built before it) only wazero's is recognised.
func stackOverflow(err error, sp api.Global, top uint32) bool {
	msg := err.Error()
	switch {
	case strings.HasPrefix(msg, "stack overflow"), strings.HasPrefix(msg, "wasm error: stack overflow"):
		return true
	case strings.HasPrefix(msg, "wasm error: out of bounds memory access") && sp != nil && top > stackMargin:
		v := uint32(sp.Get())
		return v < stackMargin || v > top
	}
	return false
}
