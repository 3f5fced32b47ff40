// Package driver defines how sandboxd runs sandboxes: one small interface, keyed by sandbox ID,
// that every runtime (container, wasm) implements, and a registry of drivers by name in the
// manner of database/sql.
//
// A user program that fails, times out or is OOM-killed is a *result* (ExecResult.Status), never a
// Go error: errors are reserved for the driver itself failing. Classify turns what a driver saw of
// a run's end into its status, the same way for every driver.
package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/hostfs"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// IDsPerSandbox is how many host uids, and as many gids, a sandbox has: Spec.HostIDs and the ones
// after it. No two live sandboxes share one, so no per-user kernel limit (inotify instances,
// pipe buffers, message queues, pending signals, processes) is shared between sandboxes. The
// container driver maps a container's ids 0…IDsPerSandbox-1 onto them (a user namespace).
const IDsPerSandbox = 1 << 16

// SandboxUser is the uid and gid code runs as, counted from a sandbox's first id: uid 10000 in a
// container, HostIDs+SandboxUser on the host (the owner of the files a sandbox writes).
const SandboxUser = 10000

// HelperIDs are the host ids of the drivers' own short-lived containers that are no sandbox
// (runtime probes, benchmark baselines): a range no sandbox is given (the service's id range
// must end before it).
const HelperIDs uint32 = 1<<31 - IDsPerSandbox

// Mount is a host directory bound into the sandbox at Path.
type Mount struct {
	Path string // absolute, clean path inside the sandbox
	// HostDir is the absolute host directory, owned by the service, that backs Path. Every user
	// must be able to traverse the directories leading to it (a container's user namespace
	// resolves it); the driver makes it the sandbox user's.
	HostDir  string
	ReadOnly bool // the sandbox can read but never write (the host side still can)
}

// Spec is everything a driver needs to provision one sandbox.
type Spec struct {
	RootFS string // host directory of the image's root filesystem (never written)
	// SitePackages, when set, is a host directory of pure-Python packages the sandbox's Python
	// imports (never written; readable by every user): the wasm driver mounts it read-only as
	// the guest's site-packages. A WASM image of the operator's (sandbox.Image.SitePackages);
	// the container driver refuses it (its images hold their packages).
	SitePackages string
	Mounts       []Mount  // read_only and read_write paths
	Blocked      []string // paths made inaccessible, whatever the image or a mount holds
	CPU          float64  // cores (0.5 = half a core)
	MemoryBytes  int64    // memory limit of the whole sandbox
	PidsLimit    int64    // process-count limit of the whole sandbox
	// DiskBytes is the sandbox's disk limit (resources.disk): the size of the disk that backs
	// TmpDir, WorkDir and the Mounts. Drivers that keep their sandboxes' files themselves
	// (Filer: kubernetes), for which those host directories are empty, apply it to what replaces
	// them.
	DiskBytes int64
	// TmpDir is the host directory that backs the sandbox's /tmp (on its disk, like the HostDirs
	// of Mounts: its size bounds them together; traversable like them).
	TmpDir string
	// WorkDir is the host directory that backs every run's working directory, pyrunner.WorkDir
	// (on the disk too); the driver empties it after every run.
	WorkDir string
	// HostReady, if set, waits until the host directories above (TmpDir, WorkDir, the Mounts'
	// HostDirs) exist — the service makes the sandbox's disk while the driver sets up the rest —
	// and returns what kept them from existing. The driver calls it before it uses them.
	HostReady func() error
	// HostIDs is the first of the sandbox's IDsPerSandbox host uids and gids (> 0): every process
	// of the sandbox runs as one of them, and no other live sandbox has them.
	HostIDs    uint32
	AllowSpawn bool // whether run code may start subprocesses
	// Runtime is the OCI runtime of this sandbox (container driver: "crun", "runc" or "runsc";
	// "": the driver's, Options.Runtime). The image's choice (sandbox.Image.Runtime).
	Runtime string
	// Network is the egress policy. Drivers without networking (wasm) refuse a policy that asks
	// for egress; the container driver gives every sandbox its own network namespace.
	Network egress.Policy
}

// Stream names an output stream of a run.
type Stream string

const (
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
)

