package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/client/clienttest"
	"github.com/sandboxd/sandboxd/internal/mcpserver"
)

// TestMCPLive: a real MCP client (the SDK's) against a real server with real sandboxes, over the
// two transports: a stdio pipe to a `sandboxd mcp` process, and streamable HTTP to the server's
// /mcp. Each lists the tools, creates a sandbox, runs code, writes and reads files (a PNG comes
// back as image content), sees a failing run as an isError result, and deletes the sandbox.
func TestMCPLive(t *testing.T) {
	srv := clienttest.Start(t, clienttest.Options{Pool: "10.222.0.0/16"}) // TestCLILive's: the tests of a package run one at a time

	// Without a key, `sandboxd mcp` refuses to start and says why.
	cmd := exec.Command(srv.Bin, "mcp", "--url", srv.URL)
	cmd.Env = append(os.Environ(), "SANDBOXD_API_KEY=", "AGENTCOP_API_KEY=")
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(out), "no API key: pass --key or set SANDBOXD_API_KEY") {
		t.Errorf("sandboxd mcp without a key: %v %q", err, out)
	}

	stdio := func(t *testing.T) mcp.Transport {
		cmd := exec.Command(srv.Bin, "mcp")
		cmd.Env = append(os.Environ(), "SANDBOXD_URL="+srv.URL, "SANDBOXD_API_KEY="+srv.Key, "AGENTCOP_API_KEY=")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("sandboxd mcp's stderr:\n%s", stderr.String())
			}
		})
		return &mcp.CommandTransport{Command: cmd}
	}
	streamable := func(t *testing.T) mcp.Transport {
		return &mcp.StreamableClientTransport{Endpoint: srv.URL + "/mcp", MaxRetries: -1,
			HTTPClient: &http.Client{Transport: keyHeader(srv.Key)}}
	}
	for _, tr := range []struct {
		name      string
		transport func(*testing.T) mcp.Transport
	}{{"stdio", stdio}, {"http", streamable}} {
		t.Run(tr.name, func(t *testing.T) {
			ctx := context.Background()
			c := mcp.NewClient(&mcp.Implementation{Name: "sandboxd-live-test", Version: "1"}, nil)
			s, err := c.Connect(ctx, tr.transport(t), nil)
			if err != nil {
				t.Fatalf("connect: %v", err)
			}
			defer s.Close()
			tools, err := s.ListTools(ctx, nil)
			if err != nil || len(tools.Tools) != 10 {
				t.Fatalf("list tools: %v %d", err, len(tools.Tools))
			}
			call := func(tool string, args map[string]any) (*mcp.CallToolResult, map[string]any) {
				t.Helper()
				res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: tool, Arguments: args})
				if err != nil {
					t.Fatalf("%s: %v", tool, err)
				}
				var m map[string]any
				b, _ := json.Marshal(res.StructuredContent)
				_ = json.Unmarshal(b, &m)
				return res, m
			}
			res, sb := call("create_sandbox", map[string]any{"agent_id": "mcp-" + tr.name,
				"filesystem": map[string]any{"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/out"}},
				"resources":  map[string]any{"timeout": 300}})
			id, _ := sb["sandbox_id"].(string)
			if res.IsError || sb["status"] != "ready" || id == "" {
				t.Fatalf("create_sandbox: %s", mcpserver.Text(res))
			}
			defer call("delete_sandbox", map[string]any{"sandbox_id": id})

			res, run := call("run_code", map[string]any{"sandbox_id": id, "code": `print(1); result = {"a": 1}`})
			if res.IsError || run["status"] != "completed" || run["stdout"] != "1\n" || run["exit_code"] != 0.0 {
				t.Fatalf("run_code: %s", mcpserver.Text(res))
			}
			if r, _ := json.Marshal(run["result"]); string(r) != `{"a":1}` || !strings.Contains(mcpserver.Text(res), `result: {"a":1}`) {
				t.Errorf("run_code's result %s, text %q", r, mcpserver.Text(res))
			}

			res, run = call("run_code", map[string]any{"sandbox_id": id, "code": "x = 1\n1/0"})
			e, _ := run["error"].(map[string]any)
			if !res.IsError || run["status"] != "failed" || e["type"] != "ZeroDivisionError" || !strings.Contains(mcpserver.Text(res), "ZeroDivisionError: division by zero") {
				t.Errorf("a failing run: isError %v, %v, text %q", res.IsError, run, mcpserver.Text(res))
			}

			// A code context: state across run_code calls, the real interpreter's.
			res, cx := call("create_context", map[string]any{"sandbox_id": id})
			ctxID, _ := cx["context_id"].(string)
			if res.IsError || ctxID == "" {
				t.Fatalf("create_context: %s", mcpserver.Text(res))
			}
			call("run_code", map[string]any{"sandbox_id": id, "code": "n = 41", "context": ctxID})
			if res, run := call("run_code", map[string]any{"sandbox_id": id, "code": "n += 1\nresult = n", "context": ctxID}); res.IsError || run["result"] != 42.0 {
				t.Errorf("run_code in a context: %s", mcpserver.Text(res))
			}
			if res, cx := call("delete_context", map[string]any{"sandbox_id": id, "context_id": ctxID}); res.IsError || cx["status"] != "deleted" {
				t.Errorf("delete_context: %s", mcpserver.Text(res))
			}

			if res, w := call("write_file", map[string]any{"sandbox_id": id, "path": "/workspace/data/in.csv", "content": "a,b\n1,2\n"}); res.IsError || w["size"] != 8.0 {
				t.Fatalf("write_file: %s", mcpserver.Text(res))
			}
			code := "import struct, zlib\n" +
				"rows = open('/workspace/data/in.csv').read().splitlines()\n" +
				"def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))\n" +
				"raw = b''.join(b'\\x00' + b'\\xff\\x00\\x00' * 4 for _ in range(4))\n" +
				"png = b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 4, 4, 8, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b'')\n" +
				"open('/workspace/out/red.png', 'wb').write(png)\n" +
				"open('/workspace/out/rows.txt', 'w').write(str(len(rows)))\n"
			if res, run := call("run_code", map[string]any{"sandbox_id": id, "code": code}); res.IsError {
				t.Fatalf("run_code writing files: %s %v", mcpserver.Text(res), run)
			}
			if res, f := call("read_file", map[string]any{"sandbox_id": id, "path": "/workspace/out/rows.txt"}); res.IsError || f["content"] != "2" || f["encoding"] != "utf-8" {
				t.Errorf("read_file rows.txt: %s %v", mcpserver.Text(res), f)
			}
			res, f := call("read_file", map[string]any{"sandbox_id": id, "path": "/workspace/out/red.png"})
			png, _ := base64.StdEncoding.DecodeString(f["content"].(string))
			var img *mcp.ImageContent
			for _, c := range res.Content {
				if ic, ok := c.(*mcp.ImageContent); ok {
					img = ic
				}
			}
			if res.IsError || f["mime_type"] != "image/png" || img == nil || img.MIMEType != "image/png" || !bytes.Equal(img.Data, png) || !bytes.HasPrefix(png, []byte("\x89PNG")) {
				t.Errorf("read_file red.png: %s %v, image %v", mcpserver.Text(res), f["mime_type"], img != nil)
			}
			if res, ls := call("list_files", map[string]any{"sandbox_id": id, "path": "/workspace/out"}); res.IsError || len(ls["entries"].([]any)) != 2 {
				t.Errorf("list_files: %s", mcpserver.Text(res))
			}

			if res, sb := call("delete_sandbox", map[string]any{"sandbox_id": id}); res.IsError || sb["status"] != "destroyed" {
				t.Errorf("delete_sandbox: %s", mcpserver.Text(res))
			}
			if res, _ := call("get_sandbox", map[string]any{"sandbox_id": id}); res.IsError || !strings.Contains(mcpserver.Text(res), `"destroyed"`) {
				t.Errorf("get_sandbox after delete: %s", mcpserver.Text(res))
			}
		})
	}

	// /mcp of the real server: no key, no MCP.
	resp, err := http.Post(srv.URL+"/mcp", "application/json", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("/mcp without a key: %d", resp.StatusCode)
	}
}

// keyHeader is an http.RoundTripper that sends an API key with every request.
type keyHeader string

func (k keyHeader) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("X-AgentCop-Key", string(k))
	return http.DefaultTransport.RoundTrip(r)
}
