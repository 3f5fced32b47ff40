package wasm

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
)

// The protocol between the driver (host) and a worker process, over a unix stream socket that is
// the worker's stdin. Every message is a frame: one type byte, a big-endian uint32 payload
// length, the payload (JSON, or raw bytes for output). In order:
//
//	worker → host  frameReady      readyMsg, once the module is compiled (and the worker has
//	                               dropped its privileges)
//	host → worker  frameConfig     configMsg: the sandbox the worker now serves (once), with the
//	                               mounts' directory descriptors attached (SCM_RIGHTS): the worker
//	                               never opens a host path itself
//	worker → host  frameConfigured replyMsg
//	host → worker  frameStandby    (empty) start the next run's instance now, if there is none:
//	                               sent after frameConfigured and after each runner run, once
//	                               the host has read the run's CPU time (the standby's start-up
//	                               is no run's); no reply
//	then per run:
//	host → worker  frameRun        runMsg
//	worker → host  frameStdout/frameStderr chunks as the guest writes them (at most MaxOutput
//	               bytes per stream), then frameExit exitMsg
//
// The host ends a run early by killing the worker (there is no cancel message: see the package
// doc, trap 3). A worker exits when its stdin reaches EOF.
const (
	frameReady      = 'R'
	frameConfig     = 'C'
	frameConfigured = 'K'
	frameRun        = 'X'
	frameStandby    = 'S'
	frameStdout     = 'o'
	frameStderr     = 'e'
	frameExit       = 'x'
)

// maxFrame bounds a frame's payload (the exit message carries the runner's report).
const maxFrame = 96 << 20

type readyMsg struct {
	Pid       int   `json:"pid"`
	CompileNS int64 `json:"compile_ns"` // time to compile (or load from the cache) python.wasm
}

// mountMsg is one WASI mount: host directory HostDir at guest Path, or (Empty) an empty
// read-only directory that exists only in the worker's memory. The directory travels as the FD-th
// descriptor attached to the config frame; HostDir is for messages.
type mountMsg struct {
	Path     string `json:"path"`
	HostDir  string `json:"host_dir,omitempty"`
	ReadOnly bool   `json:"read_only"`
	Empty    bool   `json:"empty,omitempty"`
	FD       int    `json:"fd"`
}

// configMsg is a sandbox's configuration, as planned by the driver: every mount (the standard
// library and /tmp included; none inside a blocked path), parents before children, and the
// blocked paths that lie inside a mount.
type configMsg struct {
	// UID and GID are the host ids the worker takes before anything else (it waits in the pool
	// as root): the sandbox's (driver.Spec.HostIDs + driver.SandboxUser).
	UID         int        `json:"uid"`
	GID         int        `json:"gid"`
	Mounts      []mountMsg `json:"mounts"`
	Blocked     []string   `json:"blocked,omitempty"`
	MemoryBytes int64      `json:"memory_bytes"` // cap of the guest's linear memory
}

type replyMsg struct {
	Error string `json:"error,omitempty"`
}

// runMsg is one run. Args replaces the runner's command line when set (Baseline uses it to run
// plain `python -c print(1)`).
type runMsg struct {
	Code      string   `json:"code"`
	Env       []string `json:"env"` // KEY=value, sorted
	MaxOutput int      `json:"max_output"`
	Args      []string `json:"args,omitempty"`
}

// exitMsg is how a run ended, as the worker saw it.
type exitMsg struct {
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
}

// frameWriter writes frames; safe for concurrent use.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (fw *frameWriter) send(typ byte, payload []byte) error {
	return fw.sendFDs(typ, payload, nil)
}

// sendFDs sends a frame with descriptors attached (the writer must be a *net.UnixConn then).
func (fw *frameWriter) sendFDs(typ byte, payload []byte, fds []int) error {
	if len(payload) > maxFrame {
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

// fdReader reads a unix socket and keeps the descriptors that arrive with the bytes, in order.
type fdReader struct {
	c   *net.UnixConn
	oob []byte
	mu  sync.Mutex
	fds []int
}

func newFDReader(c *net.UnixConn) *fdReader {
	return &fdReader{c: c, oob: make([]byte, unix.CmsgSpace(4*maxFDs))}
}

// maxFDs is the most descriptors one config frame carries (one per mount).
const maxFDs = 200

func (r *fdReader) Read(p []byte) (int, error) {
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

// take returns (and forgets) the descriptors received so far.
func (r *fdReader) take() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	fds := r.fds
	r.fds = nil
	return fds
}

// sendJSON sends v as JSON, without HTML escaping: the runner's report passes through verbatim.
func (fw *frameWriter) sendJSON(typ byte, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	return fw.send(typ, bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
}

// readFrame reads one frame. io.EOF means the peer closed cleanly between frames.
func readFrame(r io.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxFrame {
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