// ExecRequest is one run: a fresh Python process executing Code.
type ExecRequest struct {
	Code      string
	Timeout   time.Duration     // wall-clock limit of the run; the process tree is killed after it
	Env       map[string]string // extra environment variables
	MaxOutput int               // bytes kept per stream; the rest is counted and flagged
	// OnOutput, when set, receives output chunks as they are written (before truncation is
	// decided, at most MaxOutput bytes per stream). It must not block for long.
	OnOutput func(s Stream, p []byte)
	// Context, when set, runs Code in that code context's long-lived interpreter (Contexter)
	// instead of a fresh process: its globals, imports, open files and working directory are
	// those the context's earlier runs left. A timeout or cancel: the container driver interrupts
	// the code (KeyboardInterrupt) and keeps the interpreter if the code stops within a grace
	// period; the wasm driver kills the sandbox's worker, which resets every context of the
	// sandbox (WASI has no signals; ContextLost, and ContextRestarted at each one's next run).
	Context string
	// Agent is who the run is, as its `agent` object says (agent.id, .sandbox_id, .run_id).
	Agent AgentInfo
	// OnAgentCall answers the run's agent.run/agent.call requests (see package pyrunner, agent.go:
	// the agent channel): the driver passes each validated request on, one at a time, while the
	// run waits for its answer, and gives the run the answer — the endpoint's JSON, or the error,
	// an *AgentError to say which (any other error is an AgentCallError without status). ctx ends
	// when the run does. nil: every call is refused (AgentCallError). It may block (it is the
	// endpoint's time), but its answer is only of use before the run's deadline.
	OnAgentCall func(ctx context.Context, c AgentCall) (json.RawMessage, error)
}

// AgentInfo is who a run is (pyrunner.AgentInfo).
type AgentInfo = pyrunner.AgentInfo

// AgentCall is one request of a run's `agent` object (pyrunner.AgentCall).
type AgentCall = pyrunner.AgentCall

// AgentError is why an agent call got no answer: NotConfigured (no endpoint for the agent_id:
// AgentNotConfigured in the run), else an AgentCallError with Status (the endpoint's HTTP status,
// or 0).
type AgentError struct {
	NotConfigured bool
	Status        int
	Message       string
}

func (e *AgentError) Error() string { return e.Message }

// AnswerAgentCall is what drivers do with a request line a run wrote on its agent channel: it
// validates it (pyrunner.ParseAgentCall), has req.OnAgentCall answer it, and returns the answer
// line for the run (without its newline).
func AnswerAgentCall(ctx context.Context, req ExecRequest, line []byte) []byte {
	c, err := pyrunner.ParseAgentCall(line)
	if err != nil {
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 400, err.Error())
	}
	if req.OnAgentCall == nil {
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "agent calls are not served to this run")
	}
	res, err := req.OnAgentCall(ctx, c)
	var ae *AgentError
	switch {
	case errors.As(err, &ae) && ae.NotConfigured:
		return pyrunner.AgentRefusal(pyrunner.AgentNotConfigured, 0, ae.Message)
	case errors.As(err, &ae):
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, ae.Status, ae.Message)
	case err != nil:
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, err.Error())
	}
	var out bytes.Buffer // one line: the answer's whitespace (newlines) out
	if err := json.Compact(&out, res); err != nil {
		return pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "the answer is not JSON")
	}
	return pyrunner.AgentAnswer(out.Bytes())
}

// Status is the outcome of a run, as the API reports it.
type Status string

const (
	StatusCompleted Status = "completed" // exit 0
	StatusFailed    Status = "failed"    // non-zero exit or uncaught exception
	StatusTimeout   Status = "timeout"   // killed at the timeout
	StatusCancelled Status = "cancelled" // killed because the caller's ctx ended
	StatusOOM       Status = "oom"       // killed by the memory limit
)

// PyError describes an uncaught Python exception.
type PyError struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback"`
}

