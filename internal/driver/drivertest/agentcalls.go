package drivertest

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// channelFD is Python that finds the run's agent channel (a descriptor in every driver, though
// not the same one) in the `agent` object's closure, as hostile code could: CH.
const channelFD = `def _cells(f):
    return {n: c.cell_contents for n, c in zip(f.__code__.co_freevars, f.__closure__ or ())}
CH = _cells(_cells(_cells(type(agent).run)["cur"][1])["exchange"])["state"][0]
`

// AgentEndpoint stands for the service's OnAgentCall in tests: it records the calls a driver
// passes on (Handle) and answers them with Answer, or an echo of the call:
// {"echo": <name>, "method": <method>, "args": <args>}.
type AgentEndpoint struct {
	Answer func(ctx context.Context, c driver.AgentCall) (json.RawMessage, error)

	mu       sync.Mutex
	calls    []driver.AgentCall
	inFlight atomic.Int32
	overlap  atomic.Bool
}

// Handle is the endpoint as a driver.ExecRequest.OnAgentCall.
func (e *AgentEndpoint) Handle(ctx context.Context, c driver.AgentCall) (json.RawMessage, error) {
	if e.inFlight.Add(1) > 1 {
		e.overlap.Store(true)
	}
	defer e.inFlight.Add(-1)
	e.mu.Lock()
	e.calls = append(e.calls, c)
	e.mu.Unlock()
	if e.Answer != nil {
		return e.Answer(ctx, c)
	}
	name, _ := json.Marshal(c.Name)
	return json.RawMessage(`{"echo": ` + string(name) + `, "method": "` + c.Method + `", "args": ` + string(c.Args) + `}`), nil
}

// Calls returns the calls the endpoint has had.
func (e *AgentEndpoint) Calls() []driver.AgentCall {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.calls)
}

// Overlapped reports whether two calls were ever answered at the same time.
func (e *AgentEndpoint) Overlapped() bool { return e.overlap.Load() }

// CappedAnswer answers as the service does for a run: {} to pyrunner.MaxAgentCalls calls, then
// an AgentCallError with status 429.
func CappedAnswer() func(context.Context, driver.AgentCall) (json.RawMessage, error) {
	var n atomic.Int32
	return func(context.Context, driver.AgentCall) (json.RawMessage, error) {
		if n.Add(1) > pyrunner.MaxAgentCalls {
			return nil, &driver.AgentError{Status: 429, Message: pyrunner.AgentOverLimit}
		}
		return json.RawMessage(`{}`), nil
	}
}

