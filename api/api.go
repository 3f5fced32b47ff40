// Package api holds the JSON wire types of the Sandbox API (see the project's API contract). It has
// no logic: the server and the Go client both use these types so they cannot drift apart.
package api

import (
	"encoding/json"
	"time"
)

// CreateSandboxRequest is the body of POST /api/sandbox/create.
type CreateSandboxRequest struct {
	AgentID string  `json:"agent_id"`
	Mode    string  `json:"mode,omitempty"`
	Config  *Config `json:"config,omitempty"`
}

// Config is a sandbox's configuration. In responses it is normalised: every default filled in.
type Config struct {
	Image      string      `json:"image,omitempty"`
	Filesystem *Filesystem `json:"filesystem,omitempty"`
	Network    *Network    `json:"network,omitempty"`
	Resources  *Resources  `json:"resources,omitempty"`
	Process    *Process    `json:"process,omitempty"`
}

// Filesystem holds the path rules.
type Filesystem struct {
	ReadOnly  []string `json:"read_only"`
	ReadWrite []string `json:"read_write"`
	Blocked   []string `json:"blocked"`
}

// Network holds the egress rules.
type Network struct {
	Allow         []string `json:"allow"`
	BlockOutbound *bool    `json:"block_outbound,omitempty"`
}

// Resources holds the limits. Timeout is in seconds.
type Resources struct {
	CPU     string `json:"cpu,omitempty"`
	Memory  string `json:"memory,omitempty"`
	Timeout *int   `json:"timeout,omitempty"`
	Disk    string `json:"disk,omitempty"` // every byte the sandbox can write (ours)
}

// Process holds the process rules (ours).
type Process struct {
	AllowSpawn *bool `json:"allow_spawn,omitempty"`
}

// CreateSandboxResponse is the body of a 201/202 answer to create.
type CreateSandboxResponse struct {
	SandboxID string    `json:"sandbox_id"`
	Status    string    `json:"status"`
	Mode      string    `json:"mode"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Sandbox is the whole record of a sandbox (GET /api/sandbox/{id}).
type Sandbox struct {
	SandboxID     string          `json:"sandbox_id"`
	AgentID       string          `json:"agent_id"`
	Status        string          `json:"status"`
	Mode          string          `json:"mode"`
	Config        json.RawMessage `json:"config"`
	CreatedAt     time.Time       `json:"created_at"`
	ReadyAt       *time.Time      `json:"ready_at"`
	ExpiresAt     time.Time       `json:"expires_at"`
	DestroyedAt   *time.Time      `json:"destroyed_at"`
	DestroyReason *string         `json:"destroy_reason"`
	Error         json.RawMessage `json:"error"`
	ImageDigest   string          `json:"image_digest,omitempty"` // of the image it ran, when known
	Runs          RunCounts       `json:"runs"`
	Usage         SandboxUsage    `json:"usage"`
}

// RunCounts counts a sandbox's runs.
type RunCounts struct {
	Total  int `json:"total"`
	Active int `json:"active"`
}

// SandboxUsage is what a sandbox has consumed.
type SandboxUsage struct {
	CPUSeconds      float64 `json:"cpu_seconds"`
	MemoryPeakBytes int64   `json:"memory_peak_bytes"`
	BilledMinutes   int64   `json:"billed_minutes"`
	DiskUsedBytes   int64   `json:"disk_used_bytes"` // on its disk: now, or when it was destroyed
}

// SandboxList is the body of GET /api/sandbox.
type SandboxList struct {
	Sandboxes []Sandbox `json:"sandboxes"`
	Total     int       `json:"total"`
	Page      int       `json:"page"`
}

// RunRequest is the body of POST /api/sandbox/{id}/run.
type RunRequest struct {
	Code    *string           `json:"code"`
	Timeout *int              `json:"timeout,omitempty"`
	Async   bool              `json:"async,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	// Context runs the code in that code context's interpreter ("ctx_…"); empty: a fresh process.
	Context string `json:"context,omitempty"`
}

