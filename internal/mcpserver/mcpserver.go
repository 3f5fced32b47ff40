// Package mcpserver is sandboxd's Model Context Protocol server: the tools an MCP client (an agent
// framework, a desktop assistant) finds to create sandboxes, run code in them, read and write
// their files, list and delete them. The tools are defined once here, on top of the Go client of
// the API (package client), and served two ways: over stdio by `sandboxd mcp`, a client of a
// running server, and over streamable HTTP at the server's /mcp, where package httpapi gives
// each request a client that calls the API in-process as the request's API key. Either way a tool
// call is exactly the REST calls it makes: the same validation, quotas, rate limits and audit.
//
// A tool's arguments are untrusted JSON: the SDK checks them against the tool's input schema
// (derived from the Go structs below: unknown fields, wrong types and missing required fields
// are refused), sizes are bounded (MaxFileBytes for files; code and the rest by the API), and
// every failure the API reports comes back as a tool result with isError set and the API's
// code and message — never a protocol error or a panic. A run that ends other than "completed"
// is also an isError result, carrying the whole run object.
package mcpserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"runtime/debug"
	"strings"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/client"
)

// Limits of the tools (the API's own limits apply on top: a file over the files API's upload
// limit is refused by it, code over 1 MiB too).
const (
	// MaxFileBytes bounds the bytes one read_file returns and one write_file sends: a file
	// travels inside a JSON message (base64 when it is not UTF-8 text), held whole in memory on
	// both sides. Larger files go through the files API (GET/PUT /api/sandbox/{id}/files), or
	// read_file's offset in pieces.
	MaxFileBytes = 8 << 20
	// MaxMessageBytes bounds one MCP message the server reads (a tools/call with MaxFileBytes of
	// base64 content fits): the HTTP body of /mcp and a line of `sandboxd mcp`'s stdin.
	MaxMessageBytes = 12 << 20
	// maxTextOutput is how much of a run's stdout and stderr the text summary repeats (the
	// structured content has all of it).
	maxTextOutput = 16 << 10
)

// ClientFunc returns the API client a tool call uses.
type ClientFunc func(ctx context.Context, req *mcp.CallToolRequest) (*client.Client, error)

// Options configure New.
type Options struct {
	Version string       // the server's version, reported to MCP clients
	Logger  *slog.Logger // where a tool's panic is logged (nil: slog.Default())
}

// ErrInternal is what a caller learns of a failure inside sandboxd (a panic): the details go to
// the log, never to the MCP client. A ClientFunc's transport may wrap it (httpapi's in-process
// one does) so that the tool says "internal error", not that the server cannot be reached.
var ErrInternal = errors.New("internal error")

