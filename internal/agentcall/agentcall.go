// Package agentcall sends runs' agent calls — agent.run(task, **kw) and agent.call(tool, **kw) in
// every run's globals (package pyrunner, agent.go) — to the endpoint the operator configured for
// the sandbox's agent_id (the config file's "agents"), from the host: the sandbox needs no
// network for it, and the endpoint's headers (its secrets) never enter a sandbox. The URL is
// only ever the operator's: nothing a run sends chooses where the call goes, redirects are not
// followed, and the egress policy of the sandbox does not apply (the endpoint is not the
// sandbox's traffic).
//
// The endpoint receives `POST <url>` with the operator's headers, Content-Type
// application/json and the body Request:
//
//	{"agent_id": "data-processor", "sandbox_id": "sbx_…", "run_id": "run_…",
//	 "method": "run", "task": "analyze sales data", "args": {…}}     (agent.run)
//	{…, "method": "call", "tool": "lookup", "args": {"city": "Paris"}} (agent.call)
//
// and answers 2xx with JSON (at most pyrunner.MaxAgentAnswer bytes), which the run gets back
// decoded. Anything else is an *Error, its Kind saying what.
package agentcall

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Endpoint is the operator's endpoint of one agent_id.
type Endpoint struct {
	URL     string            // http or https, absolute
	Headers map[string]string // added to every request (Authorization, …)
	Timeout time.Duration     // per call (0: DefaultTimeout); a run's calls end with the run anyway
}

// Limits of an endpoint's timeout.
const (
	DefaultTimeout = 30 * time.Second
	MaxTimeout     = 600 * time.Second
)

// Check reports what is wrong with e, if anything.
func (e Endpoint) Check() error {
	u, err := url.Parse(e.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.Fragment != "" {
		return fmt.Errorf("url %q: want an absolute http:// or https:// URL without user info or fragment", e.URL)
	}
	for k, v := range e.Headers {
		if k == "" || strings.ContainsAny(k, " \t\r\n:()<>@,;\\\"/[]?={}") || strings.ContainsAny(v, "\r\n\x00") {
			return fmt.Errorf("header %q: want a token as its name and a value without CR, LF or NUL", k)
		}
		switch http.CanonicalHeaderKey(k) {
		case "Content-Type", "Content-Length", "Host", "Transfer-Encoding", "Connection":
			return fmt.Errorf("header %q is sandboxd's to set", k)
		}
	}
	// Under a second is allowed here (tests); the config file's timeouts are 1 s or more.
	if e.Timeout < 0 || e.Timeout > MaxTimeout {
		return fmt.Errorf("timeout %v: want at most %d seconds (0: the default, %v)", e.Timeout, int(MaxTimeout/time.Second), DefaultTimeout)
	}
	return nil
}

// Request is the body an endpoint receives.
type Request struct {
	AgentID   string          `json:"agent_id"`
	SandboxID string          `json:"sandbox_id"`
	RunID     string          `json:"run_id"`
	Method    string          `json:"method"`         // "run" or "call"
	Task      string          `json:"task,omitempty"` // with "run"
	Tool      string          `json:"tool,omitempty"` // with "call"
	Args      json.RawMessage `json:"args"`           // the keyword arguments, a JSON object
}

// Kinds of Error.
const (
	KindNotConfigured = "not_configured" // no endpoint for the agent_id
	KindTimeout       = "timeout"        // no answer within the endpoint's timeout or the run's time
	KindUnreachable   = "unreachable"    // the request failed (connection refused, reset, TLS, …)
	KindStatus        = "status"         // a status other than 2xx (Status says which)
	KindTooLarge      = "too_large"      // an answer over pyrunner.MaxAgentAnswer bytes
	KindNotJSON       = "not_json"       // a 2xx answer that is not JSON
)

// Error is why a call got no answer. Its Message is for the run (it names no header or secret).
type Error struct {
	Kind    string
	Status  int // the endpoint's HTTP status (0: none)
	Message string
	Cause   error // what failed, for the operator's log (it may name the URL): never for the run
}

func (e *Error) Error() string { return e.Message }

// Client sends calls to the endpoints. The zero of *Client (nil) has no endpoint.
type Client struct {
	endpoints map[string]Endpoint
	hc        *http.Client
}

// New returns a client of endpoints (by agent_id), each checked.
func New(endpoints map[string]Endpoint) (*Client, error) {
	c := &Client{endpoints: make(map[string]Endpoint, len(endpoints)), hc: &http.Client{
		Transport: http.DefaultTransport.(*http.Transport).Clone(),
		// The URL is the operator's; a redirect is the endpoint's answer, not a new destination.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
	for id, e := range endpoints {
		if err := e.Check(); err != nil {
			return nil, fmt.Errorf("agents[%q]: %w", id, err)
		}
		if e.Timeout == 0 {
			e.Timeout = DefaultTimeout
		}
		c.endpoints[id] = e
	}
	return c, nil
}

// Call sends req to the endpoint of req.AgentID and returns its JSON answer. It gives up at the
// endpoint's timeout or when ctx ends (the service ends it with the run). Errors are *Error.
func (c *Client) Call(ctx context.Context, req Request) (json.RawMessage, error) {
	var ep Endpoint
	ok := false
	if c != nil {
		ep, ok = c.endpoints[req.AgentID]
	}
	if !ok {
		return nil, &Error{Kind: KindNotConfigured, Message: fmt.Sprintf(
			"no endpoint is configured for agent_id %q: the operator adds agents[%q] (its url) to sandboxd's config file", req.AgentID, req.AgentID)}
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, &Error{Kind: KindUnreachable, Message: "encoding the request: " + err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, ep.Timeout)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, ep.URL, bytes.NewReader(body))
	if err != nil {
		return nil, &Error{Kind: KindUnreachable, Message: "the endpoint's request: " + err.Error()}
	}
	for k, v := range ep.Headers {
		hreq.Header.Set(k, v)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("User-Agent", "sandboxd")
	resp, err := c.hc.Do(hreq)
	if err != nil {
		return nil, c.failed(ctx, ep, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // reuse the connection if it is short
		return nil, &Error{Kind: KindStatus, Status: resp.StatusCode, Message: fmt.Sprintf("the endpoint answered %s", resp.Status)}
	}
	ans, err := io.ReadAll(io.LimitReader(resp.Body, pyrunner.MaxAgentAnswer+1))
	switch {
	case err != nil:
		return nil, c.failed(ctx, ep, err)
	case len(ans) > pyrunner.MaxAgentAnswer:
		return nil, &Error{Kind: KindTooLarge, Status: resp.StatusCode,
			Message: fmt.Sprintf("the endpoint's answer is over the %d-byte limit", pyrunner.MaxAgentAnswer)}
	case !json.Valid(ans):
		return nil, &Error{Kind: KindNotJSON, Status: resp.StatusCode, Message: "the endpoint's answer is not JSON"}
	}
	return ans, nil
}

// failed classifies a request that got no complete answer. The transport's error text names the
// URL and its address: the run is told only the kind, the operator's log gets Cause.
func (c *Client) failed(ctx context.Context, ep Endpoint, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
		return &Error{Kind: KindTimeout, Cause: err,
			Message: fmt.Sprintf("no answer from the endpoint in time (its timeout is %v, and a call ends with its run)", ep.Timeout)}
	}
	return &Error{Kind: KindUnreachable, Cause: err, Message: "the endpoint could not be reached"}
}
