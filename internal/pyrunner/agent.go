package pyrunner

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// The agent channel: how a run's `agent` object (runner.py, _sandbox_agent) reaches the host.
// Every run has one, a byte stream between the run and its driver's in-sandbox side — the
// run's descriptor AgentFD in container mode (one end of a socketpair sandbox-agent makes per
// run process), the file AgentFile of the run's private directory in WASM mode (the worker serves
// it) — never a path or socket the code could choose. On it, one line at a time:
//
//	side → run  once, before the code runs: the hello, "<agent_id>\t<sandbox_id>\t<run_id>\n"
//	run → side  a request: one line of JSON, at most MaxAgentRequest bytes (ParseAgentCall)
//	side → run  its answer: one line of JSON (AgentAnswer, AgentRefusal), before the next request
//
// The side forwards each request to the host, which answers it (the operator's endpoint for the
// sandbox's agent_id: see driver.ExecRequest.OnAgentCall), and answers locally — without the host
// — a request past MaxAgentForwards (AgentOverLimit), one that is not JSON, and one over the size
// limit (after which it closes the channel: the stream has lost its framing). One request at a
// time: the side reads the next only once it has written the answer to the last.

// AgentFD is the descriptor of the agent channel in a container run's process.
const AgentFD = 6

// AgentFile is the name of the agent channel in a WASM run's private directory (opened once, by
// the runner, before the code runs).
const AgentFile = "agent"

// Limits of the agent channel.
const (
	MaxAgentRequest = 1 << 20 // bytes of one request line, the newline excluded
	MaxAgentAnswer  = 8 << 20 // bytes of the endpoint's JSON answer the host accepts
	// MaxAgentAnswerLine bounds an answer line on the channel: the answer and its envelope.
	MaxAgentAnswerLine = MaxAgentAnswer + 64<<10
	MaxAgentCalls      = 100 // calls per run; the ones after are refused (status 429)
	// MaxAgentForwards is how many requests of a run the in-sandbox side passes to the host: one
	// past MaxAgentCalls, which the host refuses and audits (the run hit the limit), and no more.
	MaxAgentForwards = MaxAgentCalls + 1
)

// AgentOverLimit is the message of the refusal of a call past MaxAgentCalls (status 429).
var AgentOverLimit = fmt.Sprintf("over the limit of %d agent calls per run", MaxAgentCalls)

// AgentInfo is who a run is, as its `agent` object says: agent.id, agent.sandbox_id,
// agent.run_id.
type AgentInfo struct {
	AgentID   string `json:"agent_id"`
	SandboxID string `json:"sandbox_id"`
	RunID     string `json:"run_id"`
}

// AgentHello is the channel's first line for a run of info. Tabs and newlines cannot occur in
// the ids (the API's agent_id allows neither; sandbox and run ids are the service's); any that
// did would be replaced by spaces.
func AgentHello(info AgentInfo) []byte {
	clean := strings.NewReplacer("\t", " ", "\n", " ", "\r", " ")
	return []byte(clean.Replace(info.AgentID) + "\t" + clean.Replace(info.SandboxID) + "\t" + clean.Replace(info.RunID) + "\n")
}

// Error types of an answer: the Python exceptions the runner raises.
const (
	AgentNotConfigured = "AgentNotConfigured" // no endpoint for the sandbox's agent_id
	AgentCallError     = "AgentCallError"     // anything else that kept the call from an answer
)

// AgentAnswer is the answer line (without its newline) of a call the endpoint answered with
// result (valid JSON): {"ok": true, "result": result}.
func AgentAnswer(result json.RawMessage) []byte {
	b := make([]byte, 0, len(result)+24)
	b = append(b, `{"ok":true,"result":`...)
	b = append(b, result...)
	return append(b, '}')
}

// AgentRefusal is the answer line (without its newline) of a call that got no answer: the
// exception typ (AgentNotConfigured, AgentCallError) with message and status (the endpoint's HTTP
// status, or the channel's own: 400 bad request, 413 too large, 429 too many; 0: none, e.g. a
// timeout).
func AgentRefusal(typ string, status int, message string) []byte {
	v := struct {
		Error   string `json:"error"`
		Message string `json:"message"`
		Status  int    `json:"status,omitempty"`
	}{typ, message, status}
	b, _ := json.Marshal(v)
	return b
}

