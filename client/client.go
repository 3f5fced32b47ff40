// Package client is the Go client of the Sandbox API served by sandboxd: sandboxes, runs (with
// their live output), files, usage, audit and images. It speaks the wire types of package api, so
// it cannot drift from the server.
//
//	c := client.New("", "") // SANDBOXD_URL (default http://127.0.0.1:8080); AGENTCOP_API_KEY or SANDBOXD_API_KEY
//	sb, err := c.Create(ctx, api.CreateSandboxRequest{AgentID: "report-bot"})
//	run, err := c.Run(ctx, sb.SandboxID, api.RunRequest{Code: client.Code("result = 6*7")})
//
// Every method takes a context first; cancelling it aborts the request (a run the server already
// started keeps running: cancel it with CancelRun). Failures the server reports are *Error values
// carrying the API's error code (see the Code… constants, ErrorCode and IsCode); requests that got
// no answer are *TransportError; transfers whose bytes do not match the server's SHA-256 are
// *ChecksumError. A Client is safe for concurrent use.
//
// Package clienttest starts a real sandboxd for tests of clients.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

// DefaultURL is the server address used when neither the caller nor SANDBOXD_URL names one.
const DefaultURL = "http://127.0.0.1:8080"

// Environment variables read by New.
const (
	EnvURL       = "SANDBOXD_URL"
	EnvVendorKey = "AGENTCOP_API_KEY" // the vendor's name: read first, as clients of the vendor's API set it
	EnvKey       = "SANDBOXD_API_KEY" // read when AGENTCOP_API_KEY is unset
)

// Client is a client of one sandboxd server. The zero value is not usable: call New.
type Client struct {
	// BaseURL is the server's root, without a trailing slash (e.g. http://127.0.0.1:8080).
	BaseURL string
	// APIKey is sent as X-AgentCop-Key on every request but Health.
	APIKey string
	// HTTPClient sends the requests. It should have no overall Timeout: sync runs last as long as
	// the code and event streams as long as the run; bound calls with their context instead.
	HTTPClient *http.Client
	// UserAgent is sent as User-Agent when set.
	UserAgent string
}

// New returns a client of the server at baseURL with apiKey. An empty baseURL means SANDBOXD_URL,
// or DefaultURL when that is unset; an empty apiKey means AGENTCOP_API_KEY, or SANDBOXD_API_KEY.
func New(baseURL, apiKey string) *Client {
	return &Client{BaseURL: ResolveURL(baseURL), APIKey: ResolveKey(apiKey), HTTPClient: &http.Client{
		Transport: defaultTransport,
	}}
}

// defaultTransport is http.DefaultTransport's settings (which include a one-second
// ExpectContinueTimeout, used by PutFile), shared by every client New makes.
var defaultTransport = http.DefaultTransport.(*http.Transport).Clone()

// ResolveURL returns u, else $SANDBOXD_URL, else DefaultURL, without a trailing slash.
func ResolveURL(u string) string {
	if u == "" {
		u = os.Getenv(EnvURL)
	}
	if u == "" {
		u = DefaultURL
	}
	if !strings.Contains(u, "://") {
		u = "http://" + u
	}
	return strings.TrimRight(u, "/")
}

// ResolveKey returns k, else $AGENTCOP_API_KEY, else $SANDBOXD_API_KEY (possibly ""). The Python
// SDK reads them in the same order.
func ResolveKey(k string) string {
	if k == "" {
		k = os.Getenv(EnvVendorKey)
	}
	if k == "" {
		k = os.Getenv(EnvKey)
	}
	return strings.TrimSpace(k)
}

// Code returns a pointer to s, for api.RunRequest.Code.
func Code(s string) *string { return &s }

// Int returns a pointer to n, for the optional integers of the api types.
func Int(n int) *int { return &n }

// Bool returns a pointer to b, for the optional booleans of the api types.
func Bool(b bool) *bool { return &b }

// ErrNoKey is returned, before any request is sent, by calls that need an API key when the client
// has none.
var ErrNoKey = errors.New("no API key: pass one or set " + EnvKey)

// request describes one call.
type request struct {
	method string
	path   string     // below BaseURL, starting with /api/ or /health
	query  url.Values // optional
	body   io.Reader  // raw body (with contentLength), or nil
	json   any        // a JSON body, when body is nil
	header http.Header
	length int64 // body length, -1 unknown
	noAuth bool
}

