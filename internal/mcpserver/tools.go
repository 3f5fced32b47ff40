package mcpserver

// The tools: their arguments and results (the input and output schemas are derived from these
// structs; a `jsonschema` tag is a property's description) and what each one calls.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
)

// CreateSandboxInput is create_sandbox's arguments: the body of POST /api/sandbox/create.
type CreateSandboxInput struct {
	AgentID    string           `json:"agent_id" jsonschema:"who the sandbox works for: 1-128 characters of A-Z a-z 0-9 . _ : -"`
	Mode       string           `json:"mode,omitempty" jsonschema:"container (the default) or wasm"`
	Image      string           `json:"image,omitempty" jsonschema:"an image the operator approved; default: the server's default image for the mode"`
	Filesystem *FilesystemInput `json:"filesystem,omitempty" jsonschema:"the directories the code and the files tools can use"`
	Network    *NetworkInput    `json:"network,omitempty" jsonschema:"egress rules (container mode)"`
	Resources  *ResourcesInput  `json:"resources,omitempty" jsonschema:"limits and lifetime"`
	AllowSpawn *bool            `json:"allow_spawn,omitempty" jsonschema:"whether the code may start subprocesses (container mode; default false)"`
}

// FilesystemInput is config.filesystem.
type FilesystemInput struct {
	ReadOnly  []string `json:"read_only,omitempty" jsonschema:"absolute paths the code can read but not write (you can write them with write_file)"`
	ReadWrite []string `json:"read_write,omitempty" jsonschema:"absolute paths the code can read and write"`
	Blocked   []string `json:"blocked,omitempty" jsonschema:"absolute paths nothing can list, read or write"`
}

// NetworkInput is config.network.
type NetworkInput struct {
	Allow         []string `json:"allow,omitempty" jsonschema:"hosts the code may reach: names (api.example.com), wildcards (*.example.com), IPs or CIDRs, optionally with :port"`
	BlockOutbound *bool    `json:"block_outbound,omitempty" jsonschema:"deny all egress but allow (the default, true); false: unrestricted but for the always-denied addresses"`
}

// ResourcesInput is config.resources.
type ResourcesInput struct {
	CPU     string `json:"cpu,omitempty" jsonschema:"cores as a decimal string, e.g. 0.5; default 1"`
	Memory  string `json:"memory,omitempty" jsonschema:"e.g. 512m or 1g; default 512m"`
	Disk    string `json:"disk,omitempty" jsonschema:"bytes the sandbox can write in all, e.g. 1g"`
	Timeout *int   `json:"timeout,omitempty" jsonschema:"the sandbox's lifetime in seconds (1-3600; default 1800): it is destroyed then"`
}

// Sandbox is a sandbox's record (GET /api/sandbox/{id}).
type Sandbox struct {
	SandboxID     string           `json:"sandbox_id"`
	AgentID       string           `json:"agent_id"`
	Status        string           `json:"status" jsonschema:"provisioning, ready, running, destroyed or error"`
	Mode          string           `json:"mode"`
	Config        any              `json:"config" jsonschema:"the normalised config: every default filled in"`
	CreatedAt     time.Time        `json:"created_at"`
	ExpiresAt     time.Time        `json:"expires_at"`
	DestroyedAt   *time.Time       `json:"destroyed_at,omitempty"`
	DestroyReason string           `json:"destroy_reason,omitempty"`
	Error         any              `json:"error,omitempty"`
	Runs          api.RunCounts    `json:"runs"`
	Usage         api.SandboxUsage `json:"usage"`
}

func sandboxOf(sb *api.Sandbox) Sandbox {
	out := Sandbox{SandboxID: sb.SandboxID, AgentID: sb.AgentID, Status: sb.Status, Mode: sb.Mode, Config: jsonValue(sb.Config),
		CreatedAt: sb.CreatedAt, ExpiresAt: sb.ExpiresAt, DestroyedAt: sb.DestroyedAt, Error: jsonValue(sb.Error), Runs: sb.Runs, Usage: sb.Usage}
	if sb.DestroyReason != nil {
		out.DestroyReason = *sb.DestroyReason
	}
	return out
}