// ExecResult is what a run produced.
type ExecResult struct {
	Status          Status
	ExitCode        int // the process's exit code; 128+signal when killed by a signal
	Signal          int // the signal that killed the process (0: it exited, or the driver killed it)
	Stdout, Stderr  []byte
	StdoutTruncated bool
	StderrTruncated bool
	Result          json.RawMessage // JSON of the global `result`; nil when unset
	Error           *PyError        // uncaught exception, if any
	// Display is the repr() of the code's trailing expression (nil: none, or None); Outputs its
	// rich outputs (display() calls, the trailing value's rich form, matplotlib figures), validated
	// (pyrunner.DecodeRich); OutputsTruncated: some were left out.
	Display          *string
	Outputs          []pyrunner.Output
	OutputsTruncated bool
	Started          time.Time
	Duration         time.Duration
	CPU              time.Duration // user+system CPU time of the run's processes
	MemoryPeak       int64         // peak resident memory of the run, bytes
	// ContextLost (a run in a context): the context's interpreter ended during this run, and why;
	// its state is gone, and its next run starts a fresh interpreter.
	ContextLost string
	// ContextRestarted (a run in a context): the context's interpreter had ended before this run
	// (why), so this run started a fresh one.
	ContextRestarted string
}

// SetRich sets res's Display, Outputs and OutputsTruncated from the rich part of a runner's
// report (the code wrote it: pyrunner.DecodeRich validates it).
func (res *ExecResult) SetRich(r pyrunner.Rich) {
	res.Display, res.Outputs, res.OutputsTruncated = pyrunner.DecodeRich(r)
}

// Driver runs sandboxes. Implementations are safe for concurrent use across sandbox IDs; the
// service never calls Exec concurrently for one ID.
type Driver interface {
	// Name is the registry name, e.g. "container".
	Name() string
	// Check reports whether the runtime works on this host (for /health).
	Check(ctx context.Context) error
	// Create provisions sandbox id and returns once it can accept Exec. On error nothing of the
	// sandbox is left behind. Cancelling ctx aborts provisioning and cleans up.
	Create(ctx context.Context, id string, spec Spec) error
	// Exec runs one program in a ready sandbox and returns when it has ended. Cancelling ctx kills
	// the run and returns StatusCancelled. When Exec returns, no process of the run is left.
	// Errors: ErrNotFound for an unknown id; any other error means the driver failed.
	// A sandbox created by an earlier process of the service is run in only by a driver whose
	// sandboxes outlive its process (container); a driver whose sandboxes live in its process
	// (WASM) lists such a sandbox, so that it can be destroyed, but says ErrNotFound to Exec in it.
	// The conformance suite (package drivertest, Harness.Survives) holds drivers to this.
	Exec(ctx context.Context, id string, req ExecRequest) (ExecResult, error)
	// Destroy kills everything of sandbox id and removes its processes, mounts, cgroups, network
	// namespace and the driver's own state of it (the Mounts' HostDirs belong to the caller and
	// are left alone). Idempotent: destroying an unknown or destroyed id returns nil. It works for
	// sandboxes created by an earlier process of the service (after a crash), too.
	Destroy(ctx context.Context, id string) error
	// List returns the IDs of sandboxes that have resources on this host, including ones left by a
	// previous process of the service (for reconciliation at start-up).
	List(ctx context.Context) ([]string, error)
}

// NetworkSetter is implemented by drivers whose ready sandboxes can take another egress policy
// (the service gives a sandbox from its warm pool its owner's policy this way). p must have the
// shape of the policy the sandbox was created with — the same BlockOutbound, and Rules empty or
// not as before — or SetNetwork fails; from its return on, only p is enforced.
type NetworkSetter interface {
	SetNetwork(ctx context.Context, id string, p egress.Policy) error
}

// Warmer is implemented by drivers that go on starting a sandbox in the background after Create
// has returned (the container driver starts its zygote). Warm returns once that is done, or when
// ctx ends; the service's warm pool calls it, so that a warm sandbox is started all the way.
type Warmer interface {
	Warm(ctx context.Context, id string) error
}

// Killer is implemented by drivers that can kill every process of a sandbox at once, without
// releasing anything else. The service calls it when a stop's grace time has run out (or a second
// signal came) for sandboxes whose Destroy has not finished, then records them destroyed; what Kill
// leaves (mounts, network, state) goes with sandboxd's mount namespace or is removed by the next
// start's reconciliation (List still reports the sandbox). Idempotent; it does not block on the
// sandbox's processes (SIGKILL, no wait) and works while a Destroy of the same id runs.
type Killer interface {
	Kill(id string) error
}