// do sends r and returns the response when its status is one of ok; any other status is decoded
// into an *Error and the body closed.
func (c *Client) do(ctx context.Context, r request, ok ...int) (*http.Response, error) {
	if !r.noAuth && c.APIKey == "" {
		return nil, ErrNoKey
	}
	u := c.BaseURL + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	body := r.body
	if body == nil && r.json != nil {
		b, err := json.Marshal(r.json)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encode body: %w", r.method, r.path, err)
		}
		body, r.length = bytes.NewReader(b), int64(len(b))
	}
	req, err := http.NewRequestWithContext(ctx, r.method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
	if body != nil {
		req.ContentLength = r.length
		if r.json != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		if req.ContentLength == 0 && r.length == 0 {
			req.Body = http.NoBody
		}
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	if !r.noAuth {
		req.Header.Set("X-AgentCop-Key", c.APIKey)
	}
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	hc := c.HTTPClient
	if hc == nil {
		hc = &http.Client{Transport: defaultTransport}
	}
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", r.method, u, ctx.Err())
		}
		return nil, &TransportError{Method: r.method, URL: u, Err: err}
	}
	for _, s := range ok {
		if resp.StatusCode == s {
			return resp, nil
		}
	}
	defer resp.Body.Close()
	return nil, decodeError(resp)
}

// TransportError is a request that got no HTTP answer: the server is down, the address is wrong,
// the connection broke.
type TransportError struct {
	Method, URL string
	Err         error
}

func (e *TransportError) Error() string {
	return fmt.Sprintf("%s %s: cannot reach sandboxd: %v", e.Method, e.URL, e.Err)
}

func (e *TransportError) Unwrap() error { return e.Err }

// call sends r, expects one of ok and decodes a JSON answer into out (when out is not nil).
func (c *Client) call(ctx context.Context, r request, out any, ok ...int) (int, error) {
	resp, err := c.do(ctx, r, ok...)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: decode answer: %w", r.method, r.path, err)
		}
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

func sandboxPath(id string, rest ...string) string {
	p := "/api/sandbox/" + url.PathEscape(id)
	for _, r := range rest {
		p += "/" + url.PathEscape(r)
	}
	return p
}

// Health answers GET /health (no key needed). A 503 "degraded" answer is returned with an *Error.
func (c *Client) Health(ctx context.Context) (*api.Health, error) {
	var h api.Health
	_, err := c.call(ctx, request{method: "GET", path: "/health", noAuth: true}, &h, http.StatusOK)
	if err != nil {
		return nil, err
	}
	return &h, nil
}

// Create creates a sandbox. The answer's Status is "ready" (201) or, when provisioning outlasts
// the server's wait, "provisioning" (202): then use WaitReady.
func (c *Client) Create(ctx context.Context, req api.CreateSandboxRequest) (*api.CreateSandboxResponse, error) {
	var out api.CreateSandboxResponse
	if _, err := c.call(ctx, request{method: "POST", path: "/api/sandbox/create", json: req}, &out,
		http.StatusCreated, http.StatusAccepted); err != nil {
		return nil, err
	}
	return &out, nil
}