// jsonValue decodes raw JSON for a structured result (nil for none or null).
func jsonValue(raw json.RawMessage) any {
	if len(raw) == 0 {
		return nil
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return string(raw)
	}
	return v
}

func createSandbox(ctx context.Context, c *client.Client, in CreateSandboxInput) (*mcp.CallToolResult, Sandbox, error) {
	req := api.CreateSandboxRequest{AgentID: in.AgentID, Mode: in.Mode, Config: &api.Config{Image: in.Image}}
	if f := in.Filesystem; f != nil {
		req.Config.Filesystem = &api.Filesystem{ReadOnly: f.ReadOnly, ReadWrite: f.ReadWrite, Blocked: f.Blocked}
	}
	if n := in.Network; n != nil {
		req.Config.Network = &api.Network{Allow: n.Allow, BlockOutbound: n.BlockOutbound}
	}
	if r := in.Resources; r != nil {
		req.Config.Resources = &api.Resources{CPU: r.CPU, Memory: r.Memory, Disk: r.Disk, Timeout: r.Timeout}
	}
	if in.AllowSpawn != nil {
		req.Config.Process = &api.Process{AllowSpawn: in.AllowSpawn}
	}
	created, err := c.Create(ctx, req)
	if err != nil {
		return nil, Sandbox{}, err
	}
	sb, err := c.WaitReady(ctx, created.SandboxID) // at once when it is ready (201)
	if err != nil {
		return nil, Sandbox{}, abandon(ctx, c, created.SandboxID, err)
	}
	return nil, sandboxOf(sb), nil
}

// abandon deletes sandbox id, created but not seen ready because of err, unless err says it
// failed or was destroyed (nothing is left to delete): the caller never learns its id, and it
// would hold its plan's quota until its timeout. The delete outlives ctx (the caller may be
// gone); when it fails, the error names the sandbox.
func abandon(ctx context.Context, c *client.Client, id string, err error) error {
	var ae *client.Error
	if errors.As(err, &ae) && (ae.Code == client.CodeProvisioningFailed || ae.Code == client.CodeSandboxDestroyed) {
		return err
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abandonTimeout)
	defer cancel()
	if derr := c.Delete(dctx, id); derr != nil {
		return fmt.Errorf("%v; sandbox %s was created and could not be deleted (%v): delete it with delete_sandbox", toolError(err), id, toolError(derr))
	}
	return err
}

// abandonTimeout bounds abandon's delete.
const abandonTimeout = 30 * time.Second

// SandboxIDInput names a sandbox.
type SandboxIDInput struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
}

// errNoSandboxID is the answer to an empty sandbox_id (which would name no API route).
var errNoSandboxID = errors.New("invalid_request: sandbox_id is required")

func getSandbox(ctx context.Context, c *client.Client, in SandboxIDInput) (*mcp.CallToolResult, Sandbox, error) {
	if in.SandboxID == "" {
		return nil, Sandbox{}, errNoSandboxID
	}
	sb, err := c.Get(ctx, in.SandboxID)
	if err != nil {
		return nil, Sandbox{}, err
	}
	return nil, sandboxOf(sb), nil
}

func deleteSandbox(ctx context.Context, c *client.Client, in SandboxIDInput) (*mcp.CallToolResult, Sandbox, error) {
	if in.SandboxID == "" {
		return nil, Sandbox{}, errNoSandboxID
	}
	if err := c.Delete(ctx, in.SandboxID); err != nil {
		return nil, Sandbox{}, err
	}
	return getSandbox(ctx, c, in)
}

// ContextInput names a code context of a sandbox.
type ContextInput struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
	ContextID string `json:"context_id" jsonschema:"the context's ID (ctx_…)"`
}

func createContext(ctx context.Context, c *client.Client, in SandboxIDInput) (*mcp.CallToolResult, api.CodeContext, error) {
	if in.SandboxID == "" {
		return nil, api.CodeContext{}, errNoSandboxID
	}
	cx, err := c.CreateContext(ctx, in.SandboxID)
	if err != nil {
		return nil, api.CodeContext{}, err
	}
	return nil, *cx, nil
}

