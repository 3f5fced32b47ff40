package httpapi_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
)

type fixture struct {
	url, key, otherKey string
}

func setup(t *testing.T, opts httpapi.Options) fixture {
	t.Helper()
	return setupWith(t, opts, sandbox.Config{DataDir: t.TempDir(), Images: defaultImages},
		map[string]driver.Driver{"container": fakedriver.New()})
}

var defaultImages = []sandbox.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/x", Default: true, Digest: "sha256:abc"}}

// setupWith serves a service of this configuration with these drivers (by mode).
func setupWith(t *testing.T, opts httpapi.Options, cfg sandbox.Config, drivers map[string]driver.Driver) fixture {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(cfg.DataDir, "db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := sandbox.New(ctx, cfg, st, drivers)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(ctx) })
	srv := httptest.NewServer(httpapi.New(svc, opts))
	t.Cleanup(srv.Close)
	key, _, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	other, _, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "other", "free")
	if err != nil {
		t.Fatal(err)
	}
	return fixture{url: srv.URL, key: key, otherKey: other}
}

// call sends a request and decodes the JSON answer into a map.
func call(t *testing.T, method, url, key, body string, hdr ...string) (int, map[string]any, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	if key != "" {
		req.Header.Set("X-AgentCop-Key", key)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if len(b) > 0 {
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s %s: answer is not JSON: %q", method, url, b)
		}
	}
	return resp.StatusCode, m, resp.Header
}

const seedCreate = `{"agent_id":"data-processor","mode":"container","config":{"image":"agentcop/agent-sandbox:latest",
 "filesystem":{"read_only":["/workspace/data"],"read_write":["/workspace/output"],"blocked":["/etc","/root"]},
 "network":{"block_outbound":true},"resources":{"cpu":"0.5","memory":"512m","timeout":30}}}`