// New returns an MCP server whose tools call the API through the client clientFor returns.
func New(clientFor ClientFunc, opts Options) *mcp.Server {
	if opts.Version == "" {
		opts.Version = "dev"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := mcp.NewServer(&mcp.Implementation{Name: "sandboxd", Title: "sandboxd: run code in sandboxes", Version: opts.Version},
		&mcp.ServerOptions{Instructions: instructions})
	yes, no := true, false
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "create_sandbox", Title: "Create a sandbox",
		Description: "Create an isolated sandbox (a container, or a WebAssembly interpreter with mode \"wasm\") to run Python code in. " +
			"Returns its record once it is ready; pass its sandbox_id to the other tools. Everything but agent_id has a default; " +
			"filesystem paths are the directories the files tools and the code can use. The sandbox is destroyed after timeout seconds or by delete_sandbox.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &no, OpenWorldHint: &no}}, createSandbox)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "run_code", Title: "Run Python code",
		Description: "Run Python code in a sandbox and wait for it to end. The run's stdout, stderr, exit code and the value of the " +
			"global variable `result` (JSON) come back; a run that raises, exits non-zero, times out or runs out of memory is an " +
			"error result with the Python error. Each run is a fresh interpreter (files in read_write paths and /tmp persist) " +
			"unless `context` names a code context of the sandbox.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &no, OpenWorldHint: &no}}, runCode)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "create_context", Title: "Create a code context",
		Description: "Create a code context in a sandbox: a long-lived Python interpreter whose variables, imports, " +
			"open files and working directory persist across the runs made with run_code's `context` set to its context_id — " +
			"load data once, then ask many questions of it. At most 8 per sandbox; a context dies with its sandbox.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &no, OpenWorldHint: &no}}, createContext)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "delete_context", Title: "Delete a code context",
		Description: "Delete a code context: its interpreter and everything its runs left in memory are gone. Deleting a deleted context succeeds.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &yes, IdempotentHint: true, OpenWorldHint: &no}}, deleteContext)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "read_file", Title: "Read a file from a sandbox",
		Description: fmt.Sprintf("Read a file in one of the sandbox's filesystem paths: UTF-8 text as it is, other bytes as base64; "+
			"PNG, JPEG, GIF and WebP images also as image content. At most %d MiB per call: offset reads further.", MaxFileBytes>>20),
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true, IdempotentHint: true, OpenWorldHint: &no}}, readFile)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "write_file", Title: "Write a file into a sandbox",
		Description: fmt.Sprintf("Write a file into one of the sandbox's filesystem paths (read_only paths too: they are read-only to the code, "+
			"not to you); parents are created, an existing file is replaced. content is text, or base64 with encoding \"base64\"; at most %d MiB.", MaxFileBytes>>20),
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &yes, IdempotentHint: true, OpenWorldHint: &no}}, writeFile)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "list_files", Title: "List a directory of a sandbox",
		Description: "List the entries (name, size, type, modified_at) of a directory in one of the sandbox's filesystem paths.",
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true, IdempotentHint: true, OpenWorldHint: &no}}, listFiles)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "list_sandboxes", Title: "List sandboxes",
		Description: "List your sandboxes, newest first, optionally by status (provisioning, ready, running, destroyed, error) or agent_id.",
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true, IdempotentHint: true, OpenWorldHint: &no}}, listSandboxes)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "get_sandbox", Title: "Get a sandbox",
		Description: "Get a sandbox's record: status, normalised config, times, run counts and usage.",
		Annotations: &mcp.ToolAnnotations{ReadOnlyHint: true, IdempotentHint: true, OpenWorldHint: &no}}, getSandbox)
	add(s, opts.Logger, clientFor, &mcp.Tool{Name: "delete_sandbox", Title: "Delete a sandbox",
		Description: "Destroy a sandbox now: its running code is cancelled and its files are gone. Deleting a destroyed sandbox succeeds.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: &yes, IdempotentHint: true, OpenWorldHint: &no}}, deleteSandbox)
	return s
}

const instructions = "sandboxd runs Python code in isolated sandboxes. Create one with create_sandbox (declare the directories you " +
	"need under filesystem.read_write), run code with run_code (set the global `result` to return a value), move files with " +
	"write_file and read_file, and delete the sandbox with delete_sandbox when you are done."

// handler is a tool's implementation: its arguments, already checked against the input schema,
// and the client to call the API with.
type handler[In, Out any] func(ctx context.Context, c *client.Client, in In) (*mcp.CallToolResult, Out, error)

// add registers a typed tool. Its handler's errors become isError results that say what the API
// said (see toolError); a panic becomes a fixed "internal error" result, its value and stack
// logged.
func add[In, Out any](s *mcp.Server, log *slog.Logger, clientFor ClientFunc, t *mcp.Tool, h handler[In, Out]) {
	mcp.AddTool(s, t, func(ctx context.Context, req *mcp.CallToolRequest, in In) (res *mcp.CallToolResult, out Out, err error) {
		defer func() {
			if p := recover(); p != nil {
				log.Error("MCP tool panicked", "tool", t.Name, "panic", p, "stack", string(debug.Stack()))
				var zero Out
				res, out, err = nil, zero, fmt.Errorf("%w in tool %s", ErrInternal, t.Name)
			}
		}()
		c, err := clientFor(ctx, req)
		if err == nil {
			res, out, err = h(ctx, c, in)
		}
		if err != nil {
			var zero Out
			return nil, zero, toolError(err)
		}
		return res, out, nil
	})
}

// toolError is the text of a failed call: the API's error code and message (with when to retry),
// or why the API could not be reached.
func toolError(err error) error {
	var ae *client.Error
	var te *client.TransportError
	switch {
	case errors.Is(err, ErrInternal): // the details were logged where it happened
		return ErrInternal
	case errors.Is(err, client.ErrNoKey):
		return errors.New("no API key: start `sandboxd mcp` with --key or SANDBOXD_API_KEY set")
	case errors.As(err, &te):
		cause, where := te.Err, te.URL
		var ue *url.Error
		if errors.As(cause, &ue) {
			cause = ue.Err
		}
		if u, perr := url.Parse(te.URL); perr == nil {
			where = u.Scheme + "://" + u.Host
		}
		return fmt.Errorf("unavailable: cannot reach sandboxd at %s: %v (is it running? `sandboxd mcp` takes --url or SANDBOXD_URL)", where, cause)
	case errors.As(err, &ae):
		msg := ae.Code + ": " + ae.Message
		if ae.RetryAfter > 0 {
			msg += fmt.Sprintf(" (retry in %v)", ae.RetryAfter)
		}
		return errors.New(msg)
	}
	return err
}

// Text returns the text of a tool result's text contents: what a client that reads no structured
// content shows the model.
func Text(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}