func deleteContext(ctx context.Context, c *client.Client, in ContextInput) (*mcp.CallToolResult, api.CodeContext, error) {
	if in.SandboxID == "" {
		return nil, api.CodeContext{}, errNoSandboxID
	}
	if in.ContextID == "" {
		return nil, api.CodeContext{}, errors.New("invalid_request: context_id is required")
	}
	if err := c.DeleteContext(ctx, in.SandboxID, in.ContextID); err != nil {
		return nil, api.CodeContext{}, err
	}
	cx, err := c.GetContext(ctx, in.SandboxID, in.ContextID)
	if err != nil {
		return nil, api.CodeContext{}, err
	}
	return nil, *cx, nil
}

// ListSandboxesInput filters and pages list_sandboxes.
type ListSandboxesInput struct {
	Status  string `json:"status,omitempty" jsonschema:"only sandboxes with this status"`
	AgentID string `json:"agent_id,omitempty" jsonschema:"only sandboxes of this agent_id"`
	Page    int    `json:"page,omitempty" jsonschema:"the page, from 1"`
	Limit   int    `json:"limit,omitempty" jsonschema:"sandboxes per page, 1-500; default 50"`
}

// SandboxList is one page of sandboxes.
type SandboxList struct {
	Sandboxes []Sandbox `json:"sandboxes"`
	Total     int       `json:"total"`
	Page      int       `json:"page"`
}

func listSandboxes(ctx context.Context, c *client.Client, in ListSandboxesInput) (*mcp.CallToolResult, SandboxList, error) {
	list, err := c.List(ctx, client.ListOptions{Status: in.Status, AgentID: in.AgentID, Page: in.Page, Limit: in.Limit})
	if err != nil {
		return nil, SandboxList{}, err
	}
	out := SandboxList{Sandboxes: []Sandbox{}, Total: list.Total, Page: list.Page}
	for i := range list.Sandboxes {
		out.Sandboxes = append(out.Sandboxes, sandboxOf(&list.Sandboxes[i]))
	}
	return nil, out, nil
}

