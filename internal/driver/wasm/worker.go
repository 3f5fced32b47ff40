package wasm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/experimental/sysfs"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"github.com/tetratelabs/wazero/sys"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// WorkerCommand is the name of sandboxd's hidden subcommand that runs a worker: cmd/sandboxd
// dispatches `sandboxd wasm-worker …` to WorkerMain before anything else happens.
const WorkerCommand = "wasm-worker"

// compileLimitPages is the memory limit the module is compiled with: wasm32's whole 4 GiB. The
// limit is fixed when a module is compiled (wazero bakes it into the module's memory section), and
// a worker is compiled before it knows its sandbox, so each sandbox's own cap is enforced by the
// memory allocator instead (see memoryAllocator), which the guest cannot tell apart.
const compileLimitPages = 65536

// bootstrap is the -c program of every run: it starts in /tmp (the working directory of runs in
// every mode; "/" when the sandbox has no /tmp) and executes the runner from the run's private
// directory, which then reads the code from there (see pyrunner).
const bootstrap = `import os
try:
    os.chdir("/tmp")
except OSError:
    pass
with open("` + runDirPath + `/runner", "rb") as f:
    b = f.read()
del f
exec(compile(b, "<sandbox-runner>", "exec"))
`

// trapExitCode is the exit code of a run whose guest trapped (the interpreter crashed): what a
// native process killed by SIGABRT reports.
const trapExitCode = 128 + 6

// WorkerMain runs a worker process (the wasm-worker subcommand) and returns its exit code. Its
// arguments: --image DIR (holding python.wasm), --cache DIR (wazero's compilation cache), --uid
// and --gid (whom to become once the module is compiled, when started as root), --parent PID (the
// driver's process). It speaks the protocol of protocol.go on its stdin, a unix socket; it is not
// meant to be run by hand. It exits when the socket reaches EOF, and dies with its parent
// (Pdeathsig).
func WorkerMain(args []string) int {
	fl := flag.NewFlagSet(WorkerCommand, flag.ContinueOnError)
	var o workerOptions
	fl.StringVar(&o.image, "image", "", "directory holding python.wasm")
	fl.StringVar(&o.cache, "cache", "", "wazero compilation cache directory")
	fl.IntVar(&o.uid, "uid", -1, "user to run as once compiled (when started as root)")
	fl.IntVar(&o.gid, "gid", -1, "group to run as once compiled (when started as root)")
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
	fw       *frameWriter

	configured bool
	memory     int64
	mounts     []workerMount
}