// CodeContext is a code context object: a long-lived interpreter of a sandbox that runs with
// "context" execute in.
type CodeContext struct {
	ContextID   string     `json:"context_id"`
	SandboxID   string     `json:"sandbox_id"`
	Status      string     `json:"status"`       // ready, reset (its interpreter ended: reset_reason), deleted
	ResetReason *string    `json:"reset_reason"` // why it was reset or deleted
	CreatedAt   time.Time  `json:"created_at"`
	DeletedAt   *time.Time `json:"deleted_at"`
	Runs        int        `json:"runs"` // runs executed in it
}

// ContextList is the answer of GET /api/sandbox/{id}/contexts, oldest first.
type ContextList struct {
	Contexts []CodeContext `json:"contexts"`
	Total    int           `json:"total"`
}

// ContextReset says that a run in a context found its interpreter fresh, and why.
type ContextReset struct {
	Reason string `json:"reason"`
}

// Run is a run object.
type Run struct {
	RunID           string          `json:"run_id"`
	SandboxID       string          `json:"sandbox_id"`
	Status          string          `json:"status"`
	ExitCode        *int            `json:"exit_code"`
	Stdout          string          `json:"stdout"`
	Stderr          string          `json:"stderr"`
	StdoutTruncated bool            `json:"stdout_truncated"`
	StderrTruncated bool            `json:"stderr_truncated"`
	Result          json.RawMessage `json:"result"`
	Error           json.RawMessage `json:"error"`
	CreatedAt       time.Time       `json:"created_at"`
	StartedAt       *time.Time      `json:"started_at"`
	FinishedAt      *time.Time      `json:"finished_at"`
	DurationMS      *int64          `json:"duration_ms"`
	Usage           RunUsage        `json:"usage"`
	Network         RunNetwork      `json:"network"`
	Context         *string         `json:"context"`                 // the code context it ran in; null: a fresh process
	ContextReset    *ContextReset   `json:"context_reset,omitempty"` // its context's interpreter was fresh (state lost), and why
	// Display is the repr() of the code's trailing expression (as a notebook shows it); null when
	// the code ends in no expression or its value is None.
	Display *string `json:"display"`
	// Outputs are the run's rich outputs, in order: display() calls, the trailing expression's
	// rich form (a DataFrame's HTML), matplotlib figures left open; each a file of the files API.
	Outputs []RunOutput `json:"outputs"`
	// OutputsTruncated: some outputs were left out (over 32 items or 8 MiB, or malformed).
	OutputsTruncated bool `json:"outputs_truncated"`
}

// RunOutput is one rich output of a run: a read-only file at Path (GET /api/sandbox/{id}/files?path=…),
// kept while the sandbox lives.
type RunOutput struct {
	Type string `json:"type"` // MIME type: image/png, image/jpeg, image/svg+xml, text/html, text/markdown, application/json or text/plain
	Kind string `json:"kind"` // "result" (the trailing expression), "display" (a display() call) or "figure" (matplotlib)
	Path string `json:"path"` // /.outputs/<run_id>/<n>.<ext>
	Size int64  `json:"size"` // bytes
}

// RunNetwork counts a run's egress attempts (each one is in the audit log).
type RunNetwork struct {
	Allowed int64 `json:"allowed"`
	Denied  int64 `json:"denied"`
}

// RunUsage is what one run consumed.
type RunUsage struct {
	CPUMS           int64 `json:"cpu_ms"`
	MemoryPeakBytes int64 `json:"memory_peak_bytes"`
}

// RunAccepted is the body of a 202 answer to an async run.
type RunAccepted struct {
	RunID     string `json:"run_id"`
	SandboxID string `json:"sandbox_id"`
	Status    string `json:"status"`
}

// RunList is the body of GET /api/sandbox/{id}/runs.
type RunList struct {
	Runs  []Run `json:"runs"`
	Total int   `json:"total"`
	Page  int   `json:"page"`
}

// Event is an audit event.
type Event struct {
	EventID   string          `json:"event_id"`
	Type      string          `json:"type"`
	At        time.Time       `json:"at"`
	SandboxID *string         `json:"sandbox_id"`
	RunID     *string         `json:"run_id"`
	AgentID   *string         `json:"agent_id"`
	Detail    json.RawMessage `json:"detail"`
}

