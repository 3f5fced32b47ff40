package sandbox

import (
	"context"
	"errors"
	"fmt"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/store"
)

// MaxContexts is how many code contexts a sandbox may have that are not deleted; one more is
// 409 context_limit.
const MaxContexts = 8

// Code contexts: records in the store (they survive a restart of the service; the interpreters,
// the driver's, do not — a sandbox does not either: its contexts are deleted with it), the
// interpreters through driver.Contexter. Context operations and runs of one sandbox go to the
// driver one at a time (live.execMu): a context created while a run runs waits for its end.

// CreateContext starts a code context in a sandbox and returns it once its interpreter is ready.
func (s *Service) CreateContext(ctx context.Context, acct store.Account, sandboxID string) (api.CodeContext, error) {
	lv, drv, err := s.contextSandbox(ctx, acct, sandboxID)
	if err != nil {
		return api.CodeContext{}, err
	}
	c := store.Context{ID: newID("ctx_"), SandboxID: sandboxID, AccountID: acct.ID, Status: store.ContextReady, CreatedAt: now()}
	lv.execMu.Lock()
	defer lv.execMu.Unlock()
	// A sandbox being destroyed takes no new context: its contexts are ended once (EndContexts),
	// and a record inserted after that would stay ready. (One inserted while the destroy goes on
	// finds no sandbox in the driver below and is marked deleted.)
	lv.mu.Lock()
	closing := lv.closing || lv.ctx.Err() != nil
	lv.mu.Unlock()
	if closing {
		return api.CodeContext{}, errorf(KindSandboxDestroyed, "sandbox %s is being destroyed", sandboxID)
	}
	if err := s.st.CreateContext(ctx, c, MaxContexts); errors.Is(err, store.ErrQuota) {
		return api.CodeContext{}, errorf(KindContextLimit, "sandbox %s already has %d code contexts: delete one first", sandboxID, MaxContexts)
	} else if err != nil {
		return api.CodeContext{}, internal("record context", err)
	}
	if err := drv.CreateContext(ctx, sandboxID, c.ID); err != nil {
		// The agent may yet start the interpreter (the caller went away, or the answer was late):
		// it is ended, best effort, so that no interpreter outlives its deleted record.
		if derr := drv.DeleteContext(context.WithoutCancel(ctx), sandboxID, c.ID); derr != nil {
			s.log.Warn("ending a context that did not start", "sandbox", sandboxID, "context", c.ID, "err", derr)
		}
		t := now()
		c.Status, c.ResetReason, c.DeletedAt = store.ContextDeleted, "its interpreter did not start", &t
		if uerr := s.st.UpdateContext(context.Background(), c); uerr != nil {
			s.log.Error("record context failed", "sandbox", sandboxID, "err", uerr)
		}
		return api.CodeContext{}, internal("start context", err)
	}
	return contextView(c), nil
}

// contextSandbox returns the live sandbox and its driver for a context operation.
func (s *Service) contextSandbox(ctx context.Context, acct store.Account, sandboxID string) (*live, driver.Contexter, error) {
	rec, err := s.st.GetSandbox(ctx, acct.ID, sandboxID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil, errorf(KindNotFound, "no sandbox %q", sandboxID)
	} else if err != nil {
		return nil, nil, internal("get sandbox", err)
	}
	drv, ok := s.drivers[rec.Mode].(driver.Contexter)
	if !ok {
		return nil, nil, errorf(KindUnsupportedInMode, "code contexts are not available in %s mode yet: run without \"context\"", rec.Mode)
	}
	s.mu.Lock()
	lv := s.live[sandboxID]
	s.mu.Unlock()
	if lv == nil {
		return nil, nil, errorf(KindSandboxDestroyed, "sandbox %s is %s: create a new one", sandboxID, rec.Status)
	}
	lv.mu.Lock()
	status := lv.rec.Status
	lv.mu.Unlock()
	if status == store.SandboxProvisioning {
		return nil, nil, errorf(KindSandboxNotReady, "sandbox %s is still provisioning", sandboxID)
	}
	return lv, drv, nil
}

// ListContexts returns a sandbox's code contexts, oldest first (deleted ones too).
func (s *Service) ListContexts(ctx context.Context, acct store.Account, sandboxID string) (api.ContextList, error) {
	if _, err := s.st.GetSandbox(ctx, acct.ID, sandboxID); errors.Is(err, store.ErrNotFound) {
		return api.ContextList{}, errorf(KindNotFound, "no sandbox %q", sandboxID)
	} else if err != nil {
		return api.ContextList{}, internal("get sandbox", err)
	}
	cs, err := s.st.ListContexts(ctx, sandboxID)
	if err != nil {
		return api.ContextList{}, internal("list contexts", err)
	}
	out := api.ContextList{Contexts: []api.CodeContext{}, Total: len(cs)}
	for _, c := range cs {
		out.Contexts = append(out.Contexts, contextView(c))
	}
	return out, nil
}

