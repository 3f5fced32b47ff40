package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// agentEndpoint is the operator's endpoint of the e2e tests, on the host's loopback (the host
// calls it, not the sandbox): it records what it receives.
type agentEndpoint struct {
	mu   sync.Mutex
	reqs []agentRequest
}

type agentRequest struct {
	Path, Auth string
	Body       map[string]any
}

func (ep *agentEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var body map[string]any
	json.Unmarshal(b, &body)
	ep.mu.Lock()
	ep.reqs = append(ep.reqs, agentRequest{r.URL.Path, r.Header.Get("Authorization"), body})
	ep.mu.Unlock()
	switch r.URL.Path {
	case "/agent":
		w.Header().Set("Content-Type", "application/json")
		task, _ := json.Marshal(body["task"])
		fmt.Fprintf(w, `{"summary": "sales are up", "task": %s, "rows": 12}`, task)
	case "/fail":
		http.Error(w, "internal error", http.StatusInternalServerError)
	case "/slow":
		<-r.Context().Done()
	}
}

func (ep *agentEndpoint) last() agentRequest {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.reqs[len(ep.reqs)-1]
}

func (ep *agentEndpoint) count() int {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return len(ep.reqs)
}

// TestAgentObject: the seed's `result = agent.run('analyze sales data')` in both modes, against
// an endpoint the config file names for the agent_id: the answer comes back as `result`, the
// endpoint gets the run's ids and the header the operator configured, which the code cannot see;
// no endpoint is AgentNotConfigured, an endpoint's 500 an AgentCallError, a slow endpoint is cut
// at its timeout, a flood stops at the cap, and every call is in the audit log.
func TestAgentObject(t *testing.T) {
	requireWasm(t)
	ep := &agentEndpoint{}
	srv := httptest.NewServer(ep)
	defer srv.Close()
	const secret = "Bearer e2e-s3cret-token"
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.json")
	body := fmt.Sprintf(`{"agents": {
		"data-processor": {"url": %q, "headers": {"Authorization": %q}, "timeout": 30},
		"failing": {"url": %q},
		"slow": {"url": %q, "timeout": 1}}}`, srv.URL+"/agent", secret, srv.URL+"/fail", srv.URL+"/slow")
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServerWith(t, filepath.Join(dir, "data"), "--config", cfg, "--wasm-image", "python:3.11-wasi="+wasmImage)
	s.key = s.newKey("agents", "pro") // more than the free plan's 3 sandboxes at once

	for _, mode := range []string{"container", "wasm"} {
		t.Run(mode, func(t *testing.T) {
			sandbox := func(agentID string) string {
				id := s.createReady(s.key, map[string]any{"agent_id": agentID, "mode": mode})
				t.Cleanup(func() { s.do("DELETE", "/api/sandbox/"+id, s.key, nil) })
				return id
			}
			id := sandbox("data-processor")
			r := s.run(s.key, id, "result = agent.run('analyze sales data')", 30)
			want := map[string]any{"summary": "sales are up", "task": "analyze sales data", "rows": float64(12)}
			if r["status"] != "completed" || fmt.Sprint(r["result"]) != fmt.Sprint(want) {
				t.Fatalf("the seed's example: %v", r)
			}
			got := ep.last()
			if got.Auth != secret || got.Body["agent_id"] != "data-processor" || got.Body["sandbox_id"] != id ||
				got.Body["run_id"] != r["run_id"] || got.Body["method"] != "run" || got.Body["task"] != "analyze sales data" {
				t.Errorf("the endpoint received %+v", got)
			}

			// Who the run is, and the secret nowhere in its reach.
			r = s.run(s.key, id, `import os
s = "`+strings.TrimPrefix(secret, "Bearer ")+`"
env = "".join(k + "=" + v for k, v in os.environ.items())
try:
    env += open("/proc/self/environ").read()
except OSError:
    pass
result = [agent.id, agent.sandbox_id, agent.run_id, s in env, agent.call("lookup", city="Paris")["rows"]]`, 30)
			if fmt.Sprint(r["result"]) != fmt.Sprint([]any{"data-processor", id, r["run_id"], false, float64(12)}) {
				t.Errorf("ids, secret, call: %v", r)
			}
			if got := ep.last(); got.Body["tool"] != "lookup" || fmt.Sprint(got.Body["args"]) != "map[city:Paris]" {
				t.Errorf("agent.call: the endpoint received %+v", got)
			}

			r = s.run(s.key, sandbox("nobody"), "result = agent.run('analyze sales data')", 30)
			e, _ := r["error"].(map[string]any)
			if r["status"] != "failed" || e["type"] != "AgentNotConfigured" || !strings.Contains(fmt.Sprint(e["message"]), `agents["nobody"]`) {
				t.Errorf("not configured: %v", r)
			}

			r = s.run(s.key, sandbox("failing"), "try:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = [e.status, str(e)]", 30)
			if fmt.Sprint(r["result"]) != fmt.Sprint([]any{float64(500), "the endpoint answered 500 Internal Server Error"}) {
				t.Errorf("an endpoint's 500: %v", r)
			}

			slow := sandbox("slow")
			r = s.run(s.key, slow, "try:\n    agent.run('x')\nexcept AgentCallError as e:\n    result = [e.status, str(e)]", 30)
			if fmt.Sprint(r["result"]) != fmt.Sprint([]any{nil, "no answer from the endpoint in time (its timeout is 1s, and a call ends with its run)"}) {
				t.Errorf("a slow endpoint: %v", r)
			}

			before := ep.count()
			r = s.run(s.key, id, "n, last = 0, None\nfor i in range(120):\n    try:\n        agent.call('t')\n        n += 1\n"+
				"    except AgentCallError as e:\n        last = e.status\nresult = [n, last]", 60)
			if fmt.Sprint(r["result"]) != fmt.Sprint([]any{float64(100), float64(429)}) || ep.count()-before != 100 {
				t.Errorf("a flood: %v, %d reached the endpoint", r, ep.count()-before)
			}

			_, audit := s.do("GET", "/api/audit?type=agent.call&sandbox_id="+slow, s.key, nil)
			evs, _ := audit["events"].([]any)
			if len(evs) != 1 {
				t.Fatalf("audit of the slow sandbox: %v", audit)
			}
			ev := evs[0].(map[string]any)
			d := ev["detail"].(map[string]any)
			if ev["agent_id"] != "slow" || d["agent"] != "slow" || d["tool"] != "run" || d["outcome"] != "timeout" || d["status"] != float64(0) {
				t.Errorf("agent.call event: %v", ev)
			}
			_, audit = s.do("GET", "/api/audit?type=agent.call&sandbox_id="+id+"&limit=1", s.key, nil)
			if audit["total"] != float64(2+100+1) {
				t.Errorf("%v agent.call events of the first sandbox, want 103 (2 calls, 100 of the flood, its limit)", audit["total"])
			}
			if mode != "container" {
				return // (code contexts: container mode)
			}

			// In a code context each run has its own agent: an object kept from an earlier run
			// is closed, not a way into a later run's channel.
			status, cx := s.do("POST", "/api/sandbox/"+id+"/contexts", s.key, nil)
			if status != 201 {
				t.Fatalf("create context: %d %v", status, cx)
			}
			inCtx := func(code string) map[string]any {
				t.Helper()
				status, m := s.do("POST", "/api/sandbox/"+id+"/run", s.key, map[string]any{"code": code, "timeout": 30, "context": cx["context_id"]})
				if status != 200 {
					t.Fatalf("run in a context: %d %v", status, m)
				}
				return m
			}
			r1 := inCtx("kept = agent\nresult = [agent.run_id, agent.run('in a context')['task']]")
			if fmt.Sprint(r1["result"]) != fmt.Sprint([]any{r1["run_id"], "in a context"}) {
				t.Fatalf("agent in a context: %v", r1)
			}
			r2 := inCtx("try:\n    kept.run('x')\n    old = 'answered'\nexcept AgentCallError as e:\n    old = 'closed'\n" +
				"result = [agent.run_id, kept.run_id, old, agent.call('lookup')['rows']]")
			if fmt.Sprint(r2["result"]) != fmt.Sprint([]any{r2["run_id"], r1["run_id"], "closed", float64(12)}) {
				t.Errorf("a later run in the context: %v", r2)
			}
		})
	}
}
