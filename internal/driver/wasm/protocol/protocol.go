// Package protocol is the wire protocol between the wasm driver (package wasm, in sandboxd) and
// its worker processes (package wasm/worker, `sandboxd wasm-worker`): how a worker is started,
// the frames and messages on its control socket, and the few facts both sides must agree on. It
// is a package of its own so that neither side imports the other: the driver needs nothing of
// wazero or of the guest's file system, the worker nothing of cgroups or pools, and the contract
// between them reads in one place.
//
// # Starting a worker
//
// The driver runs Options.WasmWorker (by default sandboxd itself with WorkerCommand) with the
// flags --image DIR (the image holding python.wasm), --cache DIR (wazero's compilation cache) and
// --parent PID (the driver's pid), and one end of a unix stream socket, the control socket, as its
// stdin. The worker exits when the socket reaches EOF.
//
// # Frames
//
// Every message is a frame: one type byte, a big-endian uint32 payload length, the payload (JSON,
// or raw bytes for output). In order:
//
//	worker → host  FrameReady      Ready, once the module is compiled
//	host → worker  FrameConfig     Config: the sandbox the worker now serves (once), with the
//	                               mounts' directory descriptors attached (SCM_RIGHTS): the worker
//	                               never opens a host path itself
//	worker → host  FrameConfigured Reply
//	host → worker  FrameStandby    (empty) start the next run's instance now, if there is none:
//	                               sent after FrameConfigured and after each runner run, once
//	                               the host has read the run's CPU time (the standby's start-up
//	                               is no run's); no reply
//	then per run:
//	host → worker  FrameRun        Run
//	worker → host  FrameStdout/FrameStderr chunks as the guest writes them (at most MaxOutput
//	               bytes per stream) and FrameCall requests, then FrameExit Exit
//	host → worker  FrameAnswer     one per FrameCall, in order, while the run lasts
//	and, between runs, per code context operation:
//	host → worker  FrameContext    ContextOp: start a context's instance (and wait until it is
//	                               ready), or end one
//	worker → host  FrameContextDone Reply
//
// Code contexts: a Run with Context runs in that context's long-lived instance, which the worker
// starts at ContextOpCreate or, if it has none, at the run (Exit.ContextNew). The instance runs
// the runner's WASI context loop (pyrunner, runner.py: _sandbox_context_wasi), which takes one
// run after another in the same globals from its private directory at RunDir. At most
// MaxContexts per worker; every instance of a worker (the standby, a fresh run's, the contexts')
// draws on one budget of Config.MemoryBytes of linear memory. A context's instance that ends
// during its run (a crash, os._exit) is reported in Exit.ContextEnded and forgotten; the worker's
// death (the host kills it at a timeout) ends every context of the sandbox.
//
// Agent calls: the guest's agent channel (package pyrunner, agent.go) is the file
// pyrunner.AgentFile of the run's private directory, served by the worker: it reads the hello
// (Run.Agent), then each request line the guest writes goes to the host as a FrameCall (the line,
// JSON; the host validates it: the guest wrote it), and the guest's write returns once the host's
// FrameAnswer (the answer line, without its newline) is there for it to read. The worker answers
// by itself a line that is not JSON and every line past pyrunner.MaxAgentForwards; a line over
// pyrunner.MaxAgentRequest ends the channel.
//
// The host ends a run early by killing the worker: there is no cancel message (nothing inside
// the worker is trusted to stop on time; see package worker, trap 3).
package protocol

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// WorkerCommand is the name of sandboxd's hidden subcommand that runs a worker: cmd/sandboxd
// dispatches `sandboxd wasm-worker …` to worker.Main before anything else happens.
const WorkerCommand = "wasm-worker"

// Frame types.
const (
	FrameReady      = 'R'
	FrameConfig     = 'C'
	FrameConfigured = 'K'
	FrameRun        = 'X'
	FrameStandby    = 'S'
	FrameStdout     = 'o'
	FrameStderr     = 'e'
	FrameExit       = 'x'
	FrameCall       = 'A'
	FrameAnswer     = 'a'
	// FrameContext and FrameContextDone: a code context operation and its reply.
	FrameContext     = 'c'
	FrameContextDone = 'k'
)

