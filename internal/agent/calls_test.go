package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// runWithCalls runs code on the agent with the host side of agent calls as the container driver
// has it (driver.AnswerAgentCall over ep; no endpoint: calls not served).
func runWithCalls(t *testing.T, sock string, req agent.RunRequest, ep *drivertest.AgentEndpoint) agent.RunResult {
	t.Helper()
	if req.TimeoutMS == 0 {
		req.TimeoutMS = 20000
	}
	req.MaxOutput = 1 << 20
	ereq := driver.ExecRequest{}
	if ep != nil {
		ereq.OnAgentCall = ep.Handle
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := agent.Run(ctx, sock, req, nil, func(ctx context.Context, call json.RawMessage) []byte {
		return driver.AnswerAgentCall(ctx, ereq, call)
	})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if res.AgentError != "" {
		t.Fatalf("agent error: %s", res.AgentError)
	}
	return res
}

// TestAgentCalls and TestAgentCallTimeout are not parallel: they run before the parallel tests,
// whose timings (TestTimeout's) their many runs would disturb.
func TestAgentCalls(t *testing.T) {
	sock := startAgent(t)
	info := pyrunner.AgentInfo{AgentID: "data-processor", SandboxID: "sbx_test", RunID: "run_test"}
	notConfigured := func(context.Context, driver.AgentCall) (json.RawMessage, error) {
		return nil, &driver.AgentError{NotConfigured: true, Message: `no endpoint for agent "data-processor": configure agents["data-processor"]`}
	}
	failing := func(context.Context, driver.AgentCall) (json.RawMessage, error) {
		return nil, &driver.AgentError{Status: 500, Message: "the endpoint answered 500 Internal Server Error"}
	}
	tests := []struct {
		name       string
		code       string
		spawn      bool
		answer     func(context.Context, driver.AgentCall) (json.RawMessage, error)
		noEndpoint bool
		result     string // JSON of `result`
		errType    string // the run's uncaught exception
		calls      int    // calls that reached the endpoint
	}{
		{name: "the seed's example", code: "result = agent.run('analyze sales data')",
			result: `{"echo":"analyze sales data","method":"run","args":{}}`, calls: 1},
		{name: "who the run is", code: "result = [agent.id, agent.sandbox_id, agent.run_id, repr(agent)]",
			result: `["data-processor","sbx_test","run_test","<agent 'data-processor' sandbox='sbx_test' run='run_test'>"]`},
		{name: "a tool with arguments", code: "result = agent.call('lookup', city='Paris', n=2, tags=['a'])",
			result: `{"echo":"lookup","method":"call","args":{"city":"Paris","n":2,"tags":["a"]}}`, calls: 1},
		{name: "answers of every JSON kind", code: "result = agent.run('x')",
			answer: func(context.Context, driver.AgentCall) (json.RawMessage, error) {
				return json.RawMessage("[1, 2.5, \"s\\n\", null, true,\n {\"k\": {}}]"), nil
			}, result: `[1,2.5,"s\n",null,true,{"k":{}}]`, calls: 1},
		{name: "not configured, uncaught", code: "agent.run('x')", answer: notConfigured, errType: "AgentNotConfigured", calls: 1},
		{name: "not configured, caught", answer: notConfigured, calls: 1,
			code:   "try:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = [type(e).__name__, str(e), e.status, isinstance(e, AgentNotConfigured)]",
			result: `["AgentNotConfigured","no endpoint for agent \"data-processor\": configure agents[\"data-processor\"]",null,true]`},
		{name: "an endpoint's error", answer: failing, calls: 1,
			code:   "try:\n    agent.call('t')\nexcept AgentCallError as e:\n    result = [type(e).__name__, e.status, str(e)]",
			result: `["AgentCallError",500,"the endpoint answered 500 Internal Server Error"]`},
		{name: "no endpoint side at all", noEndpoint: true,
			code:   "try:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = str(e)",
			result: `"agent calls are not served to this run"`},
		{name: "a bad tool name is refused by the host",
			code:   "try:\n    agent.call('no spaces allowed')\nexcept AgentCallError as e:\n    result = e.status",
			result: `400`},
		{name: "arguments that are not JSON", code: "agent.run('x', f=open)", errType: "TypeError"},
		{name: "a task that is not a str", code: "agent.run(42)", errType: "TypeError"},
		{name: "a request over 1 MiB is refused in the run", code: "try:\n    agent.run('x' * (1 << 20))\nexcept AgentCallError as e:\n    result = e.status",
			result: `413`},
		{name: "garbage on the channel: answered, host untouched",
			code:   "import os\nos.write(6, b'not json at all\\n')\nresult = os.read(6, 1000).decode()",
			result: strconv.Quote(string(pyrunner.AgentRefusal(pyrunner.AgentCallError, 400, "the request is not JSON")) + "\n")},
		{name: "a line over the limit ends the channel",
			code: "import os\nb = b'x' * ((1 << 20) + 10)\nwhile b: b = b[os.write(6, b):]\nans = os.read(6, 1000).decode()\n" +
				"try:\n    agent.run('after')\nexcept AgentCallError as e:\n    result = [ans.count('413'), str(e).startswith('the agent channel')]",
			result: `[1,true]`},
		{name: "the code cannot forge an answer", calls: 1,
			code: "import os\nos.write(6, b'{\"ok\": true, \"result\": \"spoof\"}\\n')\n" +
				"try:\n    result = agent.run('x')\nexcept AgentCallError as e:\n    result = 'refused'",
			result: `"refused"`},
		{name: "a closed channel", code: "import os\nos.close(6)\ntry:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = 'closed'",
			result: `"closed"`},
		{name: "the channel is not inherited by a program", spawn: true,
			code:   "import subprocess, sys\nresult = subprocess.run([sys.executable, '-c', 'import os; os.fstat(6)']).returncode",
			result: `1`},
		{name: "a forked child is refused, the parent goes on", spawn: true, calls: 1,
			code: "import os\npid = os.fork()\nif pid == 0:\n    try:\n        agent.run('child')\n    except AgentCallError:\n        os._exit(3)\n    os._exit(0)\n" +
				"_, st = os.waitpid(pid, 0)\nresult = [os.waitstatus_to_exitcode(st), agent.run('parent')['echo']]",
			result: `[3,"parent"]`},
		{name: "threads are served one at a time", calls: 20,
			code: "import threading\nout = []\ndef f(i):\n    for j in range(5): out.append(agent.call('t%d' % i)['echo'])\n" +
				"ts = [threading.Thread(target=f, args=(i,)) for i in range(4)]\nfor x in ts: x.start()\nfor x in ts: x.join()\nresult = len(out)",
			result: `20`},
		{name: "a flood stops at the cap", calls: pyrunner.MaxAgentForwards, answer: drivertest.CappedAnswer(),
			code: "codes = {}\nfor i in range(150):\n    try:\n        agent.call('t'); s = 200\n    except AgentCallError as e:\n        s = e.status\n" +
				"    codes[s] = codes.get(s, 0) + 1\nresult = codes",
			result: `{"200":100,"429":50}`},
		{name: "a flood of garbage stops at the cap too", calls: 0,
			code:   "import os\nn = 0\nfor i in range(150):\n    os.write(6, b'{\"method\": 1}\\n')\n    n += b'429' in os.read(6, 1000)\nresult = n",
			result: `49`}, // the host refuses the 101st (a bad request), the agent the rest
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ep := &drivertest.AgentEndpoint{Answer: tt.answer}
			if tt.noEndpoint {
				ep = nil
			}
			res := runWithCalls(t, sock, agent.RunRequest{Code: tt.code, Agent: info, AllowSpawn: tt.spawn}, ep)
			if tt.errType != "" {
				if res.Error == nil || res.Error.Type != tt.errType {
					t.Fatalf("error %+v, want %s; stderr %s", res.Error, tt.errType, res.Stderr)
				}
			} else if res.Error != nil || res.ExitCode != 0 {
				t.Fatalf("exit %d, error %+v; stderr %s", res.ExitCode, res.Error, res.Stderr)
			}
			if len(res.Stderr) > 0 {
				t.Logf("stderr: %s", res.Stderr)
			}
			if tt.result != "" && !jsonEqual(t, res.Result, tt.result) {
				t.Errorf("result %s, want %s", res.Result, tt.result)
			}
			if ep != nil {
				if n := len(ep.Calls()); n != tt.calls {
					t.Errorf("%d calls reached the endpoint, want %d", n, tt.calls)
				}
				if ep.Overlapped() {
					t.Error("two calls were answered at the same time")
				}
			}
		})
	}
}

// TestAgentCallTimeout: a run whose call is still waiting at the run's timeout is killed as
// any run; the call's ctx ends with the run, and the agent serves the next run.
func TestAgentCallTimeout(t *testing.T) {
	sock := startAgent(t)
	ended := make(chan error, 1)
	ep := &drivertest.AgentEndpoint{Answer: func(ctx context.Context, c driver.AgentCall) (json.RawMessage, error) {
		<-ctx.Done()
		ended <- ctx.Err()
		return nil, ctx.Err()
	}}
	res := runWithCalls(t, sock, agent.RunRequest{Code: "print('calling', flush=True)\nagent.run('slow')", TimeoutMS: 1500}, ep)
	if !res.TimedOut || !strings.Contains(string(res.Stdout), "calling") {
		t.Fatalf("timed out %v, stdout %q: want a timeout during the call", res.TimedOut, res.Stdout)
	}
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Errorf("the call's ctx ended with %v, want it cancelled with the run", err)
	}
	if res := runWithCalls(t, sock, agent.RunRequest{Code: "result = agent.run('next')['echo']"}, &drivertest.AgentEndpoint{}); string(res.Result) != `"next"` {
		t.Errorf("next run: result %s", res.Result)
	}
}