func TestErrorsUseTheEnvelope(t *testing.T) {
	f := setup(t, httpapi.Options{})
	big := `{"agent_id":"a","pad":"` + strings.Repeat("x", 2<<20) + `"}`
	cases := []struct {
		name, method, path, key, body string
		status                        int
		code, msgHas                  string
	}{
		{"no key", "GET", "/api/sandbox", "", "", 401, "unauthorized", "X-AgentCop-Key"},
		{"wrong key", "GET", "/api/sandbox", "sbxk_nope", "", 401, "unauthorized", ""},
		{"unknown field", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","colour":1}`, 400, "invalid_request", `"colour"`},
		{"wrong type", "POST", "/api/sandbox/create", f.key, `{"agent_id":7}`, 400, "invalid_request", "agent_id"},
		{"nested wrong type", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","config":{"resources":{"timeout":"30"}}}`, 400, "invalid_request", "config.resources.timeout"},
		{"field name in another case", "POST", "/api/sandbox/create", f.key, `{"AGENT_ID":"a"}`, 400, "invalid_request", `"AGENT_ID"`},
		{"nested name in another case", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","config":{"Resources":{}}}`, 400, "invalid_request", `"config.Resources"`},
		{"duplicate key", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","agent_id":"b"}`, 400, "invalid_request", "twice"},
		{"null for a string", "POST", "/api/sandbox/create", f.key, `{"agent_id":null}`, 400, "invalid_request", "null"},
		{"bad status filter", "GET", "/api/sandbox?status=bogus", f.key, "", 400, "invalid_request", "bogus"},
		{"trailing garbage", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a"} x`, 400, "invalid_request", "after the JSON"},
		{"empty body", "POST", "/api/sandbox/create", f.key, ``, 400, "invalid_request", "empty"},
		{"too large", "POST", "/api/sandbox/create", f.key, big, 413, "payload_too_large", ""},
		{"image", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","config":{"image":"foo:1"}}`, 403, "image_not_approved", `"foo:1"`},
		{"bad allow entry", "POST", "/api/sandbox/create", f.key, `{"agent_id":"a","config":{"network":{"allow":["not a host"]}}}`, 400, "invalid_request", "config.network.allow"},
		{"missing sandbox", "GET", "/api/sandbox/sbx_nope", f.key, "", 404, "not_found", ""},
		{"no route", "GET", "/api/nothing", f.key, "", 404, "not_found", ""},
		{"bad page", "GET", "/api/sandbox?page=0", f.key, "", 400, "invalid_request", "page"},
		{"bad limit", "GET", "/api/sandbox?limit=501", f.key, "", 400, "invalid_request", "limit"},
		{"run without code", "POST", "/api/sandbox/sbx_x/run", f.key, `{}`, 400, "invalid_request", "code"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, m, _ := call(t, c.method, f.url+c.path, c.key, c.body)
			if status != c.status || m["error"] != c.code || m["code"] != float64(c.status) ||
				m["docs"] != "/docs/errors#"+c.code || !strings.Contains(m["message"].(string), c.msgHas) {
				t.Fatalf("got %d %v; want %d %s containing %q", status, m, c.status, c.code, c.msgHas)
			}
		})
	}
}

func TestSandboxFlowOverHTTP(t *testing.T) {
	f := setup(t, httpapi.Options{})
	for _, prefix := range []string{"/api", "/api/v1"} {
		status, m, _ := call(t, "POST", f.url+prefix+"/sandbox/create", f.key, seedCreate)
		if status != 201 || m["status"] != "ready" || m["mode"] != "container" || !strings.HasPrefix(m["sandbox_id"].(string), "sbx_") {
			t.Fatalf("create: %d %v", status, m)
		}
		id := m["sandbox_id"].(string)
		// Bearer auth works too.
		status, m, _ = call(t, "POST", f.url+prefix+"/sandbox/"+id+"/run", "", `{"code":"result = 6*7"}`, "Authorization", "Bearer "+f.key)
		if status != 200 || m["status"] != "completed" || m["result"] != float64(42) {
			t.Fatalf("sync run: %d %v", status, m)
		}
		status, m, _ = call(t, "POST", f.url+prefix+"/sandbox/"+id+"/run", f.key, `{"code":"x","async":true}`)
		if status != 202 || m["status"] != "queued" || !strings.HasPrefix(m["run_id"].(string), "run_") {
			t.Fatalf("async run: %d %v", status, m)
		}
		status, m, _ = call(t, "GET", f.url+prefix+"/sandbox/"+id, f.key, "")
		if status != 200 || m["agent_id"] != "data-processor" || m["config"].(map[string]any)["resources"].(map[string]any)["cpu"] != "0.5" {
			t.Fatalf("get: %d %v", status, m)
		}
		if status, _, _ = call(t, "GET", f.url+prefix+"/sandbox/"+id, f.otherKey, ""); status != 404 {
			t.Fatalf("other account: %d", status)
		}
		if status, _, _ = call(t, "DELETE", f.url+prefix+"/sandbox/"+id, f.key, ""); status != 204 {
			t.Fatalf("delete: %d", status)
		}
		if status, _, _ = call(t, "DELETE", f.url+prefix+"/sandbox/"+id, f.key, ""); status != 204 {
			t.Fatalf("second delete: %d", status)
		}
		status, m, _ = call(t, "POST", f.url+prefix+"/sandbox/"+id+"/run", f.key, `{"code":"1"}`)
		if status != 409 || m["error"] != "sandbox_destroyed" {
			t.Fatalf("run after delete: %d %v", status, m)
		}
		status, m, _ = call(t, "GET", f.url+prefix+"/sandbox/"+id+"/runs", f.key, "")
		if status != 200 || m["total"] != float64(2) {
			t.Fatalf("runs: %d %v", status, m)
		}
	}
	status, m, _ := call(t, "GET", f.url+"/api/audit?type=sandbox.destroyed", f.key, "")
	if status != 200 || m["total"] != float64(2) {
		t.Fatalf("audit: %d %v", status, m)
	}
	status, m, _ = call(t, "GET", f.url+"/api/usage", f.key, "")
	if status != 200 || m["runs"] != float64(4) || m["billed_minutes"].(float64) < 2 {
		t.Fatalf("usage: %d %v", status, m)
	}
	status, m, _ = call(t, "GET", f.url+"/api/images", f.key, "")
	if status != 200 || len(m["images"].([]any)) != 1 {
		t.Fatalf("images: %d %v", status, m)
	}
	status, m, _ = call(t, "GET", f.url+"/health", "", "")
	if status != 200 || m["status"] != "ok" {
		t.Fatalf("health: %d %v", status, m)
	}
}

// An upload over the limit is answered 413 even when the client sends its whole body before it
// reads the answer (Go's and Python's clients do): the server reads and drops the rest rather than
// resetting the connection, which the client would report as "connection reset by peer".
func TestUploadOverTheLimitAnswered(t *testing.T) {
	const limit = 1 << 20
	f := setupWith(t, httpapi.Options{}, sandbox.Config{DataDir: t.TempDir(), Images: defaultImages, MaxUploadBytes: limit},
		map[string]driver.Driver{"container": fakedriver.New()})
	status, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, seedCreate)
	if status != 201 {
		t.Fatalf("create: %d %v", status, m)
	}
	path := "/api/sandbox/" + m["sandbox_id"].(string) + "/files?path=/workspace/output/big"
	body := bytes.Repeat([]byte("x"), 4*limit) // 3 MiB past the limit: more than net/http drops unasked
	for _, c := range []struct{ name, header, body string }{
		{"chunked", "Transfer-Encoding: chunked", fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body)},
		{"sized, no 100-continue", fmt.Sprintf("Content-Length: %d", len(body)), string(body)},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(f.url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			req := fmt.Sprintf("PUT %s HTTP/1.1\r\nHost: x\r\nX-AgentCop-Key: %s\r\n%s\r\n\r\n%s", path, f.key, c.header, c.body)
			if _, err := io.WriteString(conn, req); err != nil { // all of it, before reading
				t.Fatalf("writing the request: %v", err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("reading the answer: %v", err)
			}
			defer resp.Body.Close()
			var env map[string]any
			if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || resp.StatusCode != 413 || env["error"] != "payload_too_large" {
				t.Fatalf("answer: %d %v %v", resp.StatusCode, env, err)
			}
		})
	}
}

func TestConcurrencyLimitAndRateLimit(t *testing.T) {
	f := setup(t, httpapi.Options{RatePerSec: 1, RateBurst: 5})
	codes := map[int]int{}
	var last http.Header
	for range 6 {
		status, _, h := call(t, "POST", f.url+"/api/sandbox/create", f.key, `{"agent_id":"a"}`)
		codes[status]++
		last = h
	}
	if codes[201] != 3 || codes[429] != 3 || last.Get("Retry-After") == "" {
		t.Fatalf("codes %v", codes)
	}
	_, m, _ := call(t, "GET", f.url+"/api/sandbox", f.key, "")
	if m["error"] != "rate_limited" {
		t.Fatalf("want rate_limited, got %v", m)
	}
}

// A quiet run's event stream carries keep-alive comments.
func TestEventsKeepAlive(t *testing.T) {
	f := setup(t, httpapi.Options{KeepAlive: 20 * time.Millisecond})
	_, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, `{"agent_id":"a"}`)
	id := m["sandbox_id"].(string)
	_, m, _ = call(t, "POST", f.url+"/api/sandbox/"+id+"/run", f.key, `{"code":"sleep:300","async":true}`)
	b := getRaw(t, f, "/api/sandbox/"+id+"/runs/"+m["run_id"].(string)+"/events")
	if n := strings.Count(string(b), ": keep-alive\n\n"); n < 3 || !strings.Contains(string(b), "event: end\n") {
		t.Errorf("%d keep-alives in %q", n, b)
	}
}
