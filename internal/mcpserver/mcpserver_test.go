package mcpserver_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/client"
	"github.com/sandboxd/sandboxd/internal/mcpserver"
)

// TestToolErrors: what a tool says when the API cannot be reached, has no key, refuses with a
// Retry-After, or answers with something that is no envelope — and a panic in a tool is a result,
// not a crash. The server is connected to the SDK's client in memory (as `sandboxd mcp` is, over
// stdio).
func TestToolErrors(t *testing.T) {
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "7")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"error":"rate_limited","message":"too many requests for this API key: slow down","code":429}`))
	}))
	defer busy.Close()
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "upstream gone", http.StatusBadGateway)
	}))
	defer proxy.Close()
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	for _, c := range []struct {
		name   string
		client *client.Client // nil: the ClientFunc panics
		want   string
	}{
		{"down", &client.Client{BaseURL: down.URL, APIKey: "k"}, "unavailable: cannot reach sandboxd at " + down.URL + ": dial tcp"},
		{"no key", &client.Client{BaseURL: busy.URL}, "no API key: start `sandboxd mcp` with --key or SANDBOXD_API_KEY set"},
		{"busy", &client.Client{BaseURL: busy.URL, APIKey: "k"}, "rate_limited: too many requests for this API key: slow down (retry in 7s)"},
		{"proxy", &client.Client{BaseURL: proxy.URL, APIKey: "k"}, "http_502: upstream gone"},
		{"panic", nil, "internal error in tool get_sandbox"},
		// /mcp's in-process transport: a handler that panicked is no server to look for (--url)
		{"in-process panic", &client.Client{BaseURL: "http://sandboxd", APIKey: "k", HTTPClient: &http.Client{Transport: roundTripFunc(
			func(r *http.Request) (*http.Response, error) {
				return nil, fmt.Errorf("in-process %s %s: %w", r.Method, r.URL.Path, mcpserver.ErrInternal)
			})}}, "internal error"},
	} {
		t.Run(c.name, func(t *testing.T) {
			res := callInMemory(t, func(context.Context, *mcp.CallToolRequest) (*client.Client, error) {
				if c.client == nil {
					panic("no client")
				}
				return c.client, nil
			}, "get_sandbox", map[string]any{"sandbox_id": "sbx_1"})
			if text := mcpserver.Text(res); !res.IsError || !strings.HasPrefix(text, c.want) ||
				(strings.HasPrefix(c.name, "panic") || strings.HasPrefix(c.name, "in-process")) && text != c.want {
				t.Errorf("isError %v, %q; want it to start %q", res.IsError, mcpserver.Text(res), c.want)
			}
		})
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestCreateSandboxAbandoned: a sandbox created but not seen ready for a reason other than its
// failure is deleted (the caller never learns its id); when that delete fails the result names
// it; a failed or destroyed one is left to its record.
func TestCreateSandboxAbandoned(t *testing.T) {
	for _, c := range []struct {
		name        string
		get, delete int    // the API's statuses for GET and DELETE of the sandbox
		getBody     string // with 200
		want        string // the tool's text
		deleted     bool
	}{
		{"the wait failed", 503, 204, "", "unavailable: try later", true},
		{"the delete failed too", 503, 503, "",
			"unavailable: try later; sandbox sbx_1 was created and could not be deleted (unavailable: try later): delete it with delete_sandbox", true},
		{"provisioning failed", 200, 204, `{"sandbox_id": "sbx_1", "status": "error"}`, "provisioning_failed: provisioning failed", false},
		{"destroyed meanwhile", 200, 204, `{"sandbox_id": "sbx_1", "status": "destroyed"}`, "sandbox_destroyed: ", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			deletes := make(chan string, 2)
			api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				status, body := 0, ""
				switch {
				case r.Method == "POST" && r.URL.Path == "/api/sandbox/create":
					status, body = 202, `{"sandbox_id": "sbx_1", "status": "provisioning"}`
				case r.Method == "GET" && r.URL.Path == "/api/sandbox/sbx_1":
					status, body = c.get, c.getBody
				case r.Method == "DELETE" && r.URL.Path == "/api/sandbox/sbx_1":
					deletes <- r.URL.Path
					status = c.delete
				default:
					status = 404
				}
				if status >= 400 {
					body = fmt.Sprintf(`{"error": "unavailable", "message": "try later", "code": %d}`, status)
				}
				w.WriteHeader(status)
				_, _ = w.Write([]byte(body))
			}))
			defer api.Close()
			res := callInMemory(t, func(context.Context, *mcp.CallToolRequest) (*client.Client, error) {
				return &client.Client{BaseURL: api.URL, APIKey: "k"}, nil
			}, "create_sandbox", map[string]any{"agent_id": "a"})
			if text := mcpserver.Text(res); !res.IsError || !strings.HasPrefix(text, c.want) {
				t.Errorf("isError %v, %q; want it to start %q", res.IsError, text, c.want)
			}
			if got := len(deletes) > 0; got != c.deleted {
				t.Errorf("deleted: %v, want %v", got, c.deleted)
			}
		})
	}
}

// callInMemory calls tool on a server whose tools use the client clientFor returns, connected to
// the SDK's client in memory (as `sandboxd mcp` is, over stdio); a panic is logged nowhere.
func callInMemory(t *testing.T, clientFor mcpserver.ClientFunc, tool string, args map[string]any) *mcp.CallToolResult {
	t.Helper()
	srv := mcpserver.New(clientFor, mcpserver.Options{Logger: slog.New(slog.DiscardHandler)})
	st, ct := mcp.NewInMemoryTransports()
	ctx := context.Background()
	ss, err := srv.Connect(ctx, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Close()
	cs, err := mcp.NewClient(&mcp.Implementation{Name: "t", Version: "1"}, nil).Connect(ctx, ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: tool, Arguments: args})
	if err != nil {
		t.Fatal(err)
	}
	return res
}
