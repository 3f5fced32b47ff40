// Package agent is the wire protocol between sandboxd and sandbox-agent, the small static program
// that runs as PID 1 inside every container sandbox, and the host-side client of it.
//
// Transport: a unix stream socket that the host creates and binds (Listen) at a path of its own —
// the container driver's is <sandbox dir>/agent.sock, in a directory only root can enter and that
// no sandbox mounts — and hands to the agent as an inherited listening descriptor: the agent never
// binds a path, and nothing inside the sandbox names, replaces or reaches the socket. One
// connection carries one run:
//
//	host → agent: one JSON line, a RunRequest.
//	agent → host: JSON lines, each an Event: zero or more "stdout"/"stderr" chunks and "call"
//	              events, then exactly one "exit" event carrying the RunResult, after which the
//	              agent closes the connection.
//	host → agent: after the RunRequest, one answer line per "call" event, in order: the line the
//	              run gets on its agent channel (package pyrunner, agent.go), without its
//	              newline, at most pyrunner.MaxAgentAnswerLine bytes.
//
// Agent calls: every run process gets, as descriptor pyrunner.AgentFD, one end of a socketpair
// the agent made for it (never a path: the code cannot choose where its calls go). The agent
// writes the run's hello on it, then reads the run's request lines one at a time: each is sent to
// the host as a "call" event (Call: the request, which the host validates: the code wrote it), and
// the agent waits for the host's answer line and writes it back to the run before it reads the
// next request. The agent answers by itself, without the host, a request that is not JSON, and
// every request past pyrunner.MaxAgentForwards; a request line over pyrunner.MaxAgentRequest ends the
// channel (an answer saying so, then the agent's end is shut). A host that answers nothing keeps
// the run waiting until its timeout; the agent reads the host's lines also while no call waits
// (EOF still means the host went away) and drops an answer no call waits for.
//
// Two other first lines: Ping (the agent answers one "ready" event and closes: WaitReady), and the
// zygote's hello (see cmd/sandbox-agent).
//
// If the host closes the connection before "exit", the agent kills the run's whole process tree.
// The agent serves one run at a time; when a run ends (for any reason) it kills every other
// process of the sandbox but its code contexts' interpreters, so nothing a run started outlives it.
//
// Code contexts: a RunRequest with Op OpContextCreate starts a long-lived interpreter named
// Context (idempotent), OpContextDelete ends it (idempotent); both answer one "exit" event. A run
// with Context set executes in that interpreter (started first if it is not running). Every answer
// lists the live contexts' PIDs by name (RunResult.ContextPIDs): processes that are the sandbox's own, not
// leftovers of a run.
package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// SocketName is the name of the agent's socket in the directory the host binds it in.
const SocketName = "agent.sock"

// ListenFD is the descriptor on which the agent finds its listening socket (Listen's file, passed
// by the host as the first inherited descriptor after stdio).
const ListenFD = 3

// BrokerFD is the descriptor on which "sandbox-agent broker" (the host-side helper of an agent
// under gVisor) finds its end of the broker socket; the agent's end is its ListenFD.
const BrokerFD = 4

// Ping is the request line that asks the agent whether it serves (WaitReady).
const Ping = "ping"

// RunRequest asks the agent to execute Code in a fresh Python process.
type RunRequest struct {
	Code       string            `json:"code"`
	TimeoutMS  int64             `json:"timeout_ms"` // wall clock; the process tree is killed after it
	Env        map[string]string `json:"env,omitempty"`
	AllowSpawn bool              `json:"allow_spawn"`       // false: seccomp forbids fork/vfork/non-thread clone
	MaxOutput  int               `json:"max_output"`        // bytes kept per stream
	Op         string            `json:"op,omitempty"`      // "": a run; OpContextCreate, OpContextDelete
	Context    string            `json:"context,omitempty"` // the code context (ContextIDMax bytes of [A-Za-z0-9_-])
	// Agent is who the run is: the hello on its agent channel (its `agent` object's ids).
	Agent pyrunner.AgentInfo `json:"agent"`
}

