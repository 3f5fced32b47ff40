package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"sync"

	mcpsdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/client"
	"github.com/sandboxd/sandboxd/internal/mcpserver"
	"github.com/sandboxd/sandboxd/internal/store"
)

// MCPPath is where the Model Context Protocol is served (streamable HTTP). It is a route of the
// route table but no operation of api/openapi.json: its one endpoint speaks JSON-RPC, described
// by the MCP specification, not by the document.
const MCPPath = "/mcp"

// mcp serves MCP at /mcp, after handle has authenticated the caller and counted the request
// against its key's rate limit (no key: 401 in the API's envelope, before MCP sees the request).
//
// The transport is stateless: no session ID is issued or read, and each request is served on
// its own with the tools' client in its context (clientOf), which carries that request's key. So
// nothing of one caller is kept for, or reachable by, another. The client sends its requests
// through inProcess to this very handler: a tool call is served exactly as the same REST calls
// would be (validation, quotas, rate limits, audit, error messages).
func (s *server) mcp(w http.ResponseWriter, r *http.Request, _ store.Account) error {
	c := &client.Client{BaseURL: "http://sandboxd", APIKey: keyOf(r), UserAgent: "sandboxd-mcp",
		HTTPClient: &http.Client{Transport: &inProcess{handler: s.api, remoteAddr: r.RemoteAddr, log: s.log}}}
	s.mcpHandler.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), mcpClientKey{}, c)))
	return nil
}

type mcpClientKey struct{}

// clientOf is the ClientFunc of /mcp's tools: the client mcp put in the request's context.
func clientOf(ctx context.Context, _ *mcpsdk.CallToolRequest) (*client.Client, error) {
	c, ok := ctx.Value(mcpClientKey{}).(*client.Client)
	if !ok {
		return nil, errors.New("internal error: the MCP request carries no client")
	}
	return c, nil
}

// newMCPHandler returns the streamable HTTP handler of /mcp: one server for every request
// (building one costs ~1.4 ms of CPU: the SDK re-encodes each tool's schemas).
func newMCPHandler(version string, log *slog.Logger) http.Handler {
	srv := mcpserver.New(clientOf, mcpserver.Options{Version: version, Logger: log})
	return mcpsdk.NewStreamableHTTPHandler(func(*http.Request) *mcpsdk.Server { return srv }, &mcpsdk.StreamableHTTPOptions{
		Stateless:           true,
		Logger:              log,
		MaxRequestBodyBytes: mcpserver.MaxMessageBytes,
		// The SDK refuses requests that reach a loopback listener under another Host name, a
		// defence against DNS rebinding for servers without authentication. Every request here
		// carries an API key a rebinding page cannot know, and a reverse proxy on the same host
		// forwards its own Host name: the check would refuse it and protect nothing.
		DisableLocalhostProtection: true,
		// A tool call ends with its HTTP request (protocol versions where the POST is the whole
		// call): its API calls stop, and create_sandbox deletes a sandbox it made (abandon).
		PropagateRequestCancellation: true,
	})
}

// inProcess is an http.RoundTripper that serves a request with handler in this process: the
// client's request becomes a server request (RemoteAddr: the MCP caller's), the handler runs in
// a goroutine of its own, and the response streams back through a pipe as it is written, so a
// reader that stops early (read_file's limit) stops the handler's writes. A handler that panics
// ends the exchange with an error wrapping mcpserver.ErrInternal (its value and stack logged, not
// passed on), as net/http's server would drop the connection; a caller that
// gives up (its context) before the answer gets the context's error and the handler's writes fail.
type inProcess struct {
	handler    http.Handler
	remoteAddr string
	log        *slog.Logger
}

func (t *inProcess) RoundTrip(req *http.Request) (*http.Response, error) {
	sreq := req.Clone(req.Context())
	sreq.URL = &url.URL{Path: req.URL.Path, RawPath: req.URL.RawPath, RawQuery: req.URL.RawQuery}
	sreq.RequestURI = sreq.URL.RequestURI()
	sreq.Host = req.URL.Host
	sreq.RemoteAddr = t.remoteAddr
	sreq.Header.Del("Expect") // no 100-continue between two halves of one process
	if sreq.Body == nil {
		sreq.Body = http.NoBody
	}
	pr, pw := io.Pipe()
	rw := &pipeResponse{header: http.Header{}, pw: pw, ready: make(chan struct{}),
		resp: &http.Response{Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Request: req, Body: pr, ContentLength: -1}}
	panicked := make(chan error, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				t.log.Error("in-process request: the handler panicked", "method", req.Method, "path", req.URL.Path,
					"panic", p, "stack", string(debug.Stack()))
				err := fmt.Errorf("in-process %s %s: %w", req.Method, req.URL.Path, mcpserver.ErrInternal)
				pw.CloseWithError(err)
				panicked <- err
			} else {
				rw.WriteHeader(http.StatusOK) // a handler that wrote nothing answered 200, empty
				_ = pw.Close()
			}
			if req.Body != nil {
				_ = req.Body.Close()
			}
		}()
		t.handler.ServeHTTP(rw, sreq)
	}()
	select {
	case <-rw.ready:
		return rw.resp, nil
	case err := <-panicked: // before it answered: no answer, as a server that dropped the connection
		return nil, err
	case <-req.Context().Done(): // the handler has not answered yet: its writes will fail
		err := req.Context().Err()
		_ = pr.CloseWithError(err)
		return nil, err
	}
}

// pipeResponse is the handler's side of an inProcess response.
type pipeResponse struct {
	header http.Header
	pw     *io.PipeWriter
	resp   *http.Response
	once   sync.Once
	ready  chan struct{} // closed once the status and header are set
}

func (p *pipeResponse) Header() http.Header { return p.header }

func (p *pipeResponse) WriteHeader(code int) {
	if code >= 100 && code < 200 {
		return // informational answers are not the response
	}
	p.once.Do(func() {
		p.resp.StatusCode, p.resp.Status = code, fmt.Sprintf("%d %s", code, http.StatusText(code))
		p.resp.Header = p.header.Clone()
		if n, err := strconv.ParseInt(p.resp.Header.Get("Content-Length"), 10, 64); err == nil && n >= 0 {
			p.resp.ContentLength = n
		}
		close(p.ready)
	})
}

func (p *pipeResponse) Write(b []byte) (int, error) {
	p.WriteHeader(http.StatusOK)
	return p.pw.Write(b)
}

// Flush lets handlers that flush (event streams, refused uploads) do so: every Write is already
// handed over as it is made.
func (p *pipeResponse) Flush() {}