// AgentLocalAnswer is the in-sandbox side's rule for request n (counted from 1) of a run, line
// (without its newline): the answer it gives without the host — to a request past
// MaxAgentForwards (429, AgentOverLimit) or one that is not JSON (400) — or forward: the line
// goes to the host.
func AgentLocalAnswer(n int, line []byte) (ans []byte, forward bool) {
	switch {
	case n > MaxAgentForwards:
		return AgentRefusal(AgentCallError, 429, AgentOverLimit), false
	case !json.Valid(line):
		return AgentRefusal(AgentCallError, 400, "the request is not JSON"), false
	}
	return nil, true
}

// AgentTooLong is the answer to a request line over MaxAgentRequest; the side then closes the
// channel (its framing is lost).
func AgentTooLong() []byte {
	return AgentRefusal(AgentCallError, 413, fmt.Sprintf("a request over %d bytes: the agent channel is closed", MaxAgentRequest))
}

// AgentOutOfTurn is the answer to a request written while the answers to earlier ones lie unread
// past a bound (one at a time: see above); the side then closes the channel. A side whose
// transport holds the run's writes until it reads (container mode's socket) never needs it.
func AgentOutOfTurn() []byte {
	return AgentRefusal(AgentCallError, 429, "requests written without reading their answers: the agent channel is closed")
}

// AgentCall is a run's request on the agent channel, validated: agent.run(task, **args) or
// agent.call(tool, **args).
type AgentCall struct {
	Method string          // "run" or "call"
	Name   string          // the task (run) or the tool (call)
	Args   json.RawMessage // a JSON object (the keyword arguments)
	Bytes  int             // the request's size as the run sent it
}

// MaxToolName bounds a tool's name; toolName is its alphabet.
const MaxToolName = 128

var toolName = regexp.MustCompile(`^[A-Za-z0-9_.:/-]{1,128}$`)

// ParseAgentCall validates a request line, which the run's code controls entirely:
// {"method": "run", "task": "<text>", "args": {…}} or {"method": "call", "tool": "<name>",
// "args": {…}} ("args" may be absent: {}), at most MaxAgentRequest bytes, no other field. A task
// is any non-empty text; a tool's name is 1–128 characters of A–Z a–z 0–9 _ . : / -.
func ParseAgentCall(line []byte) (AgentCall, error) {
	if len(line) > MaxAgentRequest {
		return AgentCall{}, fmt.Errorf("request of %d bytes: over the %d-byte limit", len(line), MaxAgentRequest)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return AgentCall{}, fmt.Errorf("request is not a JSON object: %v", err)
	}
	c := AgentCall{Bytes: len(line), Args: json.RawMessage("{}")}
	if err := json.Unmarshal(m["method"], &c.Method); err != nil || (c.Method != "run" && c.Method != "call") {
		return AgentCall{}, fmt.Errorf(`request: "method" must be "run" or "call"`)
	}
	key := map[string]string{"run": "task", "call": "tool"}[c.Method]
	if err := json.Unmarshal(m[key], &c.Name); err != nil || c.Name == "" {
		return AgentCall{}, fmt.Errorf("request: %q must be a non-empty string", key)
	}
	if c.Method == "call" && !toolName.MatchString(c.Name) {
		return AgentCall{}, fmt.Errorf("request: tool name %.40q: want 1–%d characters of A-Z a-z 0-9 _ . : / -", c.Name, MaxToolName)
	}
	if a, ok := m["args"]; ok {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(a, &obj); err != nil || obj == nil {
			return AgentCall{}, fmt.Errorf(`request: "args" must be a JSON object`)
		}
		c.Args = a
	}
	for k := range m {
		if k != "method" && k != key && k != "args" {
			return AgentCall{}, fmt.Errorf("request: unknown field %.40q", k)
		}
	}
	return c, nil
}
