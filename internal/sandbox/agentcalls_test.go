package sandbox_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
	"github.com/sandboxd/sandboxd/internal/store"
)

// recorder is an operator's endpoint: it records what it receives and answers by its path.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
}

type recorded struct {
	path, auth, contentType string
	body                    map[string]any
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var body map[string]any
	json.Unmarshal(b, &body)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, recorded{r.URL.Path, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), body})
	rec.mu.Unlock()
	switch r.URL.Path {
	case "/ok":
		w.Write([]byte(`{"answer": "done", "rows": 12}`))
	case "/fail":
		http.Error(w, "boom: Bearer s3cret", http.StatusInternalServerError)
	case "/notjson":
		w.Write([]byte("<html>hello</html>"))
	case "/redirect":
		http.Redirect(w, r, "http://127.0.0.1:1/elsewhere", http.StatusFound)
	case "/huge":
		w.Write([]byte(`"` + strings.Repeat("x", pyrunner.MaxAgentAnswer) + `"`))
	case "/slow":
		<-r.Context().Done()
	}
}

func (rec *recorder) count() int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return len(rec.reqs)
}

// TestAgentCalls: a run's agent calls reach the endpoint configured for the sandbox's agent_id
// (with its headers, host-side), their answers and errors come back as the runner reads them,
// each is audited, and the cap and the time limits hold. The fake driver makes the calls as a
// run's code would (its "agent:" directive).
func TestAgentCalls(t *testing.T) {
	rec := &recorder{}
	srv := httptest.NewServer(rec)
	defer srv.Close()
	ep := func(path string, timeout time.Duration) agentcall.Endpoint {
		return agentcall.Endpoint{URL: srv.URL + path, Headers: map[string]string{"Authorization": "Bearer s3cret"}, Timeout: timeout}
	}
	closed, err := net.Listen("tcp", "127.0.0.1:0") // a loopback port nothing listens on once closed
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "http://" + closed.Addr().String() + "/agent"
	closed.Close()
	agents, err := agentcall.New(map[string]agentcall.Endpoint{
		"closed": {URL: closedURL},
		"ok":     ep("/ok", 0), "fail": ep("/fail", 0), "notjson": ep("/notjson", 0), "redirect": ep("/redirect", 0),
		"huge": ep("/huge", 0), "slow": ep("/slow", 300*time.Millisecond), "slow-run": ep("/slow", time.Minute),
	})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, "pro")
	e.svc.Close(context.Background())
	e.agents = agents
	e.svc = e.open(t)

	const runTask = `{"method": "run", "task": "analyze sales data", "args": {"k": 1}}`
	const callTool = `{"method": "call", "tool": "lookup", "args": {}}`
	tests := []struct {
		name, agent, code string
		timeout           int
		answer            string // the first answer line, JSON
		outcome           string // of the first agent.call event
		status            int
		reached           int // requests the endpoint received
	}{
		{name: "the endpoint's answer", agent: "ok", code: "agent:1:" + runTask,
			answer: `{"ok": true, "result": {"answer": "done", "rows": 12}}`, outcome: "ok", status: 200, reached: 1},
		{name: "no endpoint for the agent_id", agent: "nobody", code: "agent:1:" + runTask,
			answer:  `{"error": "AgentNotConfigured", "message": "no endpoint is configured for agent_id \"nobody\": the operator adds agents[\"nobody\"] (its url) to sandboxd's config file"}`,
			outcome: "not_configured"},
		{name: "an error status", agent: "fail", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "the endpoint answered 500 Internal Server Error", "status": 500}`, outcome: "status", status: 500, reached: 1},
		{name: "an answer that is not JSON", agent: "notjson", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "the endpoint's answer is not JSON", "status": 200}`, outcome: "not_json", status: 200, reached: 1},
		{name: "a redirect is not followed", agent: "redirect", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "the endpoint answered 302 Found", "status": 302}`, outcome: "status", status: 302, reached: 1},
		{name: "an answer over 8 MiB", agent: "huge", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "the endpoint's answer is over the 8388608-byte limit", "status": 200}`, outcome: "too_large", status: 200, reached: 1},
		{name: "the endpoint's timeout", agent: "slow", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "no answer from the endpoint in time (its timeout is 300ms, and a call ends with its run)"}`, outcome: "timeout", reached: 1},
		{name: "the run's time", agent: "slow-run", code: "agent:1:" + callTool, timeout: 1,
			answer: `{"error": "AgentCallError", "message": "no answer from the endpoint in time (its timeout is 1m0s, and a call ends with its run)"}`, outcome: "timeout", reached: 1},
		{name: "an unreachable endpoint", agent: "closed", code: "agent:1:" + callTool,
			answer: `{"error": "AgentCallError", "message": "the endpoint could not be reached"}`, outcome: "unreachable"},
		{name: "a bad request never reaches the endpoint", agent: "ok", code: `agent:1:{"method": "call", "tool": "a b"}`,
			answer: `{"error": "AgentCallError", "message": "request: tool name \"a b\": want 1–128 characters of A-Z a-z 0-9 _ . : / -", "status": 400}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := rec.count()
			id := e.createFor(t, tt.agent, nil)
			req := api.RunRequest{Code: &tt.code}
			if tt.timeout > 0 {
				req.Timeout = &tt.timeout
			}
			r, _, err := e.svc.Run(context.Background(), e.acct, id, req)
			if err != nil {
				t.Fatal(err)
			}
			if b, _ := json.Marshal(r); strings.Contains(string(b), srv.URL) || strings.Contains(string(b), closedURL) {
				t.Errorf("the run's result names the endpoint: %s", b)
			}
			var answers []json.RawMessage
			if err := json.Unmarshal(r.Result, &answers); err != nil || len(answers) != 1 {
				t.Fatalf("result %s: %v", r.Result, err)
			}
			if !drivertest.SameJSON(answers[0], tt.answer) {
				t.Errorf("answer %s\nwant   %s", answers[0], tt.answer)
			}
			if got := rec.count() - before; got != tt.reached {
				t.Errorf("the endpoint received %d requests, want %d", got, tt.reached)
			}
			if tt.reached > 0 {
				rec.mu.Lock()
				got := rec.reqs[len(rec.reqs)-1]
				rec.mu.Unlock()
				if got.auth != "Bearer s3cret" || got.contentType != "application/json" {
					t.Errorf("headers: Authorization %q, Content-Type %q", got.auth, got.contentType)
				}
				if got.body["agent_id"] != tt.agent || got.body["sandbox_id"] != id || got.body["run_id"] != r.RunID {
					t.Errorf("body %v: want agent %s, sandbox %s, run %s", got.body, tt.agent, id, r.RunID)
				}
			}
			evs := agentEvents(t, e, id)
			if tt.outcome == "" {
				if len(evs) != 0 {
					t.Errorf("audit: %v, want no agent.call event", evs)
				}
				return
			}
			if len(evs) != 1 || evs[0]["outcome"] != tt.outcome || evs[0]["status"] != float64(tt.status) || evs[0]["agent"] != tt.agent {
				t.Errorf("audit: %v, want one agent.call event, outcome %s, status %d", evs, tt.outcome, tt.status)
			}
		})
	}

	t.Run("the body of agent.run", func(t *testing.T) {
		id := e.createFor(t, "ok", nil)
		code := "agent:1:" + runTask
		r, _, err := e.svc.Run(context.Background(), e.acct, id, api.RunRequest{Code: &code})
		if err != nil {
			t.Fatal(err)
		}
		rec.mu.Lock()
		got := rec.reqs[len(rec.reqs)-1].body
		rec.mu.Unlock()
		want := `{"agent_id": "ok", "sandbox_id": "` + id + `", "run_id": "` + r.RunID + `", "method": "run", "task": "analyze sales data", "args": {"k": 1}}`
		if b, _ := json.Marshal(got); !drivertest.SameJSON(b, want) {
			t.Errorf("body %s\nwant %s", b, want)
		}
		evs := agentEvents(t, e, id)
		if len(evs) != 1 || evs[0]["tool"] != "run" || evs[0]["method"] != "run" || evs[0]["request_bytes"] != float64(len(runTask)) ||
			evs[0]["answer_bytes"] != float64(len(`{"answer": "done", "rows": 12}`)) {
			t.Errorf("audit %v", evs)
		}
	})

	t.Run("calls past the cap are refused, the first of them audited", func(t *testing.T) {
		before := rec.count()
		id := e.createFor(t, "ok", nil)
		code := "agent:105:" + callTool
		r, _, err := e.svc.Run(context.Background(), e.acct, id, api.RunRequest{Code: &code})
		if err != nil {
			t.Fatal(err)
		}
		var answers []map[string]any
		json.Unmarshal(r.Result, &answers)
		ok, refused := 0, 0
		for _, a := range answers {
			switch {
			case a["ok"] == true:
				ok++
			case a["status"] == float64(429):
				refused++
			}
		}
		if ok != pyrunner.MaxAgentCalls || refused != 5 || rec.count()-before != pyrunner.MaxAgentCalls {
			t.Errorf("%d answered, %d refused, %d reached the endpoint: want %d, 5, %d", ok, refused, rec.count()-before, pyrunner.MaxAgentCalls, pyrunner.MaxAgentCalls)
		}
		evs := agentEvents(t, e, id)
		if len(evs) != pyrunner.MaxAgentCalls+1 || evs[len(evs)-1]["outcome"] != "limit" {
			t.Errorf("%d agent.call events (last %v), want %d, the last a limit", len(evs), evs[len(evs)-1], pyrunner.MaxAgentCalls+1)
		}
	})
}

// agentEvents returns the details of sandbox id's agent.call events.
func agentEvents(t *testing.T, e *env, id string) []map[string]any {
	t.Helper()
	list, err := e.svc.Audit(context.Background(), e.acct, store.EventFilter{SandboxID: id, Type: "agent.call"}, 1, 500)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, ev := range list.Events {
		var d map[string]any
		json.Unmarshal(ev.Detail, &d)
		out = append(out, d)
	}
	return out
}
