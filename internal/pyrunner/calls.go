package pyrunner

import (
	"context"
	"sync"
	"sync/atomic"
)

// CallServer answers the agent calls of one run on the host side of its channel (the container
// driver's agent client, the wasm driver's worker reader): each call by answer, in a goroutine of
// its own while the run's reader goes on reading its output, one at a time — the runner sends its
// next request only once it has the answer, so a call that comes while another is answered is
// refused at once (429 "one agent call at a time"). It lives here, not beside
// driver.AnswerAgentCall, because the agent client is linked into the in-sandbox agent, which must
// not import the driver package (and with it the host's HTTP, TLS, DNS and netlink code).
type CallServer struct {
	ctx    context.Context
	cancel context.CancelFunc
	answer func(ctx context.Context, line []byte) []byte
	send   func(line []byte)
	busy   atomic.Bool
	wg     sync.WaitGroup
}

// NewCallServer returns the call server of a run that ends with ctx. answer makes the answer line
// of a request line (driver.AnswerAgentCall; nil: calls are not served to this run, each is
// refused); send writes an answer line (without its newline) to the run — it is called from the
// goroutine that called Serve and from an answering one, possibly at once, and a failed write is
// for the run's reader to see.
func NewCallServer(ctx context.Context, answer func(ctx context.Context, line []byte) []byte, send func(line []byte)) *CallServer {
	cctx, cancel := context.WithCancel(ctx)
	return &CallServer{ctx: cctx, cancel: cancel, answer: answer, send: send}
}

// Serve answers the request line: in a goroutine, or at once when it is refused. line must not
// be changed afterwards.
func (c *CallServer) Serve(line []byte) {
	switch {
	case c.answer == nil:
		c.send(AgentRefusal(AgentCallError, 0, "agent calls are not served to this run"))
	case !c.busy.CompareAndSwap(false, true):
		c.send(AgentRefusal(AgentCallError, 429, "one agent call at a time"))
	default:
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			ans := c.answer(c.ctx, line)
			c.busy.Store(false) // before the answer: the run sends the next call once it has it
			c.send(ans)
		}()
	}
}

// Stop ends the call being answered (its ctx) and waits for it. Serve must not be called after.
func (c *CallServer) Stop() {
	c.cancel()
	c.wg.Wait()
}
