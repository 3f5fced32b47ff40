package httpapi_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/mcpserver"
)

// plainClient sends requests the OpenAPI checker of TestMain must not see (MCP is not in the
// document).
var plainClient = &http.Client{Transport: http.DefaultTransport}

// headerTransport adds a header to every request.
type headerTransport struct{ name, value string }

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.name, h.value)
	return http.DefaultTransport.RoundTrip(r)
}

// connect opens an MCP session with the SDK's client over streamable HTTP, sending the key in
// header name ("X-AgentCop-Key" or "Authorization" as a bearer token).
func connect(t *testing.T, url, name, key string) *mcp.ClientSession {
	t.Helper()
	value := key
	if name == "Authorization" {
		value = "Bearer " + key
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "sandboxd-test", Version: "1"}, nil)
	s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: url + httpapi.MCPPath,
		HTTPClient: &http.Client{Transport: headerTransport{name, value}}, MaxRetries: -1}, nil)
	if err != nil {
		t.Fatalf("connect to %s: %v", url, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// call calls a tool and returns its result and structured content (decoded into a map).
func callTool(t *testing.T, s *mcp.ClientSession, tool string, args map[string]any) (*mcp.CallToolResult, map[string]any) {
	t.Helper()
	res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: tool, Arguments: args})
	if err != nil {
		t.Fatalf("%s: protocol error: %v", tool, err)
	}
	var m map[string]any
	if res.StructuredContent != nil {
		b, _ := json.Marshal(res.StructuredContent)
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s: structured content %s: %v", tool, b, err)
		}
	}
	return res, m
}

