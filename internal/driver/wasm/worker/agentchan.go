package worker

import (
	"bytes"
	"io/fs"
	"sync"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/sys"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// maxUnread bounds the answers a guest may leave unread and still send a request (the runner
// reads each answer before its next request).
const maxUnread = 64 << 10

// agentChan is a run's agent channel (package pyrunner, agent.go), the file pyrunner.AgentFile of
// its private directory: the guest reads the hello, then writes request lines; each complete line
// is answered before the write returns — by the host (forward: a FrameCall, then the wait for its
// FrameAnswer), or by the channel itself (pyrunner.AgentLocalAnswer) — and the answer waits for
// the guest to read it. A line over pyrunner.MaxAgentRequest is refused and ends the channel; so
// does a line that completes while more than maxUnread bytes of answers wait to be read — a flood
// of lines never read — (pyrunner.AgentOutOfTurn): what waits is at most maxUnread, one answer and
// a refusal, whatever the guest writes (container mode's socket buffer bounds it there). The
// run's end (end) ends the channel too. An ended channel fails writes with EIO. Reads never
// wait: with nothing to read they return end of file.
type agentChan struct {
	forward func(line []byte) []byte // nil: the calls are not served

	mu     sync.Mutex
	out    []byte // what the guest reads next: the hello, then answers
	in     []byte // a request line being written
	calls  int
	closed bool
}

// newAgentChan returns the channel of a run of info whose requests go to forward.
func newAgentChan(info pyrunner.AgentInfo, forward func([]byte) []byte) *agentChan {
	return &agentChan{forward: forward, out: pyrunner.AgentHello(info)}
}

func (c *agentChan) read(p []byte) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n
}

func (c *agentChan) write(p []byte) (int, experimentalsys.Errno) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, experimentalsys.EIO
	}
	c.in = append(c.in, p...)
	for {
		i := bytes.IndexByte(c.in, '\n')
		if i < 0 {
			break
		}
		switch {
		case i > pyrunner.MaxAgentRequest:
			c.refuse(pyrunner.AgentTooLong())
			return len(p), 0
		case len(c.out) > maxUnread:
			c.refuse(pyrunner.AgentOutOfTurn())
			return len(p), 0
		}
		line := c.in[:i]
		c.in = c.in[i+1:]
		c.out = append(append(c.out, c.answer(line)...), '\n')
	}
	if len(c.in) > pyrunner.MaxAgentRequest {
		c.refuse(pyrunner.AgentTooLong())
	}
	return len(p), 0
}

// refuse answers with ans and ends the channel (c.mu held).
func (c *agentChan) refuse(ans []byte) {
	c.in, c.closed = nil, true
	c.out = append(append(c.out, ans...), '\n')
}

// end ends the channel at its run's end: a context's instance, whose code may go on after its
// run (a thread, or code that ended the run early), has no way left to the host's calls.
func (c *agentChan) end() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.in, c.closed = nil, true
}

// answer answers one request line (c.mu held: the guest waits in its write meanwhile).
func (c *agentChan) answer(line []byte) []byte {
	c.calls++
	if ans, forward := pyrunner.AgentLocalAnswer(c.calls, line); !forward {
		return ans
	}
	if c.forward == nil {
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "agent calls are not served to this run")
	}
	return c.forward(bytes.Clone(line))
}

// runAgentChan returns the agent channel of the run about to start, whose requests go to the
// host (forwardCall) while it is the running run's: endAgentChan ends it with the run.
func (w *worker) runAgentChan(info pyrunner.AgentInfo) *agentChan {
	c := newAgentChan(info, nil)
	c.forward = func(line []byte) []byte {
		if w.serving.Load() != c {
			return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "the run of this agent channel is over")
		}
		return w.forwardCall(line)
	}
	w.serving.Store(c)
	return c
}

// endAgentChan ends run channel c at its run's end.
func (w *worker) endAgentChan(c *agentChan) {
	w.serving.CompareAndSwap(c, nil)
	c.end()
}

// forwardCall sends a request to the host and waits for its answer (see protocol, "Agent calls").
// A worker whose host is gone ends (readFrames), so the wait ends with the process.
func (w *worker) forwardCall(line []byte) []byte {
	if err := w.fw.Send(protocol.FrameCall, line); err != nil {
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "the host is gone")
	}
	return <-w.answers
}

// agentFile is the guest's open agent channel.
type agentFile struct {
	experimentalsys.UnimplementedFile
	c      *agentChan
	closed bool
}

func (f *agentFile) Stat() (sys.Stat_t, experimentalsys.Errno) {
	return sys.Stat_t{Mode: fs.ModeSocket | 0o600, Nlink: 1}, 0
}

func (f *agentFile) IsDir() (bool, experimentalsys.Errno) { return false, 0 }

func (f *agentFile) Read(p []byte) (int, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	return f.c.read(p), 0
}

func (f *agentFile) Write(p []byte) (int, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	return f.c.write(p)
}

func (f *agentFile) Close() experimentalsys.Errno {
	f.closed = true
	return 0
}