// MaxContexts is the most code contexts a worker keeps (the service's limit per sandbox).
const MaxContexts = 8

// Code context operations (ContextOp.Op).
const (
	ContextOpCreate = "create"
	ContextOpDelete = "delete"
)

// ContextOp is a code context operation. Name is the service's context ID (letters, digits, '_'
// and '-', at most MaxContextName bytes). Deleting a context the worker does not have is no error.
type ContextOp struct {
	Op   string `json:"op"`
	Name string `json:"name"`
}

// MaxContextName bounds ContextOp.Name and Run.Context.
const MaxContextName = 64

// ValidContextName reports whether name is a context name the worker takes.
func ValidContextName(name string) bool {
	if name == "" || len(name) > MaxContextName {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// MaxFrame bounds a frame's payload (the exit message carries the runner's report).
const MaxFrame = 96 << 20

// DefaultMaxOutput is the per-stream output budget of a run whose Run.MaxOutput is not positive.
const DefaultMaxOutput = 1 << 20

// RunDir is where the worker mounts a run's private in-memory directory in the guest (the runner,
// the run's header and code, the report): the driver mounts nothing at or below it.
const RunDir = "/.sandbox"

// TrapExitCode is Exit.ExitCode of a run whose guest trapped (the interpreter crashed): what a
// native process killed by SIGABRT reports.
const TrapExitCode = 128 + 6

// StackOverflowMessage says what happened to a run whose Exit has StackOverflow: the worker
// writes it in the crash line on stderr, the driver into the run's error when the runner could
// report none.
const StackOverflowMessage = "the interpreter's C stack overflowed: recursion too deep (sys.setrecursionlimit allows more than the stack holds)"

// Ready says the worker has compiled its module and waits for its Config.
type Ready struct {
	Pid       int   `json:"pid"`
	CompileNS int64 `json:"compile_ns"` // time to compile (or load from the cache) python.wasm
}

// Mount is one WASI mount: host directory HostDir at guest Path, or (Empty) an empty
// read-only directory that exists only in the worker's memory. The directory travels as the FD-th
// descriptor attached to the config frame; HostDir is for messages.
type Mount struct {
	Path     string `json:"path"`
	HostDir  string `json:"host_dir,omitempty"`
	ReadOnly bool   `json:"read_only"`
	Empty    bool   `json:"empty,omitempty"`
	FD       int    `json:"fd"`
}

// Config is a sandbox's configuration, as planned by the driver: every mount (the standard
// library and /tmp included; none inside a blocked path), parents before children, and the
// blocked paths that lie inside a mount.
type Config struct {
	// UID and GID are the host ids the worker takes before anything else (it waits in the pool
	// as root): the sandbox's (driver.Spec.HostIDs + driver.SandboxUser).
	UID         int      `json:"uid"`
	GID         int      `json:"gid"`
	Mounts      []Mount  `json:"mounts"`
	Blocked     []string `json:"blocked,omitempty"`
	MemoryBytes int64    `json:"memory_bytes"` // cap of the guest's linear memory
	// Env is the environment the worker starts a standby with (KEY=value, sorted): a run's
	// when its request adds none. A run whose environment differs from it in what CPython reads
	// while it starts gets an instance started for it instead.
	Env []string `json:"env"`
}

// Reply answers FrameConfig: Error is why the worker could not take the configuration.
type Reply struct {
	Error string `json:"error,omitempty"`
}

// Run is one run. MaxOutput is its budget per stream (DefaultMaxOutput when not positive). Args
// replaces the runner's command line when set (the driver's Baseline uses it to run plain
// `python -c print(1)`).
type Run struct {
	Code      string   `json:"code"`
	Env       []string `json:"env"` // KEY=value, sorted
	MaxOutput int      `json:"max_output"`
	Args      []string `json:"args,omitempty"`
	// Agent is who the run is: the hello of its agent channel.
	Agent pyrunner.AgentInfo `json:"agent"`
	// Context, when set, runs Code in that code context's instance (started now if the worker has
	// none: Exit.ContextNew).
	Context string `json:"context,omitempty"`
}

// Exit is how a run ended, as the worker saw it.
type Exit struct {
	ExitCode        int             `json:"exit_code"`
	Trap            string          `json:"trap,omitempty"`    // the guest trapped (or the runtime failed): why
	Report          json.RawMessage `json:"report,omitempty"`  // what the runner wrote to /.sandbox/result
	DurationNS      int64           `json:"duration_ns"`       // run handed over (a fresh instance: instantiation) to exit
	Standby         bool            `json:"standby,omitempty"` // the run was served by the standby
	MemoryPeak      int64           `json:"memory_peak"`       // linear memory high-water mark, bytes
	GrowRefused     bool            `json:"grow_refused"`      // the guest asked for memory past its cap
	StackOverflow   bool            `json:"stack_overflow"`    // the trap was a stack overflow
	StdoutTruncated bool            `json:"stdout_truncated"`
	StderrTruncated bool            `json:"stderr_truncated"`
	// A run in a code context: ContextNew says its instance was started for this run (the worker
	// had none); ContextEnded, why the instance ended during the run (its state is gone).
	ContextNew   bool   `json:"context_new,omitempty"`
	ContextEnded string `json:"context_ended,omitempty"`
}

// Writer writes frames; safe for concurrent use.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter returns a Writer of frames to w (a *net.UnixConn to send descriptors).
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Send sends a frame.
func (fw *Writer) Send(typ byte, payload []byte) error {
	return fw.SendFDs(typ, payload, nil)
}

// SendFDs sends a frame with descriptors attached (the writer must be a *net.UnixConn then).
func (fw *Writer) SendFDs(typ byte, payload []byte, fds []int) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame %q of %d bytes is over the limit", typ, len(payload))
	}
	var hdr [5]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if len(fds) > 0 {
		uc, ok := fw.w.(*net.UnixConn)
		if !ok {
			return errors.New("descriptors need a unix socket")
		}
		// The descriptors go with the header's first byte; the rest is an ordinary write.
		n, _, err := uc.WriteMsgUnix(hdr[:], unix.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		if _, err := fw.w.Write(hdr[n:]); err != nil {
			return err
		}
	} else if _, err := fw.w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := fw.w.Write(payload)
	return err
}

// FDReader reads a unix socket and keeps the descriptors that arrive with the bytes, in order.
type FDReader struct {
	c   *net.UnixConn
	oob []byte
	mu  sync.Mutex
	fds []int
}

// NewFDReader returns a reader of c that keeps the descriptors c receives (see Take).
func NewFDReader(c *net.UnixConn) *FDReader {
	return &FDReader{c: c, oob: make([]byte, unix.CmsgSpace(4*MaxFDs))}
}

// MaxFDs is the most descriptors one config frame carries (one per mount).
const MaxFDs = 200

// Read reads bytes from the socket; descriptors that come with them are kept, close-on-exec.
func (r *FDReader) Read(p []byte) (int, error) {
	n, oobn, _, _, err := r.c.ReadMsgUnix(p, r.oob)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(r.oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if fds, err := unix.ParseUnixRights(&m); err == nil {
					for _, fd := range fds {
						unix.CloseOnExec(fd)
					}
					r.mu.Lock()
					r.fds = append(r.fds, fds...)
					r.mu.Unlock()
				}
			}
		}
	}
	return n, err
}

// Take returns (and forgets) the descriptors received so far.
func (r *FDReader) Take() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	fds := r.fds
	r.fds = nil
	return fds
}

// SendJSON sends v as JSON, without HTML escaping: the runner's report passes through verbatim.
func (fw *Writer) SendJSON(typ byte, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	return fw.Send(typ, bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
}

// ReadFrame reads one frame. io.EOF means the peer closed cleanly between frames.
func ReadFrame(r io.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("frame %q of %d bytes is over the limit", hdr[0], n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], p, nil
}