// RunCodeInput is run_code's arguments: the body of POST /api/sandbox/{id}/run.
type RunCodeInput struct {
	SandboxID string            `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
	Code      string            `json:"code" jsonschema:"Python source, at most 1 MiB; set the global variable result to return a JSON value"`
	Timeout   *int              `json:"timeout,omitempty" jsonschema:"seconds, 1-600 (default 30): the run is killed then and ends with status timeout"`
	Env       map[string]string `json:"env,omitempty" jsonschema:"environment variables of this run (at most 64)"`
	Context   string            `json:"context,omitempty" jsonschema:"a code context of the sandbox (ctx_…): the run executes in its long-lived interpreter, whose variables and imports persist between runs (needs a server with code contexts)"`
}

// Run is a run object.
type Run struct {
	RunID           string         `json:"run_id"`
	SandboxID       string         `json:"sandbox_id"`
	Context         string         `json:"context,omitempty"`
	Status          string         `json:"status" jsonschema:"completed (exit 0), failed (an exception or a non-zero exit), timeout, cancelled, oom or error (the service failed)"`
	ExitCode        *int           `json:"exit_code"`
	Stdout          string         `json:"stdout"`
	Stderr          string         `json:"stderr"`
	StdoutTruncated bool           `json:"stdout_truncated"`
	StderrTruncated bool           `json:"stderr_truncated"`
	Result          any            `json:"result" jsonschema:"the value of the global variable result, as JSON (its repr() when it is not JSON); null when unset"`
	Error           any            `json:"error" jsonschema:"the Python exception: type, message, traceback; null when none"`
	DurationMS      *int64         `json:"duration_ms"`
	Usage           api.RunUsage   `json:"usage"`
	Network         api.RunNetwork `json:"network"`
	Display         *string        `json:"display" jsonschema:"the repr() of the code's trailing expression, as a notebook shows it; null when none"`
	Outputs         []RunOutput    `json:"outputs" jsonschema:"rich outputs: display() calls, the trailing value's rich form, matplotlib figures; each a file to read_file at its path (images also come as image content)"`
}

// RunOutput is one rich output of a run (api.RunOutput).
type RunOutput struct {
	Type string `json:"type" jsonschema:"MIME type"`
	Kind string `json:"kind" jsonschema:"result, display or figure"`
	Path string `json:"path" jsonschema:"the file of the output: read_file reads it"`
	Size int64  `json:"size"`
}

func runCode(ctx context.Context, c *client.Client, in RunCodeInput) (*mcp.CallToolResult, Run, error) {
	if in.SandboxID == "" {
		return nil, Run{}, errNoSandboxID
	}
	r, err := c.Run(ctx, in.SandboxID, api.RunRequest{Code: &in.Code, Timeout: in.Timeout, Env: in.Env, Context: in.Context})
	if err != nil {
		return nil, Run{}, err
	}
	out := Run{RunID: r.RunID, SandboxID: r.SandboxID, Context: in.Context, Status: r.Status, ExitCode: r.ExitCode,
		Stdout: r.Stdout, Stderr: r.Stderr, StdoutTruncated: r.StdoutTruncated, StderrTruncated: r.StderrTruncated,
		Result: jsonValue(r.Result), Error: jsonValue(r.Error), DurationMS: r.DurationMS, Usage: r.Usage, Network: r.Network,
		Display: r.Display, Outputs: []RunOutput{}}
	for _, o := range r.Outputs {
		out.Outputs = append(out.Outputs, RunOutput(o))
	}
	res := &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: runSummary(&out)}}, IsError: out.Status != "completed"}
	res.Content = append(res.Content, runImages(ctx, c, r)...)
	return res, out, nil
}

// runImages are a run's image outputs as image content (at most MaxFileBytes in all; one that
// cannot be read, or whose bytes are not the image type the code claimed — as read_file
// detects it — is left out: the structured content still lists it).
func runImages(ctx context.Context, c *client.Client, r *api.Run) []mcp.Content {
	var out []mcp.Content
	total := int64(0)
	for _, o := range r.Outputs {
		if (o.Type != "image/png" && o.Type != "image/jpeg") || total+o.Size > MaxFileBytes {
			continue
		}
		var buf bytes.Buffer
		if _, _, err := c.Download(ctx, r.SandboxID, o.Path, &buf); err != nil {
			continue
		}
		if http.DetectContentType(buf.Bytes()) != o.Type {
			continue
		}
		total += int64(buf.Len())
		out = append(out, &mcp.ImageContent{Data: buf.Bytes(), MIMEType: o.Type})
	}
	return out
}

// runSummary is a run as text: its end, its output, its result and its error.
func runSummary(r *Run) string {
	var b strings.Builder
	fmt.Fprintf(&b, "run %s %s", r.RunID, r.Status)
	if r.ExitCode != nil {
		fmt.Fprintf(&b, " (exit %d)", *r.ExitCode)
	}
	if r.DurationMS != nil {
		fmt.Fprintf(&b, " in %d ms", *r.DurationMS)
	}
	b.WriteString("\n")
	stream := func(name, s string, cut bool) {
		if s == "" {
			return
		}
		fmt.Fprintf(&b, "%s:\n", name)
		if len(s) > maxTextOutput {
			s, cut = clip(s, maxTextOutput), true
		}
		b.WriteString(s)
		if !strings.HasSuffix(s, "\n") {
			b.WriteString("\n")
		}
		if cut {
			fmt.Fprintf(&b, "[%s cut: the structured content has what the run kept]\n", name)
		}
	}
	stream("stdout", r.Stdout, r.StdoutTruncated)
	stream("stderr", r.Stderr, r.StderrTruncated)
	if r.Result != nil {
		res, _ := json.Marshal(r.Result)
		fmt.Fprintf(&b, "result: %s\n", clip(string(res), maxTextOutput))
	}
	if r.Display != nil {
		fmt.Fprintf(&b, "display: %s\n", clip(*r.Display, maxTextOutput))
	}
	for _, o := range r.Outputs {
		fmt.Fprintf(&b, "output: %s (%s, %d bytes) at %s\n", o.Type, o.Kind, o.Size, o.Path)
	}
	if e, ok := r.Error.(map[string]any); ok {
		fmt.Fprintf(&b, "error: %v: %v\n", e["type"], e["message"])
		if tb, _ := e["traceback"].(string); tb != "" {
			b.WriteString(clip(tb, maxTextOutput))
		}
	}
	return strings.TrimRight(b.String(), "\n")
}

// clip cuts s to at most n bytes, on a rune boundary.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// ReadFileInput is read_file's arguments.
type ReadFileInput struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
	Path      string `json:"path" jsonschema:"the file's absolute path, inside one of the sandbox's filesystem paths"`
	Offset    int64  `json:"offset,omitempty" jsonschema:"the first byte to read (default 0)"`
}

// FileContent is what read_file read.
type FileContent struct {
	Path      string `json:"path"`
	Offset    int64  `json:"offset"`
	Size      int64  `json:"size" jsonschema:"bytes in content"`
	TotalSize int64  `json:"total_size" jsonschema:"bytes in the whole file (-1 when unknown)"`
	Truncated bool   `json:"truncated" jsonschema:"more bytes follow: read again from offset+size"`
	MIMEType  string `json:"mime_type" jsonschema:"the type the content looks like"`
	Encoding  string `json:"encoding" jsonschema:"utf-8: content is the text; base64: content is the bytes in base64"`
	Content   string `json:"content"`
	SHA256    string `json:"sha256,omitempty" jsonschema:"hex SHA-256 of the whole file, when it was read whole and checked"`
}

// imageTypes are the MIME types read_file also returns as image content.
var imageTypes = map[string]bool{"image/png": true, "image/jpeg": true, "image/gif": true, "image/webp": true}

func readFile(ctx context.Context, c *client.Client, in ReadFileInput) (*mcp.CallToolResult, FileContent, error) {
	if in.SandboxID == "" {
		return nil, FileContent{}, errNoSandboxID
	}
	if in.Offset < 0 {
		return nil, FileContent{}, errors.New("invalid_request: offset must not be negative")
	}
	var rng *client.Range
	if in.Offset > 0 {
		rng = &client.Range{Offset: in.Offset, Length: MaxFileBytes + 1}
	}
	f, err := c.GetFile(ctx, in.SandboxID, in.Path, rng)
	if errors.Is(err, client.ErrIsDirectory) {
		return nil, FileContent{}, fmt.Errorf("invalid_request: %s is a directory: list it with list_files", in.Path)
	}
	if err != nil {
		return nil, FileContent{}, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, FileContent{}, fmt.Errorf("read %s: %w", in.Path, err)
	}
	out := FileContent{Path: in.Path, Offset: in.Offset, TotalSize: f.Total}
	if len(data) > MaxFileBytes {
		data, out.Truncated = data[:MaxFileBytes], true
	} else if f.Size >= 0 && int64(len(data)) != f.Size {
		return nil, FileContent{}, fmt.Errorf("read %s: got %d of %d bytes", in.Path, len(data), f.Size)
	}
	if !out.Truncated && !f.Partial && f.SHA256 != "" {
		if sum := sha256Hex(data); sum != f.SHA256 {
			return nil, FileContent{}, &client.ChecksumError{Path: in.Path, Want: f.SHA256, Got: sum}
		}
		out.SHA256 = f.SHA256
	}
	out.Size = int64(len(data))
	out.MIMEType = http.DetectContentType(data)
	if utf8.Valid(data) && !imageTypes[out.MIMEType] {
		out.Encoding, out.Content = "utf-8", string(data)
	} else {
		out.Encoding, out.Content = "base64", base64.StdEncoding.EncodeToString(data)
	}
	summary := fmt.Sprintf("%s: %d bytes from %d of %d (%s)", in.Path, out.Size, out.Offset, out.TotalSize, out.MIMEType)
	if out.Truncated {
		summary += fmt.Sprintf("; more follows: read again with offset %d", out.Offset+out.Size)
	}
	res := &mcp.CallToolResult{}
	switch {
	case imageTypes[out.MIMEType] && !out.Truncated && out.Offset == 0:
		res.Content = []mcp.Content{&mcp.TextContent{Text: summary}, &mcp.ImageContent{Data: data, MIMEType: out.MIMEType}}
	case out.Encoding == "utf-8" && (out.Truncated || out.Offset > 0):
		res.Content = []mcp.Content{&mcp.TextContent{Text: summary + ":\n"}, &mcp.TextContent{Text: out.Content}}
	case out.Encoding == "utf-8":
		res.Content = []mcp.Content{&mcp.TextContent{Text: out.Content}}
	default:
		res.Content = []mcp.Content{&mcp.TextContent{Text: summary + "; the bytes are in the structured content, in base64"}}
	}
	return res, out, nil
}

// WriteFileInput is write_file's arguments.
type WriteFileInput struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
	Path      string `json:"path" jsonschema:"the file's absolute path, inside one of the sandbox's filesystem paths"`
	Content   string `json:"content" jsonschema:"the file's content: text, or base64 when encoding is base64"`
	Encoding  string `json:"encoding,omitempty" jsonschema:"utf-8 (the default) or base64"`
}

func writeFile(ctx context.Context, c *client.Client, in WriteFileInput) (*mcp.CallToolResult, api.FileWritten, error) {
	if in.SandboxID == "" {
		return nil, api.FileWritten{}, errNoSandboxID
	}
	var data []byte
	switch in.Encoding {
	case "", "utf-8", "utf8", "text":
		if len(in.Content) > MaxFileBytes {
			return nil, api.FileWritten{}, fmt.Errorf("payload_too_large: content is %d bytes; write_file takes at most %d (use the files API for more)", len(in.Content), MaxFileBytes)
		}
		data = []byte(in.Content)
	case "base64":
		if base64.StdEncoding.DecodedLen(len(in.Content)) > MaxFileBytes+2 {
			return nil, api.FileWritten{}, fmt.Errorf("payload_too_large: content decodes to more than %d bytes, the most write_file takes (use the files API for more)", MaxFileBytes)
		}
		var err error
		if data, err = base64.StdEncoding.DecodeString(strings.TrimSpace(in.Content)); err != nil {
			return nil, api.FileWritten{}, fmt.Errorf("invalid_request: content is not valid base64: %v", err)
		}
		if len(data) > MaxFileBytes {
			return nil, api.FileWritten{}, fmt.Errorf("payload_too_large: content is %d bytes; write_file takes at most %d (use the files API for more)", len(data), MaxFileBytes)
		}
	default:
		return nil, api.FileWritten{}, fmt.Errorf("invalid_request: encoding must be utf-8 or base64, not %q", in.Encoding)
	}
	w, err := c.PutFile(ctx, in.SandboxID, in.Path, bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, api.FileWritten{}, err
	}
	return nil, *w, nil
}

// ListFilesInput is list_files's arguments.
type ListFilesInput struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox's ID (sbx_…)"`
	Path      string `json:"path" jsonschema:"the directory's absolute path, inside one of the sandbox's filesystem paths"`
}

// FileList is a directory's entries.
type FileList struct {
	Path    string          `json:"path"`
	Entries []api.FileEntry `json:"entries" jsonschema:"name, size, type (file, dir, symlink or other) and modified_at of each entry"`
}

func listFiles(ctx context.Context, c *client.Client, in ListFilesInput) (*mcp.CallToolResult, FileList, error) {
	if in.SandboxID == "" {
		return nil, FileList{}, errNoSandboxID
	}
	list, err := c.ListFiles(ctx, in.SandboxID, in.Path)
	if errors.Is(err, client.ErrNotDirectory) {
		return nil, FileList{}, fmt.Errorf("invalid_request: %s is a file: read it with read_file", in.Path)
	}
	if err != nil {
		return nil, FileList{}, err
	}
	out := FileList{Path: list.Path, Entries: list.Entries}
	if out.Entries == nil {
		out.Entries = []api.FileEntry{}
	}
	return nil, out, nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
