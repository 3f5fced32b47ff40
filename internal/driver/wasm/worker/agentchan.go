package worker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"sync"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/sys"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// agentChan is a run's agent channel (package pyrunner, agent.go), the file pyrunner.AgentFile of
// its private directory: the guest reads the hello, then writes request lines; each complete line
// is answered before the write returns — by the host (forward: a FrameCall, then the wait for its
// FrameAnswer), or by the channel itself when the line is not JSON or past
// pyrunner.MaxAgentForwards — and the answer waits for the guest to read it. A line over
// pyrunner.MaxAgentRequest is answered with an error and ends the channel (writes then fail with
// EIO). Reads never wait: with nothing to read they return end of file. The guest is one thread,
// so one request is in flight at a time.
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
		line := c.in[:i]
		c.in = c.in[i+1:]
		if i > pyrunner.MaxAgentRequest {
			c.tooLong()
			return len(p), 0
		}
		ans := c.answer(line)
		c.out = append(append(c.out, ans...), '\n')
	}
	if len(c.in) > pyrunner.MaxAgentRequest {
		c.tooLong()
	}
	return len(p), 0
}

// tooLong answers a request over the limit and ends the channel (c.mu held).
func (c *agentChan) tooLong() {
	c.in, c.closed = nil, true
	c.out = append(append(c.out, pyrunner.AgentRefusal(pyrunner.AgentCallError, 413,
		fmt.Sprintf("a request over %d bytes: the agent channel is closed", pyrunner.MaxAgentRequest))...), '\n')
}

// answer answers one request line (c.mu held: the guest waits in its write meanwhile).
func (c *agentChan) answer(line []byte) []byte {
	c.calls++
	switch {
	case c.calls > pyrunner.MaxAgentForwards:
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 429, pyrunner.AgentOverLimit)
	case !json.Valid(line):
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 400, "the request is not JSON")
	case c.forward == nil:
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "agent calls are not served to this run")
	}
	return c.forward(bytes.Clone(line))
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