// Ops of a RunRequest besides a run.
const (
	OpContextCreate = "context.create"
	OpContextDelete = "context.delete"
)

// MaxContexts bounds the live code contexts of one agent (the service's own limit is lower).
const MaxContexts = 16

// ContextIDMax is the longest context name the agent accepts.
const ContextIDMax = 64

// ContextInterruptGrace is how long a context's run may take to stop after the agent's SIGINT (a
// timeout or cancel) before the agent kills the interpreter, which resets the context.
const ContextInterruptGrace = 2 * time.Second

// Event is one line from the agent.
type Event struct {
	Type   string          `json:"type"`             // "stdout", "stderr", "call", "exit" (or "ready", the answer to Ping)
	Data   []byte          `json:"data,omitempty"`   // output chunk (stdout/stderr)
	Call   json.RawMessage `json:"call,omitempty"`   // with "call": the run's request line, JSON
	Result *RunResult      `json:"result,omitempty"` // with "exit"
}

// CallHandler answers a run's agent call: call is the request line as the run wrote it (JSON, at
// most pyrunner.MaxAgentRequest bytes, not validated otherwise); the answer is the line the run
// gets (without its newline; driver.AnswerAgentCall makes it). ctx ends when the run does.
type CallHandler func(ctx context.Context, call json.RawMessage) []byte

// RunResult is the outcome of a run as the agent saw it. The host decides OOM (from the cgroup)
// and cancellation; the agent reports what happened to the process.
type RunResult struct {
	ExitCode        int             `json:"exit_code"`             // exit status, or 128+signal
	Signal          int             `json:"signal,omitempty"`      // the signal that killed the process
	TimedOut        bool            `json:"timed_out"`             // killed by the agent at TimeoutMS
	Stdout          []byte          `json:"stdout"`                // first MaxOutput bytes
	Stderr          []byte          `json:"stderr"`                // first MaxOutput bytes
	StdoutTruncated bool            `json:"stdout_truncated"`      // more was written than kept
	StderrTruncated bool            `json:"stderr_truncated"`      // more was written than kept
	Result          json.RawMessage `json:"result,omitempty"`      // JSON of the global `result`
	Error           *PyError        `json:"error,omitempty"`       // uncaught exception
	DurationUS      int64           `json:"duration_us"`           // wall time of the process
	CPUUS           int64           `json:"cpu_us"`                // user+sys of the process tree (rusage)
	MaxRSSBytes     int64           `json:"max_rss_bytes"`         // peak RSS (rusage)
	AgentError      string          `json:"agent_error,omitempty"` // the agent failed (not the code)
	// Rich is the display and outputs of the runner's report, as the runner wrote them: the host
	// validates them (pyrunner.DecodeRich).
	Rich pyrunner.Rich `json:"rich"`
	// StandbyPID is the process the agent started for the next run once this one's processes
	// were gone (0: none): a fresh Python waiting for its code, not a leftover of this run.
	StandbyPID int `json:"standby_pid,omitempty"`
	// ContextPIDs are the PIDs (in the sandbox) of the live code contexts' interpreters, by
	// context name.
	ContextPIDs map[string]int `json:"context_pids,omitempty"`
	// ContextLost: the context's interpreter ended during this run (why); the context's state is
	// gone and its next run starts a fresh interpreter.
	ContextLost string `json:"context_lost,omitempty"`
	// ContextRestarted: this run found its context's interpreter gone (why) and started a fresh one.
	ContextRestarted string `json:"context_restarted,omitempty"`
	// OOMKill (TCP mode only, where the host cannot read the sandbox's cgroup): the kernel's OOM
	// killer killed a process of the sandbox's memory cgroup during the request.
	OOMKill bool `json:"oom_kill,omitempty"`
}

// PyError is an uncaught Python exception.
type PyError struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback"`
}