// WaitReady polls the sandbox until it leaves "provisioning" and returns its record. A sandbox
// that ends in "error" is an *Error with code provisioning_failed; one that is destroyed meanwhile
// is an *Error with code sandbox_destroyed. It stops when ctx is done.
func (c *Client) WaitReady(ctx context.Context, id string) (*api.Sandbox, error) {
	delay := 50 * time.Millisecond
	for {
		sb, err := c.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		switch sb.Status {
		case "ready", "running":
			return sb, nil
		case "error":
			msg := "provisioning failed"
			if len(sb.Error) > 0 && string(sb.Error) != "null" {
				msg += ": " + string(sb.Error)
			}
			return sb, &Error{Status: http.StatusInternalServerError, Code: CodeProvisioningFailed, Message: msg}
		case "destroyed":
			return sb, &Error{Status: http.StatusConflict, Code: CodeSandboxDestroyed, Message: "sandbox " + id + " was destroyed before it was ready"}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for sandbox %s: %w", id, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, time.Second)
	}
}

// Get returns a sandbox's record (also after it is destroyed).
func (c *Client) Get(ctx context.Context, id string) (*api.Sandbox, error) {
	var out api.Sandbox
	if _, err := c.call(ctx, request{method: "GET", path: sandboxPath(id)}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListOptions filter and page lists. Zero fields are not sent (the server's defaults apply).
type ListOptions struct {
	Status  string // sandboxes only
	AgentID string // sandboxes only
	Page    int
	Limit   int
}

func (o ListOptions) values() url.Values {
	q := url.Values{}
	if o.Status != "" {
		q.Set("status", o.Status)
	}
	if o.AgentID != "" {
		q.Set("agent_id", o.AgentID)
	}
	if o.Page > 0 {
		q.Set("page", strconv.Itoa(o.Page))
	}
	if o.Limit > 0 {
		q.Set("limit", strconv.Itoa(o.Limit))
	}
	return q
}

// List returns one page of the caller's sandboxes, newest first.
func (c *Client) List(ctx context.Context, opts ListOptions) (*api.SandboxList, error) {
	var out api.SandboxList
	if _, err := c.call(ctx, request{method: "GET", path: "/api/sandbox", query: opts.values()}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// Delete destroys a sandbox (idempotent: deleting a destroyed sandbox succeeds).
func (c *Client) Delete(ctx context.Context, id string) error {
	_, err := c.call(ctx, request{method: "DELETE", path: sandboxPath(id)}, nil, http.StatusNoContent, http.StatusOK)
	return err
}

// Run executes code synchronously and returns the finished run. A run that fails, times out or
// runs out of memory is a result (see Run.Status), not an error. req.Async is ignored.
func (c *Client) Run(ctx context.Context, id string, req api.RunRequest) (*api.Run, error) {
	req.Async = false
	var out api.Run
	if _, err := c.call(ctx, request{method: "POST", path: sandboxPath(id, "run"), json: req}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// RunAsync queues code and returns at once with the run's ID; follow it with Events, Follow,
// WaitRun or GetRun. req.Async is set.
func (c *Client) RunAsync(ctx context.Context, id string, req api.RunRequest) (*api.RunAccepted, error) {
	req.Async = true
	var out api.RunAccepted
	if _, err := c.call(ctx, request{method: "POST", path: sandboxPath(id, "run"), json: req}, &out, http.StatusAccepted); err != nil {
		return nil, err
	}
	return &out, nil
}

// GetRun returns one run.
func (c *Client) GetRun(ctx context.Context, id, runID string) (*api.Run, error) {
	var out api.Run
	if _, err := c.call(ctx, request{method: "GET", path: sandboxPath(id, "runs", runID)}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListRuns returns one page of a sandbox's runs, newest first (Status and AgentID are ignored).
func (c *Client) ListRuns(ctx context.Context, id string, opts ListOptions) (*api.RunList, error) {
	opts.Status, opts.AgentID = "", ""
	var out api.RunList
	if _, err := c.call(ctx, request{method: "GET", path: sandboxPath(id, "runs"), query: opts.values()}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// CancelRun kills a queued or running run and returns it.
func (c *Client) CancelRun(ctx context.Context, id, runID string) (*api.Run, error) {
	var out api.Run
	if _, err := c.call(ctx, request{method: "POST", path: sandboxPath(id, "runs", runID, "cancel")}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// Finished reports whether a run status is final.
func Finished(status string) bool {
	switch status {
	case "queued", "running", "":
		return false
	}
	return true
}

// WaitRun polls a run until it is finished and returns it.
func (c *Client) WaitRun(ctx context.Context, id, runID string) (*api.Run, error) {
	delay := 50 * time.Millisecond
	for {
		run, err := c.GetRun(ctx, id, runID)
		if err != nil {
			return nil, err
		}
		if Finished(run.Status) {
			return run, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for run %s: %w", runID, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, time.Second)
	}
}

// Usage returns the caller's usage between from and to (zero: the server's defaults).
func (c *Client) Usage(ctx context.Context, from, to time.Time) (*api.Usage, error) {
	q := url.Values{}
	if !from.IsZero() {
		q.Set("from", from.UTC().Format(time.RFC3339))
	}
	if !to.IsZero() {
		q.Set("to", to.UTC().Format(time.RFC3339))
	}
	var out api.Usage
	if _, err := c.call(ctx, request{method: "GET", path: "/api/usage", query: q}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// AuditOptions filter the audit log. Zero fields are not sent.
type AuditOptions struct {
	SandboxID string
	Type      string
	From, To  time.Time
	Page      int
	Limit     int
}

// Audit returns one page of the caller's audit events, oldest first.
func (c *Client) Audit(ctx context.Context, opts AuditOptions) (*api.EventList, error) {
	q := ListOptions{Page: opts.Page, Limit: opts.Limit}.values()
	if opts.SandboxID != "" {
		q.Set("sandbox_id", opts.SandboxID)
	}
	if opts.Type != "" {
		q.Set("type", opts.Type)
	}
	if !opts.From.IsZero() {
		q.Set("from", opts.From.UTC().Format(time.RFC3339Nano))
	}
	if !opts.To.IsZero() {
		q.Set("to", opts.To.UTC().Format(time.RFC3339Nano))
	}
	var out api.EventList
	if _, err := c.call(ctx, request{method: "GET", path: "/api/audit", query: q}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// Images returns the approved images.
func (c *Client) Images(ctx context.Context) (*api.ImageList, error) {
	var out api.ImageList
	if _, err := c.call(ctx, request{method: "GET", path: "/api/images"}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}
