package worker

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/sys"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Code contexts (protocol.Run.Context). A context is a long-lived instance of the compiled module
// whose runner loops (runner.py, _sandbox_context_wasi): one run after another in the same
// __main__ globals. Its private directory at protocol.RunDir (contextDir) holds one run's files
// at a time — a runDir, as a fresh run's, plus "status" — and the worker puts the next run's
// there when the loop closes "status" (the run's end). The instance's stdout and stderr are the
// worker's (switchWriter): the run's streams while a run lasts, discarded between runs.
//
// The instance belongs to the code it runs: what it says is believed for its own run only and
// within the fresh runs' caps (output per stream, the report's maxReport, the status's
// maxStatus). Code that ends its run early (closing the loop's "status") or never lets the loop
// come back only breaks its own context: the host's deadline ends the run, by killing the worker.

// contextBootstrap is the -c program of a context's instance: the runner, run with
// `_sandbox_context_dir` set (runner.py dispatches on it).
const contextBootstrap = `with open("` + protocol.RunDir + `/runner", "rb") as f:
    _r = compile(f.read(), "<sandbox-runner>", "exec")
_sandbox_context_dir = "` + protocol.RunDir + `"
del f
exec(_r)
`

// errStuck is an instance the worker could not end: the worker ends instead.
var errStuck = errors.New("an instance is stuck")

// maxStatus bounds what a context's loop writes to "status" (an exit status in decimal).
const maxStatus = 32

// contextStartTimeout bounds a context's start-up (CPython's, in a fresh instance) when the host
// creates one; a run's start-up is bounded by the run's deadline.
const contextStartTimeout = time.Minute

// codeContext is one code context of the worker.
type codeContext struct {
	name           string
	inst           *instance
	dir            *contextDir
	stdout, stderr *switchWriter
}

// contextDir is a context's private directory: the files of its current run (a runDir).
type contextDir struct {
	experimentalsys.UnimplementedFS
	mu  sync.Mutex
	cur *runDir
}

func (c *contextDir) current() *runDir {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// next installs a fresh run's files (the guest waits in its read of "run" for deliver).
func (c *contextDir) next() *runDir {
	rd := newContextRunDir(nil)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = rd
	return rd
}

func (c *contextDir) String() string { return protocol.RunDir }

func (c *contextDir) OpenFile(p string, flag experimentalsys.Oflag, perm fs.FileMode) (experimentalsys.File, experimentalsys.Errno) {
	return c.current().OpenFile(p, flag, perm)
}

func (c *contextDir) Stat(p string) (sys.Stat_t, experimentalsys.Errno) { return c.current().Stat(p) }

func (c *contextDir) Lstat(p string) (sys.Stat_t, experimentalsys.Errno) { return c.current().Lstat(p) }

// newContextRunDir returns a context run's files: a runDir's (the runner only with the first)
// and the write-only "status".
func newContextRunDir(runner []byte) *runDir {
	rd := newRunDir(runner, nil)
	if runner == nil {
		delete(rd.entries, "runner")
	}
	rd.entries["status"] = &runEntry{write: true, max: maxStatus}
	return rd
}

// switchWriter is a context instance's stdout or stderr: the stream of the run it serves, and
// nothing (what is written is dropped) between runs.
type switchWriter struct {
	mu sync.Mutex
	s  *stream
}

func (o *switchWriter) Write(p []byte) (int, error) {
	o.mu.Lock()
	s := o.s
	o.mu.Unlock()
	if s == nil {
		return len(p), nil
	}
	return s.Write(p)
}

func (o *switchWriter) set(s *stream) {
	o.mu.Lock()
	o.s = s
	o.mu.Unlock()
}

// contextWorkDirs are the working directories a context tries, in order (runner.py makes the
// first): a directory of its own in /tmp (kept over restarts of its interpreter, removed when it
// is deleted), else the fresh runs' (emptied after every run), else /tmp.
func contextWorkDirs(name string) []string {
	return []string{"/tmp/" + pyrunner.ContextDirName(name), pyrunner.WorkDir, "/tmp"}
}

// contextOp serves a protocol.ContextOp.
func (w *worker) contextOp(p []byte) error {
	var op protocol.ContextOp
	if err := json.Unmarshal(p, &op); err != nil {
		return fmt.Errorf("context operation: %w", err)
	}
	if !protocol.ValidContextName(op.Name) {
		return fmt.Errorf("invalid context name %q", op.Name)
	}
	switch op.Op {
	case protocol.ContextOpCreate:
		if c := w.contexts[op.Name]; c != nil && !c.inst.isDone() {
			return nil
		}
		_, err := w.startContext(op.Name, contextStartTimeout)
		return err
	case protocol.ContextOpDelete:
		w.deleteContext(op.Name)
		return nil
	}
	return fmt.Errorf("unknown context operation %q", op.Op)
}

// startContext starts context name's instance and waits until its loop waits for a run (at most
// timeout; 0: no bound). An instance of the name that ended is dropped first.
func (w *worker) startContext(name string, timeout time.Duration) (*codeContext, error) {
	if c := w.contexts[name]; c != nil {
		w.endContext(c)
	}
	if len(w.contexts) >= protocol.MaxContexts {
		return nil, fmt.Errorf("this sandbox already has %d code contexts", protocol.MaxContexts)
	}
	rd := newContextRunDir([]byte(pyrunner.Source))
	c := &codeContext{name: name, dir: &contextDir{cur: rd}, stdout: &switchWriter{}, stderr: &switchWriter{}}
	c.inst = &instance{env: w.env, rd: rd, alloc: newMemoryAllocator(w.memory, w.budget), done: make(chan struct{}),
		stdout: &stream{fw: w.fw, typ: protocol.FrameStdout}, stderr: &stream{fw: w.fw, typ: protocol.FrameStderr}}
	args := append([]string{"python", "-I", "-u", "-B", "-c", contextBootstrap, "0", "0"}, contextWorkDirs(name)...)
	w.launch(c.inst, args, c.dir, c.stdout, c.stderr)
	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-rd.parked:
		w.contexts[name] = c
		return c, nil
	case <-c.inst.done:
		c.inst.alloc.release()
		return nil, fmt.Errorf("the context's interpreter ended as it started: %s", ended(c.inst))
	case <-expired:
		// Its goroutine cannot be stopped, nor its memory released: the worker ends on this error
		// (runWorker), and the host, finding it gone, resets the sandbox's contexts.
		return nil, fmt.Errorf("%w: the context's interpreter did not start within %v", errStuck, timeout)
	}
}