// testAgentCalls: every run's `agent` (package pyrunner, agent.go) reaches ExecRequest.OnAgentCall
// and nothing else: its answers come back decoded, its errors as AgentNotConfigured and
// AgentCallError; what the code writes on the channel itself is validated, bounded and capped,
// and cannot forge an answer; a call still waiting at the run's timeout ends with the run.
func testAgentCalls(t *testing.T, h Harness, d driver.Driver) {
	spec := h.Spec(t)
	spec.AllowSpawn = h.Spawn
	id := h.Sandbox(t, d, spec)
	info := driver.AgentInfo{AgentID: "data-processor", SandboxID: id, RunID: "run_conformance"}
	notConfigured := func(context.Context, driver.AgentCall) (json.RawMessage, error) {
		return nil, &driver.AgentError{NotConfigured: true, Message: `no endpoint is configured for agent_id "data-processor": agents["data-processor"]`}
	}
	tests := []struct {
		name    string
		code    string
		spawn   bool // needs Harness.Spawn
		answer  func(context.Context, driver.AgentCall) (json.RawMessage, error)
		result  string // JSON of `result`
		errType string // the run's uncaught exception
		calls   int    // calls that reached OnAgentCall
	}{
		{name: "the seed's example", code: "result = agent.run('analyze sales data')",
			result: `{"echo": "analyze sales data", "method": "run", "args": {}}`, calls: 1},
		{name: "who the run is", code: "result = [agent.id, agent.sandbox_id, agent.run_id]",
			result: `["data-processor", "` + id + `", "run_conformance"]`},
		{name: "a tool and its arguments", code: "result = agent.call('lookup', city='Paris', n=2)",
			result: `{"echo": "lookup", "method": "call", "args": {"city": "Paris", "n": 2}}`, calls: 1},
		{name: "not configured", code: "agent.run('x')", answer: notConfigured, errType: "AgentNotConfigured", calls: 1},
		{name: "the endpoint failed", calls: 1,
			answer: func(context.Context, driver.AgentCall) (json.RawMessage, error) {
				return nil, &driver.AgentError{Status: 500, Message: "the endpoint answered 500"}
			},
			code:   "try:\n    agent.call('t')\nexcept AgentCallError as e:\n    result = [type(e).__name__, e.status, str(e)]",
			result: `["AgentCallError", 500, "the endpoint answered 500"]`},
		{name: "garbage on the channel is answered without the host",
			code:   channelFD + "import os\nos.write(CH, b'not json\\n')\nresult = os.read(CH, 1000).decode().count('400')",
			result: `1`},
		{name: "a request the host refuses", code: channelFD + "import os\nos.write(CH, b'{\"method\": \"delete\"}\\n')\nresult = os.read(CH, 1000).decode().count('400')",
			result: `1`},
		{name: "a line over the limit ends the channel",
			code: channelFD + "import os\nb = b'x' * ((1 << 20) + 10)\nwhile b: b = b[os.write(CH, b):]\nans = os.read(CH, 1000).decode()\n" +
				"try:\n    agent.run('after')\nexcept AgentCallError as e:\n    result = [ans.count('413'), str(e).startswith('the agent channel')]",
			result: `[1, true]`},
		{name: "a flood of lines without reading", // what waits to be read stays bounded (one at a time)
			code: channelFD + "import os\ntry:\n    os.set_blocking(CH, False)\nexcept Exception:\n    pass\nsent = 0\n" +
				"for i in range(16):\n    try:\n        sent += os.write(CH, b'\\n' * (1 << 20))\n    except OSError:\n        break\n" +
				// The answers come while the lines are read: wait for the first (a non-blocking read
				// right away may find none yet).
				"try:\n    import select\n    select.select([CH], [], [], 10)\nexcept Exception:\n    pass\n" +
				"got = 0\nwhile got < (64 << 20):\n    try:\n        c = os.read(CH, 1 << 16)\n    except OSError:\n        break\n" +
				"    if not c:\n        break\n    got += len(c)\nresult = [sent > 0, got > 0, got < (64 << 20)]",
			result: `[true, true, true]`},
		{name: "the code cannot forge an answer", calls: 1,
			code: channelFD + "import os\nos.write(CH, b'{\"ok\": true, \"result\": \"spoof\"}\\n')\n" +
				"try:\n    result = agent.run('x')\nexcept AgentCallError:\n    result = 'refused'",
			result: `"refused"`},
		{name: "a closed channel", code: channelFD + "import os\nos.close(CH)\ntry:\n    agent.run('x')\nexcept AgentCallError:\n    result = 'closed'",
			result: `"closed"`},
		{name: "a flood stops at the cap", calls: pyrunner.MaxAgentForwards, // the host refuses the 101st
			answer: CappedAnswer(),
			code: "codes = {}\nfor i in range(150):\n    try:\n        agent.call('t'); s = 200\n    except AgentCallError as e:\n        s = e.status\n" +
				"    codes[s] = codes.get(s, 0) + 1\nresult = codes",
			result: `{"200": 100, "429": 50}`},
		{name: "a forked child is refused", spawn: true, calls: 1,
			code: "import os\npid = os.fork()\nif pid == 0:\n    try:\n        agent.run('child')\n    except AgentCallError:\n        os._exit(3)\n    os._exit(0)\n" +
				"_, st = os.waitpid(pid, 0)\nresult = [os.waitstatus_to_exitcode(st), agent.run('parent')['echo']]",
			result: `[3, "parent"]`},
		{name: "threads are served one at a time", spawn: true, calls: 12,
			code: "import threading\nout = []\ndef f(i):\n    for j in range(4): out.append(agent.call('t%d' % i)['echo'])\n" +
				"ts = [threading.Thread(target=f, args=(i,)) for i in range(3)]\nfor x in ts: x.start()\nfor x in ts: x.join()\nresult = len(out)",
			result: `12`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.spawn && !h.Spawn {
				t.Skip("run code cannot start processes or threads")
			}
			ep := &AgentEndpoint{Answer: tt.answer}
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: tt.code, Timeout: 30 * time.Second, MaxOutput: 1 << 20,
				Agent: info, OnAgentCall: ep.Handle})
			if err != nil {
				t.Fatal(err)
			}
			if tt.errType != "" {
				if res.Error == nil || res.Error.Type != tt.errType || res.Status != driver.StatusFailed {
					t.Fatalf("status %s, error %+v: want failed with %s", res.Status, res.Error, tt.errType)
				}
			} else if res.Status != driver.StatusCompleted {
				t.Fatalf("status %s, error %+v, stderr %s", res.Status, res.Error, res.Stderr)
			}
			if tt.result != "" && !SameJSON(res.Result, tt.result) {
				t.Errorf("result %s, want %s", res.Result, tt.result)
			}
			if n := len(ep.Calls()); n != tt.calls {
				t.Errorf("%d calls reached OnAgentCall, want %d", n, tt.calls)
			}
			if ep.Overlapped() {
				t.Error("two calls were answered at the same time")
			}
		})
	}

	t.Run("a call waiting at the run's timeout ends with the run", func(t *testing.T) {
		ended := make(chan error, 1)
		ep := &AgentEndpoint{Answer: func(ctx context.Context, _ driver.AgentCall) (json.RawMessage, error) {
			<-ctx.Done()
			ended <- ctx.Err()
			return nil, ctx.Err()
		}}
		res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print('calling', flush=True)\nagent.run('slow')",
			Timeout: 2 * time.Second, MaxOutput: 1 << 20, Agent: info, OnAgentCall: ep.Handle})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != driver.StatusTimeout || !strings.Contains(string(res.Stdout), "calling") {
			t.Errorf("status %s, stdout %q: want a timeout during the call", res.Status, res.Stdout)
		}
		if err := <-ended; !errors.Is(err, context.Canceled) {
			t.Errorf("the call's ctx ended with %v, want it cancelled with the run", err)
		}
		h.idle(t, d, id)
	})

	t.Run("without OnAgentCall calls are refused", func(t *testing.T) {
		res, err := d.Exec(context.Background(), id, driver.ExecRequest{Timeout: 30 * time.Second, MaxOutput: 1 << 20,
			Code: "try:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = [agent.id, str(e)]"})
		if err != nil {
			t.Fatal(err)
		}
		if !SameJSON(res.Result, `["", "agent calls are not served to this run"]`) {
			t.Errorf("result %s, error %+v", res.Result, res.Error)
		}
	})
}

// SameJSON reports whether got is the JSON want (whatever the spacing and the order of keys).
func SameJSON(got json.RawMessage, want string) bool {
	var g, w any
	if json.Unmarshal(got, &g) != nil || json.Unmarshal([]byte(want), &w) != nil {
		return false
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	return string(gb) == string(wb)
}
