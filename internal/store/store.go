// Package store keeps sandboxd's records — accounts, API keys, sandboxes, runs and audit events —
// behind one interface. Records are never deleted: a destroyed sandbox keeps its record for billing
// and audit. Implementations: sqlite (embedded, default) and postgres (one database shared by
// several API replicas). Every implementation passes the shared conformance suite in storetest.
//
// # Finality
//
// A run whose status is final (anything but queued and running) and a sandbox whose status is
// final (destroyed, error) are never written again: UpdateRun, RecordRun and UpdateSandbox
// return ErrFinal and write nothing. That is what makes a run or a sandbox end exactly once when
// two writers race to end it (the replica running it, and a replica recovering the runs of a lost
// one): the first wins, the second is told.
//
// All times are UTC. Methods block on the database and honour ctx cancellation.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"time"
)

// Errors the store classifies; wrap-aware (use errors.Is).
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("already exists")
	ErrQuota    = errors.New("concurrency limit reached")
	// ErrFinal: the record is final (see Finality) and was left as it is.
	ErrFinal = errors.New("already final")
	// ErrReplicaLost: the replica was declared lost (see MarkStaleReplicas); it must drop what it
	// holds and register again.
	ErrReplicaLost = errors.New("replica declared lost")
	// ErrUnavailable: the database could not be reached (connection refused or lost); the
	// operation may or may not have been applied.
	ErrUnavailable = errors.New("database unavailable")
)

// Account owns API keys and sandboxes.
type Account struct {
	ID        string // "acct_…"
	Name      string // unique
	Plan      string // "free", "pro", "enterprise" (limits live in the service's plan table)
	CreatedAt time.Time
}

// Sandbox statuses. Live ones are provisioning, ready and running.
const (
	SandboxProvisioning = "provisioning"
	SandboxReady        = "ready"
	SandboxRunning      = "running"
	SandboxDestroyed    = "destroyed"
	SandboxError        = "error"
)

// LiveStatuses are the statuses that count against a plan's concurrency limit.
var LiveStatuses = []string{SandboxProvisioning, SandboxReady, SandboxRunning}

// Sandbox is one sandbox's record.
type Sandbox struct {
	ID            string
	AccountID     string
	AgentID       string
	Mode          string
	Status        string
	Config        json.RawMessage // the normalised config, as the API echoes it
	CreatedAt     time.Time
	ReadyAt       *time.Time
	ExpiresAt     time.Time
	DestroyedAt   *time.Time
	DestroyReason string          // "", "deleted", "expired", "error", "server_restart", "replica_lost"
	Error         json.RawMessage // nil or {"error": code, "message": text}
	DiskUsedBytes int64           // bytes used on its disk: the last figure recorded while it lived
	ImageDigest   string          // the digest of the image it ran ("sha256:<hex>"; "" when unknown); set at create
	// Replica is the ID of the replica that owns it (its driver runs it on that replica's host):
	// set at create; "" for records made before replicas existed.
	Replica string
}

// FinalRun reports whether a run status is final.
func FinalRun(status string) bool { return status != "queued" && status != "running" }

// Replica is one `sandboxd serve` process sharing the database: an API replica.
type Replica struct {
	ID          string // "rep_…", stable across restarts (kept in its data directory)
	Address     string // the URL its API is reached at
	StartedAt   time.Time
	HeartbeatAt time.Time  // its last heartbeat, by the database's clock
	LostAt      *time.Time // when it was declared lost (nil: it is not)
}

// Lock is a held leadership lock (TryLock).
type Lock interface {
	// Release gives the lock up; it is idempotent.
	Release()
}