type workerOptions struct {
	image, cache string
	uid, gid     int
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
	// Nothing the worker does may gain privileges (it runs no program, but say so anyway).
	_ = unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

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
	if err := dropPrivileges(o); err != nil {
		return err
	}

	w := &worker{
		rt: rt, compiled: compiled, fw: &frameWriter{w: out},
		base: wazero.NewModuleConfig().WithName("").
			WithSysWalltime().WithSysNanotime().WithSysNanosleep().
			WithRandSource(rand.Reader),
	}
	if err := w.fw.sendJSON(frameReady, readyMsg{Pid: os.Getpid(), CompileNS: took.Nanoseconds()}); err != nil {
		return err
	}
	// Frames are read by their own goroutine so that the end of the host (EOF on stdin) ends the
	// worker at once, also in the middle of a run (Pdeathsig does it too; this covers the rest).
	frames := make(chan inFrame)
	fdr := newFDReader(in)
	go readFrames(bufio.NewReaderSize(fdr, 64<<10), frames)
	for f := range frames {
		switch f.typ {
		case frameConfig:
			var rep replyMsg
			if err := w.configure(f.p, fdr.take()); err != nil {
				rep.Error = err.Error()
			}
			if err := w.fw.sendJSON(frameConfigured, rep); err != nil {
				return err
			}
		case frameRun:
			var m runMsg
			if err := json.Unmarshal(f.p, &m); err != nil {
				return fmt.Errorf("run message: %w", err)
			}
			if !w.configured {
				return errors.New("run before config")
			}
			ex := w.run(m)
			if err := w.fw.sendJSON(frameExit, ex); err != nil {
				return err
			}
			// Collect what the instance left on the Go heap, without holding up the next run.
			go runtime.GC()
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

// readFrames passes the host's frames to the worker's loop; at EOF (the host closed its end or
// is gone) it ends the process, whatever the loop is doing.
func readFrames(r io.Reader, out chan<- inFrame) {
	for {
		typ, p, err := readFrame(r)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				fmt.Fprintf(os.Stderr, "wasm-worker: reading from the host: %v\n", err)
				os.Exit(1)
			}
			os.Exit(0)
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

// dropPrivileges makes a worker started as root the unprivileged o.uid/o.gid, with no
// supplementary groups and so no capabilities, once it has compiled its module (the compilation
// cache is the only path it writes; mounts come as descriptors from the driver). Changing
// credentials clears the parent-death signal, so it is set again, and the worker exits if the
// driver died in between.
func dropPrivileges(o workerOptions) error {
	if os.Geteuid() != 0 || o.uid < 0 || o.gid < 0 {
		return nil
	}
	// The syscall package applies these to every thread of the process.
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(o.gid, o.gid, o.gid); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(o.uid, o.uid, o.uid); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("pdeathsig: %w", err)
	}
	if o.parent != 0 && os.Getppid() != o.parent {
		return errors.New("the driver is gone")
	}
	return nil
}

// configure builds the sandbox's mounts (see configMsg) on the directory descriptors fds. A
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
	var c configMsg
	if err := json.Unmarshal(p, &c); err != nil {
		return err
	}
	if c.MemoryBytes < wasmPage {
		return fmt.Errorf("memory cap %d is below one page", c.MemoryBytes)
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
	w.mounts, w.memory, w.configured = mounts, c.MemoryBytes, true
	return nil
}

// buildMounts makes every mount on its descriptor (marking it used) and wires nested mounts and
// blocked paths into the mount that holds them (see hostFS).
func buildMounts(c configMsg, fds []int, used map[int]bool) ([]workerMount, error) {
	ms := append([]mountMsg(nil), c.Mounts...)
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
// bytes; the rest is dropped and flagged.
type stream struct {
	fw        *frameWriter
	typ       byte
	max       int
	n         int
	truncated bool
}

func (s *stream) Write(p []byte) (int, error) {
	take := min(len(p), s.max-s.n)
	if take > 0 {
		if err := s.fw.send(s.typ, p[:take]); err != nil {
			// The host is gone: nobody wants the run any more.
			os.Exit(1)
		}
		s.n += take
	}
	if take < len(p) {
		s.truncated = true
	}
	return len(p), nil
}

// defaultMaxOutput is the per-stream budget when a run asks for none.
const defaultMaxOutput = 1 << 20

// run executes one run in a fresh instance of the compiled module.
func (w *worker) run(m runMsg) exitMsg {
	maxOut := m.MaxOutput
	if maxOut <= 0 {
		maxOut = defaultMaxOutput
	}
	stdout := &stream{fw: w.fw, typ: frameStdout, max: maxOut}
	stderr := &stream{fw: w.fw, typ: frameStderr, max: maxOut}
	args := m.Args
	var rd *runDir
	if len(args) == 0 {
		rd = newRunDir([]byte(pyrunner.Source), []byte(m.Code))
		args = []string{"python", "-I", "-u", "-B", "-c", bootstrap, "0", strconv.Itoa(maxOut),
			runDirPath + "/code", runDirPath + "/result"}
	}
	fsc := wazero.NewFSConfig()
	for _, mt := range w.mounts {
		if mt.fs == nil {
			fsc = fsc.(sysfs.FSConfig).WithSysFSMount(emptyDir, mt.path)
		} else {
			fsc = fsc.(sysfs.FSConfig).WithSysFSMount(mt.fs, mt.path)
		}
	}
	if rd != nil {
		fsc = fsc.(sysfs.FSConfig).WithSysFSMount(rd, runDirPath)
	}
	cfg := w.base.WithArgs(args...).WithStdout(stdout).WithStderr(stderr).WithFSConfig(fsc)
	for _, kv := range m.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			cfg = cfg.WithEnv(k, v)
		}
	}
	alloc := newMemoryAllocator(w.memory)
	ctx := experimental.WithMemoryAllocator(context.Background(), alloc)

	start := time.Now()
	err := instantiate(ctx, w.rt, w.compiled, cfg)
	ex := exitMsg{DurationNS: time.Since(start).Nanoseconds()}
	var exit *sys.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		ex.ExitCode = int(exit.ExitCode())
	default:
		ex.ExitCode = trapExitCode
		ex.Trap = err.Error()
		if len(ex.Trap) > 4096 {
			ex.Trap = ex.Trap[:4096]
		}
		first, _, _ := strings.Cut(ex.Trap, "\n")
		if _, why, ok := strings.Cut(first, "] failed: "); ok {
			first = why // drop wazero's "module[] function[_start] failed: "
		}
		fmt.Fprintf(stderr, "sandbox: the interpreter crashed (%s)\n", first)
	}
	peak, refused := alloc.stats()
	ex.MemoryPeak, ex.GrowRefused = int64(peak), refused
	ex.StdoutTruncated, ex.StderrTruncated = stdout.truncated, stderr.truncated
	if rd != nil {
		if rep := rd.report(); len(rep) > 0 && json.Valid(rep) {
			ex.Report = rep
		}
	}
	return ex
}

// instantiate runs the module's _start in a fresh instance and closes it. A panic of the runtime
// (e.g. a memory cap below the module's initial memory) is returned as an error.
func instantiate(ctx context.Context, rt wazero.Runtime, compiled wazero.CompiledModule, cfg wazero.ModuleConfig) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("wasm runtime panic: %v", r)
		}
	}()
	var mod api.Module
	mod, err = rt.InstantiateModule(ctx, compiled, cfg)
	if mod != nil {
		_ = mod.Close(ctx)
	}
	return err
}