// EventList is the body of GET /api/audit.
type EventList struct {
	Events []Event `json:"events"`
	Total  int     `json:"total"`
	Page   int     `json:"page"`
}

// UsageDay is one day of usage.
type UsageDay struct {
	Day           string  `json:"day"`
	Sandboxes     int     `json:"sandboxes"`
	BilledMinutes int64   `json:"billed_minutes"`
	CPUSeconds    float64 `json:"cpu_seconds"`
	Runs          int     `json:"runs"`
}

// Usage is the body of GET /api/usage.
type Usage struct {
	From          time.Time  `json:"from"`
	To            time.Time  `json:"to"`
	BilledMinutes int64      `json:"billed_minutes"`
	CPUSeconds    float64    `json:"cpu_seconds"`
	Runs          int        `json:"runs"`
	Days          []UsageDay `json:"days"`
}

// Image is an approved image.
type Image struct {
	Name    string `json:"name"`
	Mode    string `json:"mode"`
	Digest  string `json:"digest"`
	Size    int64  `json:"size_bytes,omitempty"`     // of its unpacked root, when known
	Python  string `json:"python_version,omitempty"` // "3.11", when known
	Runtime string `json:"runtime,omitempty"`        // container mode: crun, runc or runsc
	Base    string `json:"base,omitempty"`           // a WASM image of pure-Python packages: the WASM image it adds them to
	// Packages are the Python distributions the image holds (from their dist-info and egg-info
	// metadata), gathered once when the image was imported or the server started; empty for an
	// image of the standard library only, or while it is being built.
	Packages []ImagePackage `json:"packages"`
	Default  bool           `json:"default"`
	ImageState
}

// ImagePackage is one Python distribution an image holds.
type ImagePackage struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// ImageState is whether an image can be used: "ready", or "building" (the server builds it in
// the background; creates asking for it get 503 image_not_ready until it is ready) or "failed".
type ImageState struct {
	Status         string   `json:"status"`                     // ready, building or failed
	ReadyInSeconds *int     `json:"ready_in_seconds,omitempty"` // building: the estimated time left
	Progress       *float64 `json:"progress,omitempty"`         // building: the share of the estimated time elapsed (0–0.99)
	Error          string   `json:"error,omitempty"`            // failed: why
	Log            string   `json:"log,omitempty"`              // building, failed: the build's log file on the server
}

// ImageList is the body of GET /api/images.
type ImageList struct {
	Images []Image `json:"images"`
}

// Health is the body of GET /health.
type Health struct {
	Status   string                `json:"status"`
	Version  string                `json:"version"`
	Runtimes map[string]string     `json:"runtimes"`
	Images   map[string]ImageState `json:"images,omitempty"` // by image name
}

// Error is the error envelope every failure answers with.
type Error struct {
	Error   string `json:"error"`
	Message string `json:"message"`
	Code    int    `json:"code"`
	Docs    string `json:"docs"`
}

// FileWritten is the body of a 201 answer to PUT /api/sandbox/{id}/files?path=…
type FileWritten struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // hex of the bytes stored (also the file's ETag on download)
}

// FileEntry is one entry of a directory listing.
type FileEntry struct {
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	Type       string    `json:"type"` // "file", "dir", "symlink" or "other"
	ModifiedAt time.Time `json:"modified_at"`
}

// FileList is the body of GET /api/sandbox/{id}/files?path=<a directory>.
type FileList struct {
	Path    string      `json:"path"`
	Entries []FileEntry `json:"entries"`
}

// OutputChunk is the data of a "stdout" or "stderr" event of GET …/runs/{run_id}/events (a
// text/event-stream). Each event's id is "<stdout bytes>.<stderr bytes>" sent so far, including
// this chunk: a client that reconnects with Last-Event-ID gets the rest. The stream ends with one
// "end" event whose data is the final Run.
type OutputChunk struct {
	Data string `json:"data"`
}
