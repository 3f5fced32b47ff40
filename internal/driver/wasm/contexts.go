package wasm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Code contexts (driver.Contexter). A context is a long-lived instance in the sandbox's worker
// (package worker, context.go): its state lives exactly as long as that instance. The driver
// records which worker holds each context's instance; a context whose worker was killed (at any
// run's timeout or cancel: WASI has no signals, so the worker is the unit a run is stopped by) or
// died is reset, and its next run starts a fresh instance in the new worker and says why
// (ExecResult.ContextRestarted). A context's instance that ends during its own run (a crash,
// os._exit) is reported by that run (ExecResult.ContextLost).

var _ driver.Contexter = (*Driver)(nil)

// contextOpTimeout bounds a context operation's reply: the worker's own bound on an instance's
// start-up (a minute), and time to spare.
const contextOpTimeout = 90 * time.Second

// codeCtx is the driver's record of one code context of a box (box.mu guards it).
type codeCtx struct {
	w    *proc  // the worker holding its instance; nil: none (it is started at the next run)
	lost string // why it has no instance, when known (its next run says it)
}

// CreateContext starts code context name's instance in sandbox id's worker and returns once its
// interpreter waits for a run.
func (d *Driver) CreateContext(ctx context.Context, id, name string) error {
	b, err := d.lookup(id)
	if err != nil {
		return err
	}
	if !protocol.ValidContextName(name) {
		return fmt.Errorf("create context in sandbox %s: invalid name %q", id, name)
	}
	w, err := d.worker(ctx, b)
	if err != nil {
		return fmt.Errorf("create context in sandbox %s: %w", id, err)
	}
	if err := d.contextOp(ctx, b, w, protocol.ContextOp{Op: protocol.ContextOpCreate, Name: name}); err != nil {
		return fmt.Errorf("create context in sandbox %s: %w", id, err)
	}
	b.mu.Lock()
	b.contexts[name] = &codeCtx{w: w}
	b.mu.Unlock()
	return nil
}

// DeleteContext ends code context name's instance, frees its memory and removes its working
// directory. Idempotent.
func (d *Driver) DeleteContext(ctx context.Context, id, name string) error {
	b, err := d.lookup(id)
	if err != nil {
		return err
	}
	if !protocol.ValidContextName(name) {
		return fmt.Errorf("delete context in sandbox %s: invalid name %q", id, name)
	}
	b.mu.Lock()
	delete(b.contexts, name)
	w := b.w
	b.mu.Unlock()
	if w != nil && w.alive() {
		// The worker ends the instance, if it has one, and removes the directory.
		if err := d.contextOp(ctx, b, w, protocol.ContextOp{Op: protocol.ContextOpDelete, Name: name}); err != nil {
			return fmt.Errorf("delete context in sandbox %s: %w", id, err)
		}
		return nil
	}
	// No worker: no instance; the directory is removed from the host side.
	for _, m := range b.cfg.Mounts {
		if m.Path == tmpPath && !m.Empty {
			if err := pyrunner.RemoveContextDir(m.HostDir, name); err != nil {
				return fmt.Errorf("delete context in sandbox %s: %w", id, err)
			}
		}
	}
	return nil
}

// contextOp sends op to b's worker w and waits for its reply. A worker that does not reply in
// time (or at all) is killed: the sandbox's contexts are reset.
func (d *Driver) contextOp(ctx context.Context, b *box, w *proc, op protocol.ContextOp) error {
	var rep protocol.Reply
	err := w.fw.SendJSON(protocol.FrameContext, op)
	if err == nil {
		err = w.expect(ctx, contextOpTimeout, protocol.FrameContextDone, &rep)
	}
	if err != nil {
		w.kill()
		b.dropWorker(w)
		b.loseContexts(w, fmt.Sprintf("the sandbox's WASM worker was killed: a context operation (%s) failed, and every code context of the sandbox with it", op.Op))
		return fmt.Errorf("%w: %v%s", errWorkerGone, err, w.logTail())
	}
	if rep.Error != "" {
		return errors.New(rep.Error)
	}
	return nil
}

// contextBefore is called as a run in context name starts in worker w: it returns why the
// context's instance is gone ("" if it lives in w), and records it as w's from now on.
func (b *box) contextBefore(name string, w *proc) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.contexts[name]
	if c == nil {
		c = &codeCtx{lost: "the context had no interpreter"}
		b.contexts[name] = c
	}
	if c.w == w {
		return ""
	}
	why := c.lost
	if why == "" {
		why = "the sandbox's WASM worker had ended, and every code context of the sandbox with it"
	}
	c.w, c.lost = w, ""
	return why
}

// contextAfter fills res, the result of a run in context name in worker w, with what happened
// to the context: restarted (contextBefore's reason; or the worker had no instance for it), and
// lost when its instance ended during the run or the worker was killed.
func (b *box) contextAfter(name string, w *proc, ex *protocol.Exit, res *driver.ExecResult, restarted string) {
	if ex != nil && ex.ContextNew && restarted == "" {
		restarted = "the interpreter had ended"
	}
	res.ContextRestarted = restarted
	switch {
	case ex == nil:
		res.ContextLost = workerKilled(res.Status)
	case ex.ContextEnded != "":
		res.ContextLost = ex.ContextEnded
	default:
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if c := b.contexts[name]; c != nil && c.w == w {
		c.w, c.lost = nil, res.ContextLost
	}
}

// loseContexts records that the contexts whose instances lived in worker w (killed, or dead) are
// gone, and why (unless a reason is already known).
func (b *box) loseContexts(w *proc, why string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.contexts {
		if c.w == w {
			c.w = nil
			if c.lost == "" {
				c.lost = why
			}
		}
	}
}

// workerKilled says why a run that ended with status s took the sandbox's worker, and its code
// contexts, with it.
func workerKilled(s driver.Status) string {
	why := "the sandbox's WASM worker ended during a run"
	switch s {
	case driver.StatusTimeout:
		why = "the sandbox's WASM worker was killed at a run's timeout (WASI has no signals to interrupt a run)"
	case driver.StatusCancelled:
		why = "the sandbox's WASM worker was killed when a run was cancelled (WASI has no signals to interrupt a run)"
	case driver.StatusOOM:
		why = "the sandbox's WASM worker was killed by the sandbox's memory limit"
	}
	return why + ", and every code context of the sandbox with it"
}