// TestMCPOverHTTP drives every tool over /mcp with the SDK's client: the fake driver's runs echo
// their code on stdout with result 42, and the code "fail" raises ZeroDivisionError.
func TestMCPOverHTTP(t *testing.T) {
	srv := setup(t, httpapi.Options{})
	s := connect(t, srv.url, "X-AgentCop-Key", srv.key)

	tools, err := s.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tool := range tools.Tools {
		names = append(names, tool.Name)
		if tool.InputSchema == nil || tool.OutputSchema == nil || tool.Description == "" {
			t.Errorf("tool %s: input schema %v, output schema %v, description %q", tool.Name, tool.InputSchema != nil, tool.OutputSchema != nil, tool.Description)
		}
	}
	slices.Sort(names)
	want := []string{"create_context", "create_sandbox", "delete_context", "delete_sandbox", "get_sandbox", "list_files", "list_sandboxes",
		"read_file", "run_code", "write_file"}
	if !slices.Equal(names, want) {
		t.Fatalf("tools %v, want %v", names, want)
	}

	res, sb := callTool(t, s, "create_sandbox", map[string]any{"agent_id": "mcp-test",
		"filesystem": map[string]any{"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/output"}},
		"resources":  map[string]any{"cpu": "0.5", "memory": "256m", "timeout": 600}})
	if res.IsError || sb["status"] != "ready" || !strings.HasPrefix(sb["sandbox_id"].(string), "sbx_") {
		t.Fatalf("create_sandbox: %s %v", mcpserver.Text(res), sb)
	}
	id := sb["sandbox_id"].(string)
	if cfg := sb["config"].(map[string]any); cfg["resources"].(map[string]any)["memory"] != "256m" {
		t.Errorf("create_sandbox: config %v", cfg)
	}

	code := "print(1); result = {\"a\": 1}"
	res, run := callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": code, "timeout": 10, "env": map[string]string{"A": "1"}})
	if res.IsError || run["status"] != "completed" || run["stdout"] != code || run["result"] != 42.0 || run["exit_code"] != 0.0 {
		t.Fatalf("run_code: %s %v", mcpserver.Text(res), run)
	}
	if !strings.Contains(mcpserver.Text(res), "completed") || !strings.Contains(mcpserver.Text(res), "result: 42") {
		t.Errorf("run_code's text: %q", mcpserver.Text(res))
	}

	res, run = callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": "fail"})
	if !res.IsError || run["status"] != "failed" || run["error"].(map[string]any)["type"] != "ZeroDivisionError" {
		t.Fatalf("a failing run_code: isError %v %v", res.IsError, run)
	}
	if !strings.Contains(mcpserver.Text(res), "ZeroDivisionError: division by zero") {
		t.Errorf("a failing run's text: %q", mcpserver.Text(res))
	}

	// Rich results: the display in the text, the outputs in the structured content, a PNG as image content.
	fig := "\x89PNG\r\n\x1a\nfake"
	rich := `rich:{"display": "2", "outputs": [{"type": "image/png", "kind": "figure", "data": "` + base64.StdEncoding.EncodeToString([]byte(fig)) + `"}]}`
	res, run = callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": rich})
	if outs, _ := run["outputs"].([]any); res.IsError || run["display"] != "2" || len(outs) != 1 || !strings.Contains(mcpserver.Text(res), "display: 2") {
		t.Fatalf("rich run_code: %s %v", mcpserver.Text(res), run)
	}
	if len(res.Content) != 2 {
		t.Fatalf("rich run_code: %d contents", len(res.Content))
	}
	if img, ok := res.Content[1].(*mcp.ImageContent); !ok || img.MIMEType != "image/png" || string(img.Data) != fig {
		t.Errorf("rich run_code: image content %#v", res.Content[1])
	}

	// A code context: the fake driver's result is the number of runs its interpreter has run.
	res, cx := callTool(t, s, "create_context", map[string]any{"sandbox_id": id})
	if res.IsError || cx["status"] != "ready" || !strings.HasPrefix(cx["context_id"].(string), "ctx_") {
		t.Fatalf("create_context: %s %v", mcpserver.Text(res), cx)
	}
	for want := 1.0; want <= 2; want++ {
		res, run = callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": "x", "context": cx["context_id"]})
		if res.IsError || run["status"] != "completed" || run["result"] != want {
			t.Fatalf("run_code in a context, run %v: %s %v", want, mcpserver.Text(res), run)
		}
	}
	res, cx = callTool(t, s, "delete_context", map[string]any{"sandbox_id": id, "context_id": cx["context_id"]})
	if res.IsError || cx["status"] != "deleted" {
		t.Fatalf("delete_context: %s %v", mcpserver.Text(res), cx)
	}

	png := append([]byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), bytes.Repeat([]byte{0}, 20)...)
	files := []struct {
		path, content, encoding string
		want                    []byte
		wantEncoding            string
	}{
		{"/workspace/output/a.txt", "héllo\n", "", []byte("héllo\n"), "utf-8"},
		{"/workspace/data/b.bin", base64.StdEncoding.EncodeToString([]byte{0xff, 0, 0xfe}), "base64", []byte{0xff, 0, 0xfe}, "base64"},
		{"/workspace/output/plot.png", base64.StdEncoding.EncodeToString(png), "base64", png, "base64"},
		{"/workspace/output/empty", "", "utf-8", []byte{}, "utf-8"},
	}
	for _, f := range files {
		args := map[string]any{"sandbox_id": id, "path": f.path, "content": f.content}
		if f.encoding != "" {
			args["encoding"] = f.encoding
		}
		res, w := callTool(t, s, "write_file", args)
		if res.IsError || w["size"] != float64(len(f.want)) || len(w["sha256"].(string)) != 64 {
			t.Fatalf("write_file %s: %s %v", f.path, mcpserver.Text(res), w)
		}
		res, r := callTool(t, s, "read_file", map[string]any{"sandbox_id": id, "path": f.path})
		if res.IsError {
			t.Fatalf("read_file %s: %s", f.path, mcpserver.Text(res))
		}
		got := []byte(r["content"].(string))
		if r["encoding"] == "base64" {
			got, _ = base64.StdEncoding.DecodeString(r["content"].(string))
		}
		if r["encoding"] != f.wantEncoding || !bytes.Equal(got, f.want) || r["sha256"] != w["sha256"] || r["truncated"] != false {
			t.Errorf("read_file %s: %v", f.path, r)
		}
		var img *mcp.ImageContent
		for _, c := range res.Content {
			if ic, ok := c.(*mcp.ImageContent); ok {
				img = ic
			}
		}
		if isPNG := strings.HasSuffix(f.path, ".png"); isPNG != (img != nil) || isPNG && (img.MIMEType != "image/png" || !bytes.Equal(img.Data, png)) {
			t.Errorf("read_file %s: image content %+v", f.path, img)
		}
	}
	res, r := callTool(t, s, "read_file", map[string]any{"sandbox_id": id, "path": "/workspace/output/a.txt", "offset": 1})
	if res.IsError || r["content"] != "éllo\n" || r["total_size"] != 7.0 || r["offset"] != 1.0 {
		t.Errorf("read_file from offset 1: %s %v", mcpserver.Text(res), r)
	}

	res, ls := callTool(t, s, "list_files", map[string]any{"sandbox_id": id, "path": "/workspace/output"})
	var entries []string
	for _, e := range ls["entries"].([]any) {
		entries = append(entries, e.(map[string]any)["name"].(string))
	}
	slices.Sort(entries)
	if res.IsError || !slices.Equal(entries, []string{"a.txt", "empty", "plot.png"}) {
		t.Errorf("list_files: %s %v", mcpserver.Text(res), ls)
	}

	res, list := callTool(t, s, "list_sandboxes", map[string]any{"agent_id": "mcp-test"})
	if res.IsError || list["total"] != 1.0 || list["sandboxes"].([]any)[0].(map[string]any)["sandbox_id"] != id {
		t.Errorf("list_sandboxes: %s %v", mcpserver.Text(res), list)
	}
	res, got := callTool(t, s, "get_sandbox", map[string]any{"sandbox_id": id})
	if res.IsError || got["runs"].(map[string]any)["total"] != 5.0 { // three fresh runs, two in the context
		t.Errorf("get_sandbox: %s %v", mcpserver.Text(res), got)
	}

	// The tools act as the caller's key: another account sees nothing of it, over the same /mcp.
	o := connect(t, srv.url, "Authorization", srv.otherKey)
	if res, _ := callTool(t, o, "get_sandbox", map[string]any{"sandbox_id": id}); !res.IsError || !strings.HasPrefix(mcpserver.Text(res), "not_found: ") {
		t.Errorf("get_sandbox of another account's sandbox: %v %q", res.IsError, mcpserver.Text(res))
	}
	if res, list := callTool(t, o, "list_sandboxes", nil); res.IsError || list["total"] != 0.0 {
		t.Errorf("list_sandboxes of the other account: %s %v", mcpserver.Text(res), list)
	}

	// What the tools did is the REST API's: audited for the account.
	req, _ := http.NewRequest("GET", srv.url+"/api/audit?sandbox_id="+id+"&type=file.written", nil)
	req.Header.Set("X-AgentCop-Key", srv.key)
	resp, err := plainClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var events api.EventList
	json.NewDecoder(resp.Body).Decode(&events)
	resp.Body.Close()
	if events.Total != len(files) {
		t.Errorf("audit: %d file.written events, want %d", events.Total, len(files))
	}

	res, del := callTool(t, s, "delete_sandbox", map[string]any{"sandbox_id": id})
	if res.IsError || del["status"] != "destroyed" || del["destroy_reason"] != "deleted" {
		t.Errorf("delete_sandbox: %s %v", mcpserver.Text(res), del)
	}
	if res, _ := callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": "1"}); !res.IsError || !strings.HasPrefix(mcpserver.Text(res), "sandbox_destroyed: ") {
		t.Errorf("run_code on a destroyed sandbox: %q", mcpserver.Text(res))
	}
}