// GetContext returns one code context.
func (s *Service) GetContext(ctx context.Context, acct store.Account, sandboxID, id string) (api.CodeContext, error) {
	c, err := s.context(ctx, acct, sandboxID, id)
	if err != nil {
		return api.CodeContext{}, err
	}
	return contextView(c), nil
}

func (s *Service) context(ctx context.Context, acct store.Account, sandboxID, id string) (store.Context, error) {
	if _, err := s.st.GetSandbox(ctx, acct.ID, sandboxID); errors.Is(err, store.ErrNotFound) {
		return store.Context{}, errorf(KindNotFound, "no sandbox %q", sandboxID)
	} else if err != nil {
		return store.Context{}, internal("get sandbox", err)
	}
	c, err := s.st.GetContext(ctx, sandboxID, id)
	if errors.Is(err, store.ErrNotFound) {
		return store.Context{}, errorf(KindNotFound, "no context %q in sandbox %s", id, sandboxID)
	} else if err != nil {
		return store.Context{}, internal("get context", err)
	}
	return c, nil
}

// DeleteContext ends a code context's interpreter; idempotent (a deleted context is left as it is).
func (s *Service) DeleteContext(ctx context.Context, acct store.Account, sandboxID, id string) error {
	c, err := s.context(ctx, acct, sandboxID, id)
	if err != nil || c.Status == store.ContextDeleted {
		return err
	}
	s.mu.Lock()
	lv := s.live[sandboxID]
	s.mu.Unlock()
	if lv != nil {
		lv.execMu.Lock()
		defer lv.execMu.Unlock()
		if drv, ok := s.drivers[lv.rec.Mode].(driver.Contexter); ok {
			if err := drv.DeleteContext(ctx, sandboxID, id); err != nil {
				return internal("delete context", err)
			}
		}
		if c, err = s.st.GetContext(ctx, sandboxID, id); err != nil {
			return internal("get context", err)
		}
	}
	t := now()
	c.Status, c.ResetReason, c.DeletedAt = store.ContextDeleted, "deleted", &t
	if err := s.st.UpdateContext(ctx, c); err != nil {
		return internal("record context deleted", err)
	}
	return nil
}

// runContext checks the context a run names: it must exist and not be deleted.
func (s *Service) runContext(ctx context.Context, rec store.Sandbox, id string) (store.Context, error) {
	if _, ok := s.drivers[rec.Mode].(driver.Contexter); !ok {
		return store.Context{}, errorf(KindUnsupportedInMode, "code contexts are not available in %s mode yet: run without \"context\"", rec.Mode)
	}
	c, err := s.st.GetContext(ctx, rec.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return c, errorf(KindNotFound, "no context %q in sandbox %s", id, rec.ID)
	} else if err != nil {
		return c, internal("get context", err)
	}
	if c.Status == store.ContextDeleted {
		return c, errorf(KindNotFound, "context %s was deleted (%s)", id, c.ResetReason)
	}
	return c, nil
}

// contextBefore is called as a context's run starts (execMu held): the context's record, whose
// status says whether its interpreter will be fresh. A run that found its sandbox idle when it
// was made (j.cx) uses the record read then: every earlier run of the sandbox had written its end
// (and its context's) before it.
func (s *Service) contextBefore(sandboxID string, j *job) (store.Context, error) {
	if j.cx != nil {
		return *j.cx, nil
	}
	return s.st.GetContext(context.Background(), sandboxID, j.run.Context)
}

// contextAfter returns what a run did to its context (execMu held) — the record to write with the
// run's end (nil: none, the context is deleted) — and the run's context_reset reason ("" none).
func (s *Service) contextAfter(c store.Context, res driver.ExecResult, err error) (*store.Context, string) {
	reset := ""
	if c.Status == store.ContextReset {
		reset = c.ResetReason
	} else if err == nil && res.ContextRestarted != "" {
		reset = res.ContextRestarted
	}
	c.Runs++
	switch {
	case err == nil && res.ContextLost != "":
		c.Status, c.ResetReason = store.ContextReset, res.ContextLost
	case err == nil:
		c.Status, c.ResetReason = store.ContextReady, ""
	}
	if c.Status == store.ContextDeleted {
		return nil, reset
	}
	return &c, reset
}

// resetNotice is the line a run's stderr starts with when its context's interpreter was fresh.
func resetNotice(reason string) string {
	return fmt.Sprintf("[sandboxd] this context's interpreter was reset (%s): variables and imports of earlier runs are gone\n", reason)
}

func contextView(c store.Context) api.CodeContext {
	return api.CodeContext{ContextID: c.ID, SandboxID: c.SandboxID, Status: c.Status, ResetReason: optional(c.ResetReason),
		CreatedAt: c.CreatedAt, DeletedAt: c.DeletedAt, Runs: c.Runs}
}
