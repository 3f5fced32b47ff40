package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
	"github.com/sandboxd/sandboxd/internal/store"
)

// ValidAgentID reports whether id is an agent_id the API accepts (the config file's agents are
// keyed by them).
func ValidAgentID(id string) bool { return agentIDRe.MatchString(id) }

// agentCalls answers the agent calls of one run (driver.ExecRequest.OnAgentCall): each goes to
// the endpoint the operator configured for the sandbox's agent_id (Config.Agents), one at a time,
// within the run's remaining time, at most pyrunner.MaxAgentCalls of them; each is audited
// (agent.call), and so is the first refused past the limit.
type agentCalls struct {
	s        *Service
	lv       *live
	runID    string
	deadline time.Time // the run's: no call outlasts it

	mu     sync.Mutex // one call at a time
	n      int
	capped bool
}

func (s *Service) newAgentCalls(lv *live, runID string, timeout time.Duration) *agentCalls {
	return &agentCalls{s: s, lv: lv, runID: runID, deadline: time.Now().Add(timeout)}
}

func (a *agentCalls) handle(ctx context.Context, c driver.AgentCall) (json.RawMessage, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	agentID := a.lv.rec.AgentID
	tool := c.Name
	if c.Method == "run" {
		tool = "run"
	}
	a.n++
	if a.n > pyrunner.MaxAgentCalls {
		if !a.capped {
			a.capped = true
			a.audit(agentID, c, tool, "limit", 0, 0, 0)
		}
		return nil, &driver.AgentError{Status: 429, Message: pyrunner.AgentOverLimit}
	}
	ctx, cancel := context.WithDeadline(ctx, a.deadline)
	defer cancel()
	req := agentcall.Request{AgentID: agentID, SandboxID: a.lv.id, RunID: a.runID, Method: c.Method, Args: c.Args}
	if c.Method == "run" {
		req.Task = c.Name
	} else {
		req.Tool = c.Name
	}
	start := time.Now()
	ans, err := a.s.cfg.Agents.Call(ctx, req)
	took := time.Since(start)
	var ce *agentcall.Error
	switch {
	case err == nil:
		a.audit(agentID, c, tool, "ok", 200, took, len(ans))
		return ans, nil
	case errors.As(err, &ce):
		a.audit(agentID, c, tool, ce.Kind, ce.Status, took, 0)
		if ce.Cause != nil {
			a.s.log.Warn("agent call failed", "sandbox", a.lv.id, "run", a.runID, "agent", agentID, "kind", ce.Kind, "err", ce.Cause)
		}
		return nil, &driver.AgentError{NotConfigured: ce.Kind == agentcall.KindNotConfigured, Status: ce.Status, Message: ce.Message}
	default:
		a.audit(agentID, c, tool, "error", 0, took, 0)
		return nil, &driver.AgentError{Message: "the agent call failed"}
	}
}

// audit records one agent.call event: the call's agent, method, tool ("run" for agent.run),
// outcome (ok, or agentcall's error kind, or limit), the endpoint's HTTP status, duration and
// sizes. The task and the arguments are not recorded.
func (a *agentCalls) audit(agentID string, c driver.AgentCall, tool, outcome string, status int, took time.Duration, answer int) {
	a.s.audit(context.Background(), store.Event{AccountID: a.lv.rec.AccountID, Type: "agent.call", SandboxID: a.lv.id, RunID: a.runID,
		AgentID: agentID, Detail: obj("agent", agentID, "method", c.Method, "tool", tool, "outcome", outcome, "status", status,
			"duration_ms", took.Milliseconds(), "request_bytes", c.Bytes, "answer_bytes", answer)})
}