// ended says how an instance that ended did.
func ended(inst *instance) string {
	var exit *sys.ExitError
	switch {
	case inst.err == nil:
		return "the interpreter exited (status 0)"
	case errors.As(inst.err, &exit):
		return fmt.Sprintf("the interpreter exited (status %d: os._exit, or a fatal error)", exit.ExitCode())
	case inst.overflow:
		return "the interpreter crashed: " + protocol.StackOverflowMessage
	}
	first, _, _ := strings.Cut(inst.err.Error(), "\n")
	if len(first) > 512 {
		first = first[:512]
	}
	return "the interpreter crashed (" + first + ")"
}

// endContext ends c's instance (a context being deleted, or one that ended) and forgets it.
func (w *worker) endContext(c *codeContext) {
	delete(w.contexts, c.name)
	c.dir.current().cancel()
	<-c.inst.done
	c.inst.alloc.release()
}

// deleteContext ends context name's instance, if any, and removes its working directory.
func (w *worker) deleteContext(name string) {
	if c := w.contexts[name]; c != nil {
		w.endContext(c)
	}
	for _, m := range w.mounts {
		if m.path == "/tmp" && m.fs != nil {
			if err := pyrunner.RemoveContextDir(procFD(m.fs.root), name); err != nil {
				fmt.Fprintf(os.Stderr, "wasm-worker: removing a context's directory: %v\n", err)
			}
		}
	}
}

// runContext executes run m in its context's instance (started now if the worker has none). It
// returns how the run ended and the context's instance (whose freed memory the caller releases).
func (w *worker) runContext(m protocol.Run, maxOut int) (protocol.Exit, *instance) {
	var ex protocol.Exit
	c := w.contexts[m.Context]
	if c != nil && c.inst.isDone() {
		w.endContext(c)
		c = nil
	}
	if c == nil {
		var err error
		ex.ContextNew = true
		if !protocol.ValidContextName(m.Context) {
			err = fmt.Errorf("invalid context name %q", m.Context)
		} else {
			c, err = w.startContext(m.Context, 0)
		}
		if err != nil {
			msg := []byte("sandbox: " + err.Error() + "\n")
			_ = w.fw.Send(protocol.FrameStderr, msg[:min(len(msg), maxOut)])
			ex.ExitCode, ex.ContextEnded = 1, err.Error()
			return ex, &instance{alloc: newMemoryAllocator(w.memory, w.budget)}
		}
	}
	inst, rd := c.inst, c.dir.current()
	inst.rd = rd // its report is this run's
	inst.stdout = &stream{fw: w.fw, typ: protocol.FrameStdout, attached: true, max: maxOut}
	inst.stderr = &stream{fw: w.fw, typ: protocol.FrameStderr, attached: true, max: maxOut}
	c.stdout.set(inst.stdout)
	c.stderr.set(inst.stderr)
	inst.alloc.resetPeak()
	status := make(chan []byte, 1)
	rd.mu.Lock()
	rd.entries["status"].onClose = func(b []byte) {
		if len(b) == 0 {
			return // not the loop's close (the code's, or the instance's end): the run goes on
		}
		c.dir.next()
		status <- b
	}
	rd.mu.Unlock()
	from := time.Now()
	agent := w.runAgentChan(m.Agent)
	defer w.endAgentChan(agent) // the code may go on after its run: not its calls
	rd.deliver(runHeader(maxOut, m.Env), []byte(m.Code), agent)
	select {
	case st := <-status:
		ex.DurationNS = time.Since(from).Nanoseconds()
		code, err := strconv.Atoi(string(st))
		if err != nil {
			code = 1
		}
		ex.ExitCode = code
		peak, refused := inst.alloc.stats()
		ex.MemoryPeak, ex.GrowRefused = int64(peak), refused
		ex.StdoutTruncated, ex.StderrTruncated = inst.stdout.wasTruncated(), inst.stderr.wasTruncated()
		if rep := rd.report(); len(rep) > 0 && json.Valid(rep) {
			ex.Report = rep
		}
	case <-inst.done:
		isNew := ex.ContextNew
		ex = inst.exit(from, false)
		ex.ContextNew, ex.ContextEnded = isNew, ended(inst)
		delete(w.contexts, c.name)
	}
	c.stdout.set(nil)
	c.stderr.set(nil)
	return ex, inst
}