// TestMCPHostileArguments: a tool's arguments are untrusted JSON; every bad one is an isError
// result saying what is wrong (the API's code and message where the API decides), never a
// protocol error, and the session goes on.
func TestMCPHostileArguments(t *testing.T) {
	srv := setup(t, httpapi.Options{})
	s := connect(t, srv.url, "X-AgentCop-Key", srv.key)
	_, sb := callTool(t, s, "create_sandbox", map[string]any{"agent_id": "hostile", "filesystem": map[string]any{"read_write": []string{"/out"}}})
	id := sb["sandbox_id"].(string)
	big := strings.Repeat("x", mcpserver.MaxFileBytes+1)
	cases := []struct {
		tool string
		args map[string]any
		want string // the start of the result's text
	}{
		{"create_sandbox", map[string]any{"agent_id": "a b"}, "invalid_request: "},
		{"create_sandbox", map[string]any{"agent_id": "a", "mode": "vm"}, "invalid_request: "},
		{"create_sandbox", map[string]any{"agent_id": "a", "image": "evil:latest"}, "image_not_approved: "},
		{"create_sandbox", map[string]any{"agent_id": "a", "filesystem": map[string]any{"read_write": []string{"/a/../etc"}}}, "invalid_request: "},
		{"create_sandbox", map[string]any{"agent_id": "a", "resources": map[string]any{"memory": "1t"}}, "invalid_request: "},
		{"create_sandbox", map[string]any{"agent_id": "a", "unknown": 1}, "validating \"arguments\""},
		{"create_sandbox", map[string]any{}, "validating \"arguments\""},
		{"run_code", map[string]any{"sandbox_id": id, "code": 7}, "validating \"arguments\""},
		{"run_code", map[string]any{"sandbox_id": "", "code": "1"}, "invalid_request: sandbox_id is required"},
		{"run_code", map[string]any{"sandbox_id": "../health", "code": "1"}, "not_found: "},
		{"run_code", map[string]any{"sandbox_id": id, "code": strings.Repeat("#", 1<<20+1)}, "invalid_request: code is 1048577 bytes"},
		{"run_code", map[string]any{"sandbox_id": id, "code": "1", "timeout": 601}, "invalid_request: timeout"},
		{"run_code", map[string]any{"sandbox_id": id, "code": "1", "env": map[string]string{"A=B": "1"}}, "invalid_request: env"},
		{"run_code", map[string]any{"sandbox_id": id, "code": "1", "context": "ctx_x"}, "not_found: no context"},
		{"read_file", map[string]any{"sandbox_id": id, "path": "/etc/passwd"}, "path_not_allowed: "},
		{"read_file", map[string]any{"sandbox_id": id, "path": "/out/../etc/passwd"}, "path_not_allowed: "},
		{"read_file", map[string]any{"sandbox_id": id, "path": "/out/missing"}, "not_found: "},
		{"read_file", map[string]any{"sandbox_id": id, "path": "/out"}, "invalid_request: /out is a directory"},
		{"read_file", map[string]any{"sandbox_id": id, "path": "/out/x", "offset": -1}, "invalid_request: offset"},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/out/x", "content": "%%%", "encoding": "base64"}, "invalid_request: content is not valid base64"},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/out/x", "content": "x", "encoding": "utf-16"}, "invalid_request: encoding"},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/out/x", "content": big}, "payload_too_large: "},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/out/x", "content": base64.StdEncoding.EncodeToString([]byte(big)), "encoding": "base64"}, "payload_too_large: "},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/tmp/x", "content": "x"}, "path_not_allowed: "},
		{"write_file", map[string]any{"sandbox_id": id, "path": "/out/a\x00b", "content": "x"}, "path_not_allowed: "},
		{"list_files", map[string]any{"sandbox_id": id, "path": "/"}, "path_not_allowed: "},
		{"list_sandboxes", map[string]any{"limit": 501}, "invalid_request: limit"},
		{"delete_context", map[string]any{"sandbox_id": id, "context_id": ""}, "invalid_request: context_id is required"},
		{"delete_sandbox", map[string]any{"sandbox_id": "sbx_nope"}, "not_found: "},
		{"no_such_tool", map[string]any{}, ""},
	}
	for _, c := range cases {
		res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: c.tool, Arguments: c.args})
		if c.tool == "no_such_tool" {
			if err == nil {
				t.Errorf("an unknown tool: no error")
			}
			continue
		}
		if err != nil {
			t.Errorf("%s %.200v: protocol error %v", c.tool, c.args, err)
			continue
		}
		if !res.IsError || !strings.HasPrefix(mcpserver.Text(res), c.want) {
			t.Errorf("%s %.200v: isError %v, text %.300q; want it to start %q", c.tool, c.args, res.IsError, mcpserver.Text(res), c.want)
		}
	}
	// The session still works.
	if res, run := callTool(t, s, "run_code", map[string]any{"sandbox_id": id, "code": "ok"}); res.IsError || run["status"] != "completed" {
		t.Errorf("run_code after the bad calls: %s", mcpserver.Text(res))
	}
}

