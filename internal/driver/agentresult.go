package driver

import (
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// AgentResult is the ExecResult of a run the agent reported (res, with no AgentError): started
// and wall are the driver's clock of it, oom whether the sandbox's memory cgroup killed during it.
// Both agent-based drivers (container, kubernetes) make their results with it.
func AgentResult(res agent.RunResult, started time.Time, wall time.Duration, oom bool) ExecResult {
	out := ExecResult{
		Stdout:           res.Stdout,
		Stderr:           res.Stderr,
		StdoutTruncated:  res.StdoutTruncated,
		StderrTruncated:  res.StderrTruncated,
		Result:           res.Result,
		Started:          started,
		Duration:         time.Duration(res.DurationUS) * time.Microsecond,
		CPU:              time.Duration(res.CPUUS) * time.Microsecond,
		MemoryPeak:       res.MaxRSSBytes,
		ContextLost:      res.ContextLost,
		ContextRestarted: res.ContextRestarted,
	}
	if out.Duration == 0 {
		out.Duration = wall
	}
	out.SetRich(res.Rich)
	if res.Error != nil {
		out.Error = &PyError{Type: res.Error.Type, Message: res.Error.Message, Traceback: res.Error.Traceback}
	}
	Classify(Outcome{Exited: true, ExitCode: res.ExitCode, Signal: res.Signal, TimedOut: res.TimedOut, OOMKill: oom}, &out)
	return out
}

// AgentOutput returns the agent event handler that passes a run's output chunks to req.OnOutput.
func AgentOutput(req ExecRequest) func(agent.Event) {
	return func(ev agent.Event) {
		if req.OnOutput == nil || len(ev.Data) == 0 {
			return
		}
		switch ev.Type {
		case "stdout":
			req.OnOutput(Stdout, ev.Data)
		case "stderr":
			req.OnOutput(Stderr, ev.Data)
		}
	}
}