// Run is one execution's record.
type Run struct {
	ID              string
	SandboxID       string
	AccountID       string
	Status          string // queued, running, completed, failed, timeout, cancelled, oom, error
	Code            string
	TimeoutSeconds  int
	Async           bool
	ExitCode        *int
	Stdout          string
	Stderr          string
	StdoutTruncated bool
	StderrTruncated bool
	Result          json.RawMessage // nil when unset
	Error           json.RawMessage // nil, or {"type","message","traceback"}
	CreatedAt       time.Time
	StartedAt       *time.Time
	FinishedAt      *time.Time
	DurationMS      int64
	CPUMS           int64
	MemoryPeakBytes int64
	NetworkAllowed  int64  // egress attempts allowed while the run ran
	NetworkDenied   int64  // egress attempts denied while the run ran
	Context         string // the code context it ran in ("": a fresh process)
	ContextReset    string // why its context's interpreter was fresh when state was expected ("": it was not)
	// Rich results: the repr of the code's trailing expression (nil: none), the run's outputs (in
	// order; their files are the service's), and whether some were left out.
	Display          *string
	Outputs          []RunOutput
	OutputsTruncated bool
}

// RunOutput is one rich output of a run, kept as a file the files API serves at Path.
type RunOutput struct {
	Type string `json:"type"` // MIME type
	Kind string `json:"kind"` // "result", "display" or "figure"
	Path string `json:"path"` // where the files API serves it: /.outputs/<run id>/<n>.<ext>
	Size int64  `json:"size"`
}

// Context statuses.
const (
	ContextReady   = "ready"   // its interpreter holds the state of its earlier runs
	ContextReset   = "reset"   // its interpreter ended (ResetReason); the next run starts a fresh one
	ContextDeleted = "deleted" // deleted, or its sandbox ended
)

// Context is a code context's record.
type Context struct {
	ID          string // "ctx_…"
	SandboxID   string
	AccountID   string
	Status      string
	ResetReason string // why it was reset or deleted ("" otherwise)
	CreatedAt   time.Time
	DeletedAt   *time.Time
	Runs        int // runs executed in it
}

// Event is one audit event.
type Event struct {
	ID        string // "evt_…"
	AccountID string
	Type      string // sandbox.created, run.finished, quota.denied, auth.failed, …
	At        time.Time
	SandboxID string          // may be empty
	RunID     string          // may be empty
	AgentID   string          // may be empty
	Detail    json.RawMessage // a JSON object; nil means {}
}

// SandboxFilter selects sandboxes; zero fields match everything. Results are newest first.
type SandboxFilter struct {
	AccountID string
	Status    string
	AgentID   string
	Offset    int
	Limit     int // 0 = no limit
}

// EventFilter selects audit events; zero fields match everything. Results are oldest first.
type EventFilter struct {
	AccountID string
	SandboxID string
	Type      string
	From, To  time.Time // From inclusive, To exclusive; zero = unbounded
	Offset    int
	Limit     int // 0 = no limit
}

// UsageDay is one UTC day of an account's usage. A sandbox's billed minutes (each started minute
// of its lifetime, from created_at to destroyed_at, or to now while live) count on the day it was
// created; runs and CPU count on the day the run was created.
type UsageDay struct {
	Day           string // "2026-04-06"
	Sandboxes     int
	BilledMinutes int64
	CPUSeconds    float64
	Runs          int
}

// BilledMinutes is the billed minutes of a lifetime from created to end: each started minute,
// and at least one (also when end is not after created).
func BilledMinutes(created, end time.Time) int64 {
	d := end.Sub(created)
	return max(int64((d+time.Minute-1)/time.Minute), 1)
}

// UsageDays sums usage by day, for implementations of Store.Usage: add each sandbox and each
// day's runs, then take the days.
type UsageDays map[string]*UsageDay

func (u UsageDays) day(d string) *UsageDay {
	x := u[d]
	if x == nil {
		x = &UsageDay{Day: d}
		u[d] = x
	}
	return x
}

// AddSandbox counts a sandbox created at created whose lifetime ends at end, on its creation day.
func (u UsageDays) AddSandbox(created, end time.Time) {
	x := u.day(created.UTC().Format(time.DateOnly))
	x.Sandboxes++
	x.BilledMinutes += BilledMinutes(created, end)
}