// TestMCPAuth: /mcp needs an API key before MCP sees the request: none or an unknown one is 401
// in the API's envelope; the key goes as X-AgentCop-Key or Authorization: Bearer.
func TestMCPAuth(t *testing.T) {
	srv := setup(t, httpapi.Options{})
	initialize := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}`
	for _, c := range []struct {
		name, header, value string
		want                int
	}{
		{"no key", "", "", 401},
		{"unknown key", "X-AgentCop-Key", "sk_nope", 401},
		{"unknown bearer", "Authorization", "Bearer sk_nope", 401},
		{"key", "X-AgentCop-Key", srv.key, 200},
		{"bearer", "Authorization", "Bearer " + srv.key, 200},
	} {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest("POST", srv.url+httpapi.MCPPath, strings.NewReader(initialize))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept", "application/json, text/event-stream")
			if c.header != "" {
				req.Header.Set(c.header, c.value)
			}
			resp, err := plainClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Fatalf("%d %s", resp.StatusCode, b)
			}
			if c.want == 401 {
				var env api.Error
				if err := json.Unmarshal(b, &env); err != nil || env.Error != "unauthorized" || env.Code != 401 || env.Docs == "" {
					t.Errorf("401 body %s", b)
				}
			} else if !strings.Contains(string(b), `"serverInfo"`) {
				t.Errorf("initialize answered %s", b)
			}
		})
	}
	// The SDK's client without a key fails to connect, saying 401.
	c := mcp.NewClient(&mcp.Implementation{Name: "t", Version: "1"}, nil)
	if _, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: srv.url + httpapi.MCPPath, MaxRetries: -1, HTTPClient: plainClient}, nil); err == nil || !strings.Contains(err.Error(), "Unauthorized") && !strings.Contains(err.Error(), "401") {
		t.Errorf("connect without a key: %v", err)
	}
}

// TestMCPRateLimited: /mcp requests and the API calls its tools make count against the key's
// rate limit, as REST requests do.
func TestMCPRateLimited(t *testing.T) {
	// Connecting costs 1 request; a tool call 2: its POST to /mcp and list_sandboxes's GET
	// /api/sandbox, made in-process. A burst of 8 leaves 7 after connecting: calls 0-2 are
	// served, call 3's POST takes the last token and its in-process call is refused, call 4's
	// POST is refused (had the in-process calls not been counted, 7 calls would have been served).
	srv := setup(t, httpapi.Options{RatePerSec: 0.001, RateBurst: 8})
	s := connect(t, srv.url, "X-AgentCop-Key", srv.key)
	for i := 0; i <= 4; i++ {
		res, err := s.CallTool(context.Background(), &mcp.CallToolParams{Name: "list_sandboxes", Arguments: map[string]any{}})
		switch {
		case i < 3:
			if err != nil || res.IsError {
				t.Fatalf("call %d within the burst: %v %v", i, err, res)
			}
		case i == 3: // the POST is served, the in-process call refused
			if err != nil || !res.IsError || !strings.HasPrefix(mcpserver.Text(res), "rate_limited: ") {
				t.Fatalf("call %d: want the in-process call refused: %v %v", i, err, res)
			}
		case i == 4: // the POST itself is refused
			if err == nil || !strings.Contains(err.Error(), "Too Many Requests") && !strings.Contains(err.Error(), "429") {
				t.Fatalf("call %d: want the POST refused: %v %v", i, err, res)
			}
		}
	}
}

// TestMCPReadFileInPieces: read_file returns at most MaxFileBytes, says more follows, and reads
// the rest from an offset.
func TestMCPReadFileInPieces(t *testing.T) {
	srv := setup(t, httpapi.Options{})
	s := connect(t, srv.url, "X-AgentCop-Key", srv.key)
	_, sb := callTool(t, s, "create_sandbox", map[string]any{"agent_id": "big", "filesystem": map[string]any{"read_write": []string{"/out"}}})
	id := sb["sandbox_id"].(string)
	data := bytes.Repeat([]byte("0123456789abcdef"), (mcpserver.MaxFileBytes+1<<20)/16)
	req, _ := http.NewRequest("PUT", srv.url+"/api/sandbox/"+id+"/files?path=/out/big.txt", bytes.NewReader(data))
	req.Header.Set("X-AgentCop-Key", srv.key)
	resp, err := plainClient.Do(req)
	if err != nil || resp.StatusCode != 201 {
		t.Fatalf("upload: %v %v", err, resp)
	}
	resp.Body.Close()
	var got []byte
	for _, want := range []struct {
		offset, size int
		truncated    bool
	}{{0, mcpserver.MaxFileBytes, true}, {mcpserver.MaxFileBytes, 1 << 20, false}} {
		res, f := callTool(t, s, "read_file", map[string]any{"sandbox_id": id, "path": "/out/big.txt", "offset": want.offset})
		if res.IsError || f["size"] != float64(want.size) || f["truncated"] != want.truncated || f["total_size"] != float64(len(data)) || f["sha256"] != nil {
			t.Fatalf("read_file at %d: %.300s %v %v %v %v", want.offset, mcpserver.Text(res), f["size"], f["truncated"], f["total_size"], f["sha256"])
		}
		if want.truncated && !strings.HasPrefix(mcpserver.Text(res), fmt.Sprintf("/out/big.txt: %d bytes from 0 of %d (text/plain; charset=utf-8); more follows: read again with offset %d:\n0123", want.size, len(data), want.size)) {
			t.Errorf("read_file's text: %.100s", mcpserver.Text(res))
		}
		got = append(got, f["content"].(string)...)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("read in pieces: %d bytes, not the file's %d", len(got), len(data))
	}
}