// Contexter is implemented by drivers that keep code contexts: named, long-lived interpreters in
// a sandbox that runs with ExecRequest.Context execute in. A context lives until DeleteContext or
// its sandbox's Destroy. Both methods are idempotent; ErrNotFound for an unknown sandbox; they
// are never called concurrently with Exec for the same sandbox (the service serialises them with
// its runs). name is the service's context ID.
type Contexter interface {
	// CreateContext starts the context's interpreter and returns once it is ready.
	CreateContext(ctx context.Context, id, name string) error
	// DeleteContext ends the context's interpreter and removes its working directory.
	DeleteContext(ctx context.Context, id, name string) error
}

// Filer is implemented by drivers whose sandboxes keep their files where they run, not in Spec's
// host directories (kubernetes: in the pod, which the service's host never sees). For such a
// driver the service makes no host disk and leaves Spec.TmpDir, Spec.WorkDir and the Mounts'
// HostDirs empty (Spec.DiskBytes bounds what replaces them), and its files API reads and writes
// through these methods instead of the host directories.
//
// mount is the Path of one of the sandbox's Spec.Mounts; rel a slash-separated path relative to
// it ("" is the mount itself). rel is resolved beneath the mount as package hostfs does it: an
// absolute path, a ".." above the mount or a symlink leading out (whoever planted it, whenever)
// fails, and only regular files and directories are opened. The methods may be called
// concurrently, also with Exec; cancelling ctx ends the transfer. Errors wrap: ErrNotFound (an
// unknown sandbox); hostfs's kinds (ErrEscapes, ErrNotRegular, ErrTooLarge, ErrIsDir, ErrNotDir,
// ErrNotEmpty, ErrRoot); fs.ErrNotExist; unix.ENOSPC (the sandbox's disk is full); anything else
// is the driver failing.
type Filer interface {
	// WriteFile stores r as rel, creating its parent directories, atomically (readers see the old
	// file or the whole new one) and returns its size and hex SHA-256. More than limit bytes in r:
	// ErrTooLarge, and nothing is stored; the disk full: ENOSPC, and nothing is stored.
	WriteFile(ctx context.Context, id, mount, rel string, r io.Reader, limit int64) (size int64, sha256 string, err error)
	// OpenFile opens rel for reading: a regular file or a directory (Info.Type "file" or "dir").
	OpenFile(ctx context.Context, id, mount, rel string) (File, hostfs.Info, error)
	// RemoveFile removes the file rel, or the directory rel if it is empty (ErrNotEmpty otherwise);
	// a symlink is removed itself.
	RemoveFile(ctx context.Context, id, mount, rel string) error
	// DiskUsage returns the bytes the sandbox's files use of its disk (Spec.DiskBytes).
	DiskUsage(ctx context.Context, id string) (int64, error)
}

// File is an open file or directory of a sandbox (Filer.OpenFile; *hostfs.File is one). Read and
// Seek read a file's content as it was opened (the same file, whatever replaces its name
// meanwhile); ReadDir lists a directory, sorted by name, entries not followed; SHA256 is the
// hex SHA-256 of a file's content. Close it.
type File interface {
	io.ReadSeekCloser
	ReadDir() ([]hostfs.Info, error)
	SHA256() (string, error)
}

// ErrUnsupported is returned (wrapped) by a driver for what it cannot do in a sandbox.
var ErrUnsupported = errors.New("not supported by this driver")

// ErrNotFound is returned by Exec for a sandbox the driver does not know.
var ErrNotFound = errors.New("sandbox not found in driver")

// GoneError is the ErrNotFound of a sandbox that ended by itself, with why (the kubernetes driver:
// its pod was evicted, failed, or was deleted by someone else). Exec returns it for such a
// sandbox; the service then ends the sandbox (destroy reason sandbox_lost, with Reason) instead
// of failing every later run. Reason is fit for the API's users.
type GoneError struct {
	ID     string
	Reason string
}

func (e *GoneError) Error() string { return "sandbox " + e.ID + " is gone, " + e.Reason }

// Unwrap makes a GoneError an ErrNotFound.
func (e *GoneError) Unwrap() error { return ErrNotFound }

// ReplicaDestroyer is implemented by drivers whose sandboxes any replica sharing the store can
// reach — they do not die with the host of the replica that made them (kubernetes: pods of the one
// cluster). When a replica is declared lost, the replica that declared it destroys what it left
// through this. Drivers whose sandboxes live on their replica's host (container, wasm) do not
// implement it: those went with the host.
type ReplicaDestroyer interface {
	// DestroyReplica destroys, as Destroy does, every sandbox the driver of replica made before
	// before (warm ones included, which have no record), and returns how many it destroyed once
	// they are gone. Sandboxes made at or after before are left: the replica may have come back.
	// Idempotent; ctx bounds the wait.
	DestroyReplica(ctx context.Context, replica string, before time.Time) (int, error)
}