// AddRuns counts n runs created on day d ("2026-04-06") that used cpuMS of CPU.
func (u UsageDays) AddRuns(d string, n int, cpuMS int64) {
	x := u.day(d)
	x.Runs += n
	x.CPUSeconds += float64(cpuMS) / 1000
}

// Days returns the days, oldest first.
func (u UsageDays) Days() []UsageDay {
	out := make([]UsageDay, 0, len(u))
	for _, x := range u {
		out = append(out, *x)
	}
	slices.SortFunc(out, func(a, b UsageDay) int { return strings.Compare(a.Day, b.Day) })
	return out
}

// SandboxUsage sums one sandbox's runs.
type SandboxUsage struct {
	RunsTotal       int
	RunsActive      int // queued or running
	CPUMS           int64
	MemoryPeakBytes int64 // the largest of its runs' peaks
}

// Store is the persistence interface. Implementations are safe for concurrent use.
type Store interface {
	// CreateAccount adds an account; ErrConflict if the name is taken.
	CreateAccount(ctx context.Context, a Account) error
	// AccountByName returns the account called name, or ErrNotFound.
	AccountByName(ctx context.Context, name string) (Account, error)
	// AddKey stores the hash of a new API key for an account. The key itself is never stored.
	AddKey(ctx context.Context, accountID, keyID string, keyHash []byte, at time.Time) error
	// AccountByKeyHash returns the account owning the key with that hash, or ErrNotFound.
	AccountByKeyHash(ctx context.Context, keyHash []byte) (Account, error)

	// CreateSandbox inserts sb atomically with a concurrency check: if the account already has
	// limit or more live sandboxes it inserts nothing and returns ErrQuota. limit < 0 = unlimited.
	// The check holds across Store values and processes on the same database.
	CreateSandbox(ctx context.Context, sb Sandbox, limit int) error
	// UpdateSandbox overwrites the mutable fields (Status, ReadyAt, DestroyedAt, DestroyReason,
	// Error, DiskUsedBytes) of an existing record; ErrNotFound if there is none, ErrFinal (nothing
	// written) if its stored status is final.
	UpdateSandbox(ctx context.Context, sb Sandbox) error
	// GetSandbox returns a sandbox; accountID "" matches any account. ErrNotFound otherwise.
	GetSandbox(ctx context.Context, accountID, id string) (Sandbox, error)
	// ListSandboxes returns the page selected by f and the total number matching f.
	ListSandboxes(ctx context.Context, f SandboxFilter) ([]Sandbox, int, error)
	// LiveSandboxes returns every sandbox, of all accounts, whose status is live.
	LiveSandboxes(ctx context.Context) ([]Sandbox, error)
	// SandboxUsage sums the runs of one sandbox.
	SandboxUsage(ctx context.Context, sandboxID string) (SandboxUsage, error)

	// CreateRun inserts a run; ErrConflict on a duplicate ID.
	CreateRun(ctx context.Context, r Run) error
	// UpdateRun overwrites every field but ID, SandboxID, AccountID, Code and CreatedAt of the run
	// with r.ID; ErrNotFound if there is none, ErrFinal (nothing written) if its stored status is
	// final.
	UpdateRun(ctx context.Context, r Run) error
	// RecordRun writes a step of a run atomically: r as UpdateRun does, then sb as UpdateSandbox
	// does (when sb is not nil), then appends ev (when ev is not nil) — one commit instead of three
	// for each start and end of a run. Nothing is written if a part fails (ErrNotFound when the
	// run or the sandbox does not exist, ErrFinal when either is final).
	RecordRun(ctx context.Context, r Run, sb *Sandbox, ev *Event) error
	// StartRun records run r for the first time as it starts — a run that was never recorded
	// queued (a synchronous run that found its sandbox idle): sb as UpdateSandbox does, then r
	// inserted as CreateRun does, then ev appended (when not nil), in one commit instead of two.
	// Nothing is written if a part fails: ErrFinal when the sandbox is final (it ended before the
	// run could start), ErrNotFound when it does not exist, ErrConflict on a duplicate run ID.
	StartRun(ctx context.Context, r Run, sb Sandbox, ev *Event) error
	// RecordContextRun is RecordRun for a run in a code context that also writes c as
	// UpdateContext does (a deleted context is left as it is), in the same commit: a context run's
	// end and its context's run count and status. Nothing is written if a part fails.
	RecordContextRun(ctx context.Context, r Run, sb *Sandbox, ev *Event, c Context) error
	// GetRun returns one run of a sandbox, or ErrNotFound.
	GetRun(ctx context.Context, sandboxID, runID string) (Run, error)
	// ListRuns returns a sandbox's runs newest first, and their total.
	ListRuns(ctx context.Context, sandboxID string, offset, limit int) ([]Run, int, error)
	// EndOpenRuns sets every queued or running run of a sandbox to status with the given error
	// JSON and finish time, and returns how many it changed.
	EndOpenRuns(ctx context.Context, sandboxID, status string, errJSON json.RawMessage, at time.Time) (int, error)

	// CreateContext inserts c atomically with a limit check: if c's sandbox already has limit or
	// more contexts that are not deleted it inserts nothing and returns ErrQuota. ErrConflict on
	// a duplicate ID.
	CreateContext(ctx context.Context, c Context, limit int) error
	// UpdateContext overwrites Status, ResetReason, DeletedAt and Runs of the context with c.ID
	// unless it is deleted (a deleted record is final: it is left as it is, and that is no error);
	// ErrNotFound if there is none.
	UpdateContext(ctx context.Context, c Context) error
	// GetContext returns one context of a sandbox, or ErrNotFound.
	GetContext(ctx context.Context, sandboxID, id string) (Context, error)
	// ListContexts returns a sandbox's contexts, oldest first.
	ListContexts(ctx context.Context, sandboxID string) ([]Context, error)
	// EndContexts marks every context of a sandbox that is not deleted deleted, with reason and
	// DeletedAt at, and returns how many it changed.
	EndContexts(ctx context.Context, sandboxID, reason string, at time.Time) (int, error)

	// AddEvent appends an audit event; ErrConflict on a duplicate ID.
	AddEvent(ctx context.Context, e Event) error
	// ListEvents returns the page selected by f (oldest first) and the total matching f.
	ListEvents(ctx context.Context, f EventFilter) ([]Event, int, error)
	// Usage returns an account's usage per UTC day for days in [from, to), oldest first; days
	// with nothing are left out. now is the end of lifetime for live sandboxes.
	Usage(ctx context.Context, accountID string, from, to, now time.Time) ([]UsageDay, error)

	// RegisterReplica records replica id as alive at address, now: a new replica, or one starting
	// again (a lost one is not lost any more).
	RegisterReplica(ctx context.Context, id, address string) error
	// Heartbeat records that replica id is alive now; ErrReplicaLost (nothing written) if it was
	// declared lost or is not registered.
	Heartbeat(ctx context.Context, id string) error
	// MarkStaleReplicas declares lost every replica not lost yet whose last heartbeat is older
	// than staleAfter by the database's clock, and returns them.
	MarkStaleReplicas(ctx context.Context, staleAfter time.Duration) ([]Replica, error)
	// Replicas returns every registered replica, oldest first.
	Replicas(ctx context.Context) ([]Replica, error)
	// TryLock takes the leadership lock called name if no one holds it — in any process on the
	// same database — and returns it (nil and no error when someone else holds it). The lock is
	// held until Release, or until the holder's process or connection ends.
	TryLock(ctx context.Context, name string) (Lock, error)

	// Close releases the database.
	Close() error
}
