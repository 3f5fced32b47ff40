package httpapi_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/pb33f/jsonschema/v6"
	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	v3 "github.com/pb33f/libopenapi/datamodel/high/v3"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/openapitest"
)

// check validates every response the tests of this package receive (they use http.DefaultClient).
var check *openapitest.Transport

func TestMain(m *testing.M) {
	c, err := openapitest.New(api.OpenAPI)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	check = &openapitest.Transport{Checker: c}
	http.DefaultClient.Transport = check
	code := m.Run()
	if failures, n := check.Failures(); len(failures) > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d responses disagree with api/openapi.json:\n", len(failures), n)
		for _, f := range failures {
			fmt.Fprintf(os.Stderr, "  %v\n", f)
		}
		code = max(code, 1)
	}
	os.Exit(code)
}

var wildcard = regexp.MustCompile(`\{[^}]*\}`)

// model is api/openapi.json's model.
func model(t *testing.T) *v3.Document {
	t.Helper()
	doc, err := libopenapi.NewDocument(api.OpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	m, err := doc.BuildV3Model()
	if err != nil {
		t.Fatal(err)
	}
	return &m.Model
}

// TestRoutesMatchTheDocument: every route of the router is an operation of api/openapi.json, under
// /api and /api/v1 alike (the document's two servers), and every operation of the document, under
// each of its servers, is a route.
func TestRoutesMatchTheDocument(t *testing.T) {
	m := model(t)
	var documented []string
	for path, item := range m.Paths.PathItems.FromOldest() {
		for method, op := range item.GetOperations().FromOldest() {
			servers := m.Servers // the operation's own servers win over its path's, which win over the document's
			if len(op.Servers) > 0 {
				servers = op.Servers
			} else if len(item.Servers) > 0 {
				servers = item.Servers
			}
			if len(servers) == 0 {
				t.Errorf("%s %s has no server", method, path)
			}
			for _, srv := range servers {
				documented = append(documented, strings.ToUpper(method)+" "+wildcard.ReplaceAllString(strings.TrimSuffix(srv.URL, "/")+path, "{}"))
			}
		}
	}
	var routed []string
	for _, r := range httpapi.Routes() {
		if r == httpapi.MCPPath {
			continue // the Model Context Protocol's endpoint: JSON-RPC as the MCP specification describes it, no REST operation
		}
		routed = append(routed, wildcard.ReplaceAllString(r, "{}"))
	}
	sort.Strings(documented)
	sort.Strings(routed)
	for _, r := range routed {
		if !slices.Contains(documented, r) {
			t.Errorf("route %s is not in api/openapi.json", r)
		}
	}
	for _, d := range documented {
		if !slices.Contains(routed, d) {
			t.Errorf("api/openapi.json describes %s, which the router does not serve", d)
		}
	}
	// Both prefixes, route for route.
	for _, r := range routed {
		if method, rest, ok := strings.Cut(r, " /api/"); ok && !strings.HasPrefix(rest, "v1/") {
			if !slices.Contains(routed, method+" /api/v1/"+rest) {
				t.Errorf("%s has no /api/v1 twin", r)
			}
		}
	}
	if len(routed) < 30 {
		t.Errorf("only %d routes: %v", len(routed), routed)
	}
}

// TestOperationIDs: every operation has its operationId, camelCase and unique, and they are the
// ones below: client generators name their methods after them (openapi-typescript's operations
// type, which api/openapi_test.go type-checks, is keyed by them), so renaming one breaks clients.
func TestOperationIDs(t *testing.T) {
	want := map[string]string{
		"GET /health":                                        "getHealth",
		"GET /metrics":                                       "getMetrics",
		"GET /openapi.json":                                  "getOpenApiDocument",
		"POST /sandbox/create":                               "createSandbox",
		"GET /sandbox":                                       "listSandboxes",
		"GET /sandbox/{sandbox_id}":                          "getSandbox",
		"DELETE /sandbox/{sandbox_id}":                       "deleteSandbox",
		"POST /sandbox/{sandbox_id}/run":                     "runCode",
		"GET /sandbox/{sandbox_id}/runs":                     "listRuns",
		"GET /sandbox/{sandbox_id}/runs/{run_id}":            "getRun",
		"POST /sandbox/{sandbox_id}/runs/{run_id}/cancel":    "cancelRun",
		"GET /sandbox/{sandbox_id}/runs/{run_id}/events":     "streamRunEvents",
		"POST /sandbox/{sandbox_id}/contexts":                "createContext",
		"GET /sandbox/{sandbox_id}/contexts":                 "listContexts",
		"GET /sandbox/{sandbox_id}/contexts/{context_id}":    "getContext",
		"DELETE /sandbox/{sandbox_id}/contexts/{context_id}": "deleteContext",
		"PUT /sandbox/{sandbox_id}/files":                    "putFile",
		"GET /sandbox/{sandbox_id}/files":                    "getFile",
		"DELETE /sandbox/{sandbox_id}/files":                 "deleteFile",
		"GET /usage":                                         "getUsage",
		"GET /audit":                                         "listAuditEvents",
		"GET /images":                                        "listImages",
	}
	camel := regexp.MustCompile(`^[a-z]+([A-Z][a-z0-9]*)*$`)
	got := map[string]string{}
	seen := map[string]string{}
	for path, item := range model(t).Paths.PathItems.FromOldest() {
		for method, op := range item.GetOperations().FromOldest() {
			key := strings.ToUpper(method) + " " + path
			got[key] = op.OperationId
			if !camel.MatchString(op.OperationId) {
				t.Errorf("%s: operationId %q is not camelCase", key, op.OperationId)
			}
			if other, dup := seen[op.OperationId]; dup {
				t.Errorf("%s and %s share the operationId %q", other, key, op.OperationId)
			}
			seen[op.OperationId] = key
		}
	}
	for key, id := range want {
		if got[key] != id {
			t.Errorf("%s: operationId %q, want %q", key, got[key], id)
		}
	}
	for key := range got {
		if _, ok := want[key]; !ok {
			t.Errorf("%s is not in this test's table: add it with its operationId", key)
		}
	}
}

// TestOpenAPIDocumentIsValid: api/openapi.json is a valid OpenAPI 3.1 document (against the
// specification's JSON Schema), each of its schemas is a valid JSON Schema 2020-12 schema, and
// each example is valid against its schema.
func TestOpenAPIDocumentIsValid(t *testing.T) {
	doc, err := libopenapi.NewDocument(api.OpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	if v := doc.GetVersion(); !strings.HasPrefix(v, "3.1.") {
		t.Fatalf("openapi %s, want 3.1.x", v)
	}
	v, errs := validator.NewValidator(doc)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if ok, verrs := v.ValidateDocument(); !ok {
		for _, e := range verrs {
			t.Errorf("%s: %s", e.Message, e.Reason)
			for _, s := range e.SchemaValidationErrors {
				t.Errorf("  %s (schema %s)", s.Reason, s.KeywordLocation)
			}
		}
	}

	var raw any
	if err := json.Unmarshal(api.OpenAPI, &raw); err != nil {
		t.Fatal(err)
	}
	const base = "file:///openapi.json"
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat()
	if err := c.AddResource(base, raw); err != nil {
		t.Fatal(err)
	}
	compiled := map[string]*jsonschema.Schema{}
	compile := func(ptr string) *jsonschema.Schema {
		if s, ok := compiled[ptr]; ok {
			return s
		}
		s, err := c.Compile(base + "#" + ptr)
		if err != nil {
			t.Errorf("schema %s: %v", ptr, err)
		}
		compiled[ptr] = s
		return s
	}
	example := func(where string, s *jsonschema.Schema, v any) {
		if s == nil {
			return
		}
		if err := s.Validate(v); err != nil {
			t.Errorf("example %s: %v", where, err)
		}
	}
	schemas, examples := 0, 0
	var walk func(v any, ptr string)
	walk = func(v any, ptr string) {
		switch v := v.(type) {
		case []any:
			for i, x := range v {
				walk(x, fmt.Sprintf("%s/%d", ptr, i))
			}
		case map[string]any:
			if strings.HasSuffix(ptr, "/schema") || regexp.MustCompile(`^/components/schemas/[^/]+$`).MatchString(ptr) {
				compile(ptr)
				schemas++
			}
			if ex, ok := v["examples"].([]any); ok { // a schema's examples
				for i, x := range ex {
					example(fmt.Sprintf("%s/examples/%d", ptr, i), compile(ptr), x)
					examples++
				}
			}
			if _, ok := v["schema"]; ok { // a media type or parameter
				if x, ok := v["example"]; ok {
					example(ptr+"/example", compile(ptr+"/schema"), x)
					examples++
				}
				if ex, ok := v["examples"].(map[string]any); ok {
					for name, x := range ex {
						example(ptr+"/examples/"+name, compile(ptr+"/schema"), x.(map[string]any)["value"])
						examples++
					}
				}
			}
			for k, x := range v {
				walk(x, ptr+"/"+strings.ReplaceAll(strings.ReplaceAll(k, "~", "~0"), "/", "~1"))
			}
		}
	}
	walk(raw, "")
	if schemas < 50 || examples < 20 {
		t.Errorf("checked only %d schemas and %d examples", schemas, examples)
	}
}

// TestOpenAPIServed: the document is served as-is under both prefixes, without a key.
func TestOpenAPIServed(t *testing.T) {
	f := setup(t, httpapi.Options{})
	for _, p := range []string{"/api/openapi.json", "/api/v1/openapi.json"} {
		resp, err := http.Get(f.url + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		etag := resp.Header.Get("ETag")
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" || !bytes.Equal(b, api.OpenAPI) || etag == "" {
			t.Fatalf("%s: %d %s %d bytes, ETag %q", p, resp.StatusCode, resp.Header.Get("Content-Type"), len(b), etag)
		}
		req, _ := http.NewRequest("GET", f.url+p, nil)
		req.Header.Set("If-None-Match", etag)
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 304 {
			t.Fatalf("%s with If-None-Match: %d", p, resp.StatusCode)
		}
	}
}

// TestResponsesMatchTheDocument walks the API over the fake driver, including answers the
// end-to-end tests do not provoke; TestMain checks every response against the document.
func TestResponsesMatchTheDocument(t *testing.T) {
	_, before := check.Failures()
	f := setup(t, httpapi.Options{Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8; escaping=underscores")
		fmt.Fprintln(w, "# TYPE up gauge\nup 1")
	})})
	ck := func(want int, method, path, body string, hdr ...string) map[string]any {
		t.Helper()
		status, m, _ := call(t, method, f.url+path, f.key, body, hdr...)
		if status != want {
			t.Fatalf("%s %s: %d %v, want %d", method, path, status, m, want)
		}
		return m
	}
	for _, p := range []string{"/api", "/api/v1"} {
		id := ck(201, "POST", p+"/sandbox/create", seedCreate)["sandbox_id"].(string)
		sb := p + "/sandbox/" + id
		ck(200, "GET", sb, "")
		ck(200, "GET", p+"/sandbox?status=ready&agent_id=data-processor&page=1&limit=10", "")
		ck(200, "POST", sb+"/run", `{"code":"fail"}`)
		run := ck(202, "POST", sb+"/run", `{"code":"block","async":true,"env":{"A":"b"}}`)["run_id"].(string)
		ck(200, "GET", sb+"/runs/"+run, "")
		ck(200, "POST", sb+"/runs/"+run+"/cancel", "")
		ck(200, "GET", sb+"/runs?limit=1", "")
		ck(400, "GET", sb+"/runs/"+run+"/events", "", "Last-Event-ID", "nonsense")
		ck(404, "GET", sb+"/runs/run_nope", "")
		events(t, f, sb+"/runs/"+run+"/events")
		ck(201, "PUT", sb+"/files?path=/workspace/output/a.txt", "hello")
		ck(200, "GET", sb+"/files?path=/workspace/output/", "")
		ck(400, "GET", sb+"/files?path=", "")
		ck(403, "GET", sb+"/files?path=/etc/passwd", "")
		ck(201, "PUT", sb+"/files?path=/workspace/output/d/b.txt", "x")
		ck(409, "DELETE", sb+"/files?path=/workspace/output/d", "")
		ck(204, "DELETE", sb+"/files?path=/workspace/output/a.txt", "")
		ck(204, "DELETE", sb, "")
		ck(409, "POST", sb+"/run", `{"code":"x"}`)
		ck(409, "PUT", sb+"/files?path=/workspace/output/b", "x")
		ck(200, "GET", p+"/usage?from=2026-01-01", "")
		ck(400, "GET", p+"/usage?from=yesterday", "")
		ck(200, "GET", p+"/audit?sandbox_id="+id+"&type=sandbox.created&from=2026-01-01T00:00:00Z", "")
		ck(200, "GET", p+"/images", "")
		ck(400, "POST", p+"/sandbox/create", `{"agent_id":"a","mode":"wasm"}`)
		ck(403, "POST", p+"/sandbox/create", `{"agent_id":"a","config":{"image":"foo:1"}}`)
	}
	// Files: a download, a range, a conditional GET, an unsatisfiable range.
	id := ck(201, "POST", "/api/sandbox/create", `{"agent_id":"files","config":{"filesystem":{"read_write":["/out"]}}}`)["sandbox_id"].(string)
	ck(201, "PUT", "/api/sandbox/"+id+"/files?path=/out/r.json", `{"total": 42}`)
	for _, c := range []struct {
		hdr  []string
		want int
	}{{nil, 200}, {[]string{"Range", "bytes=2-6"}, 206}, {[]string{"Range", "bytes=99-"}, 416}} {
		req, _ := http.NewRequest("GET", f.url+"/api/sandbox/"+id+"/files?path=/out/r.json", nil)
		req.Header.Set("X-AgentCop-Key", f.key)
		for i := 0; i+1 < len(c.hdr); i += 2 {
			req.Header.Set(c.hdr[i], c.hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Fatalf("download %v: %d, want %d", c.hdr, resp.StatusCode, c.want)
		}
		if c.want == 200 {
			req.Header.Set("If-None-Match", resp.Header.Get("ETag"))
			if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != 304 {
				t.Fatalf("conditional download: %v %v", resp, err)
			}
			resp.Body.Close()
		}
	}
	// Service routes without a key, errors outside the handlers.
	for _, c := range []struct {
		path string
		want int
	}{{"/health", 200}, {"/metrics", 200}, {"/api/openapi.json", 200}, {"/api/nothing", 404}} {
		resp, err := http.Get(f.url + c.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Fatalf("%s: %d", c.path, resp.StatusCode)
		}
	}
	ck(401, "GET", "/api/sandbox", "", "X-AgentCop-Key", "sbxk_wrong")
	ck(413, "POST", "/api/sandbox/create", `{"agent_id":"`+strings.Repeat("x", 2<<20)+`"}`)
	if failures, n := check.Failures(); len(failures) > 0 || n-before < 60 {
		t.Fatalf("%d responses checked, %d disagree with api/openapi.json (TestMain lists them)", n-before, len(failures))
	}
}

// events reads a run's event stream to its end.
func events(t *testing.T, f fixture, path string) {
	t.Helper()
	req, _ := http.NewRequest("GET", f.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+f.key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !bytes.Contains(b, []byte("event: end\n")) {
		t.Fatalf("events: %d %s", resp.StatusCode, b)
	}
}