// Factory opens a driver from its options.
type Factory func(opts Options) (Driver, error)

// Options configure a driver.
type Options struct {
	StateDir string // host directory the driver owns for its state: runtime state, per-sandbox dirs
	AgentBin string // path of the static sandbox-agent binary (container driver)
	Runtime  string // OCI runtime of sandboxes whose Spec names none: "crun", "runc", "runsc" (gVisor), or "" to detect crun or runc
	RunscBin string // gVisor's runsc binary (container driver; "": runsc in PATH, if any): scripts/build-runsc.sh

	// Egress (container driver). Resolver resolves names for the egress gateway (nil: the host's
	// resolver); NetworkPool is where sandbox addresses come from (zero: the driver's default);
	// OnNetwork receives every egress decision (may be nil). OnNetwork must not block for long.
	Resolver    egress.Resolver
	NetworkPool netip.Prefix
	OnNetwork   func(egress.Decision)

	// WASM driver. WasmWorker is the command (program and leading arguments) that starts a worker
	// process; the driver appends the worker's own flags. Empty: this executable's hidden
	// "wasm-worker" subcommand (tests set their own test binary). WasmPool is how many idle,
	// compiled workers the driver keeps per image (0: its default, 2).
	WasmWorker []string
	WasmPool   int

	// Logger receives what the driver logs (nil: nothing is logged; see Log). Drivers name a
	// sandbox with the attribute "sandbox" (its id), an error with "err", an image with "image",
	// as the service does; the caller adds which driver it is (serve: "driver", the name).
	Logger *slog.Logger

	// Kubernetes driver. Kubeconfig is the path of the kubeconfig it talks to the cluster with,
	// Namespace the namespace of its pods ("": "default"); ClusterImages maps an image's RootFS
	// (Spec.RootFS) to what the cluster runs for it; AgentImage is the pinned reference of the
	// cluster image (package kubernetes: WriteImage); Replica tells this service's pods from
	// another's in the same namespace ("": "default"); CPURequest is the share of a sandbox's CPU
	// limit its pod requests from the scheduler, in (0, 1] (0: the driver's default).
	Kubeconfig    string
	Namespace     string
	ClusterImages map[string]ClusterImage
	AgentImage    string
	Replica       string
	CPURequest    float64
	Kubelet       KubeletLimits
}

// KubeletLimits is what the operator declares every kubelet of the cluster sets (the config
// file's "kubelet"): the kubernetes driver cannot read a kubelet's configuration without a
// permission that also allows exec into every pod, and Kubernetes has no pids limit per pod.
type KubeletLimits struct {
	PodPidsLimit         int64 `json:"pod_pids_limit"`          // the kubelets' podPidsLimit (0: none declared)
	SingleProcessOOMKill bool  `json:"single_process_oom_kill"` // the kubelets' singleProcessOOMKill
}

// ClusterImage is an image as a Kubernetes cluster runs it: Ref, a reference pinned by digest
// (REPO@sha256:…), and RuntimeClass, the pods' RuntimeClass ("": the cluster's default; e.g. a
// gVisor one).
type ClusterImage struct {
	Ref          string `json:"ref"`
	RuntimeClass string `json:"runtime_class,omitempty"`
}

// Log returns o.Logger, or a logger that discards everything when it is nil. Drivers log through
// it, never through the global logger.
func (o Options) Log() *slog.Logger {
	if o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

var (
	mu        sync.Mutex
	factories = map[string]Factory{}
)

// Register makes a driver available by name; it panics on a duplicate name.
func Register(name string, f Factory) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := factories[name]; dup {
		panic("driver: Register called twice for " + name)
	}
	factories[name] = f
}

// Open opens the driver registered as name.
func Open(name string, opts Options) (Driver, error) {
	mu.Lock()
	f, ok := factories[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("driver %q is not registered (have %v)", name, Names())
	}
	return f(opts)
}

// Names lists the registered drivers, sorted.
func Names() []string {
	mu.Lock()
	defer mu.Unlock()
	var names []string
	for n := range factories {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
