// Package sandbox owns the lifecycle of sandboxes and runs: validation and defaults, plan quotas,
// the state machine (provisioning → ready ⇄ running → destroyed | error), one FIFO run queue per
// sandbox, expiry, reconciliation at start-up, and the usage and audit records. It speaks neither
// HTTP nor a runtime's language: httpapi calls it, and it calls a driver.Driver and a store.Store.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/imagebuild"
	"github.com/sandboxd/sandboxd/internal/store"
)

// Modes of a sandbox.
const (
	ModeContainer = "container"
	ModeWASM      = "wasm"
)

// Destroy reasons.
const (
	ReasonDeleted       = "deleted"
	ReasonExpired       = "expired"
	ReasonError         = "error"
	ReasonServerRestart = "server_restart"
	// ReasonSandboxLost: the driver says the sandbox ended by itself (driver.GoneError: its pod
	// was evicted or failed); the record's error says why.
	ReasonSandboxLost = "sandbox_lost"
)

// Image is an approved image: a name users ask for, and the root filesystem behind it.
type Image struct {
	Name    string
	Mode    string
	RootFS  string
	Digest  string
	Size    int64  // bytes of the unpacked root, when known (GET /api/images)
	Python  string // its python3's version, when known
	Runtime string // container mode: the OCI runtime of its sandboxes ("crun", "runc", "runsc"; "": the server's)
	Default bool   // the mode's default image
	// Base, for a WASM image of the operator's (pure-Python packages), is the configured WASM
	// image (python.wasm and its standard library) it adds SitePackages to: a create resolves it
	// and runs the base's RootFS with SitePackages on sys.path (driver.Spec.SitePackages).
	Base         string
	SitePackages string
	// Packages are the Python distributions the image holds (GET /api/images), when known.
	Packages []api.ImagePackage
	// Generation, for a catalog image, tells its root from an earlier one of the same name and
	// digest (removed, then imported again): warm sandboxes are kept per generation, and those of
	// a generation the catalog no longer lists are destroyed (warmPool.prune). "" for
	// configured images.
	Generation string
	// Build, when set, is the build that makes the image while the service serves: RootFS and
	// Digest are the build's once it is ready; until then the image is listed with the build's
	// status and creates that ask for it fail with image_not_ready.
	Build *imagebuild.Build
}

// Plan holds an account's limits. MaxSandboxes < 0 means unlimited.
type Plan struct {
	MaxSandboxes int
	MaxCPU       float64
	MaxMemory    int64
	MaxDisk      int64 // resources.disk, at most
}

// DefaultPlans are the plans of API.md §6.
func DefaultPlans() map[string]Plan {
	return map[string]Plan{
		"free":       {MaxSandboxes: 3, MaxCPU: 1, MaxMemory: 1 << 30, MaxDisk: 1 << 30},
		"pro":        {MaxSandboxes: 50, MaxCPU: 4, MaxMemory: 8 << 30, MaxDisk: 20 << 30},
		"enterprise": {MaxSandboxes: -1, MaxCPU: 64, MaxMemory: 256 << 30, MaxDisk: 500 << 30},
	}
}

// Disk defaults.
const (
	DefaultDiskBytes     = 1 << 30 // resources.disk when a create does not say
	DefaultDiskFreeFloor = 1 << 30 // Config.DiskFreeFloor's default
)

// Config configures a Service.
type Config struct {
	DataDir string  // sandboxes' host directories live in DataDir/sandboxes/<id>
	Images  []Image // the approved list
	// Catalog, when set, returns more approved images (the operator's image store, read again
	// when it changes): asked at every create and GET /api/images. An image of Images shadows a
	// catalog image of the same name; catalog images are never a mode's default.
	Catalog       func() ([]Image, error)
	Plans         map[string]Plan
	ProvisionWait time.Duration // how long create waits for ready before answering 202 (default 10s)
	PidsLimit     int64         // process-count limit per sandbox (default 256)
	// DiskBytes is resources.disk when a create does not say (default DefaultDiskBytes, at most
	// the plan's MaxDisk). DiskFreeFloor: creates are refused (capacity_exhausted) while the data
	// directory's file system has less free space (default DefaultDiskFreeFloor).
	DiskBytes     int64
	DiskFreeFloor int64
	// Disks makes each sandbox's disk, mounted below MountDir (a mountns.Dir: containers' user
	// namespaces traverse it). nil: no disks — host directories are plain directories of the data
	// directory and nothing bounds them; for the tests of the layers above only (serve always
	// has disks).
	Disks          *disk.Manager
	MountDir       string
	IDs            IDRange  // host ids of sandboxes (zero: DefaultIDRange)
	HostCPUs       float64  // capacity of this host (default: the CPUs Go sees)
	HostMemory     int64    // capacity of this host (default: MemTotal)
	MaxUploadBytes int64    // per-file upload limit of the files API (default DefaultMaxUploadBytes)
	WarmPool       int      // provisioned sandboxes kept ready per shape asked for (0: none; see warmPool)
	Observer       Observer // receives measurements for metrics (nil: none)
	// Agents sends runs' agent calls to the operator's endpoints by agent_id (nil: none is
	// configured, every call is AgentNotConfigured).
	Agents *agentcall.Client
	// Replica is this service's replica ID among those sharing the store (default LocalReplica),
	// Address the URL its API is reached at; it heartbeats every HeartbeatEvery (default
	// DefaultHeartbeatEvery) and declares lost the replicas silent for StaleAfter (default
	// DefaultStaleAfter). See replicas.go.
	Replica        string
	Address        string
	HeartbeatEvery time.Duration
	StaleAfter     time.Duration
	// Logger receives the service's log records, which name a sandbox "sandbox" and a run "run"
	// (nil: nothing is logged). serve gives it and the drivers one logger.
	Logger *slog.Logger
}

// Service is the sandbox lifecycle. Create it with New; stop it with Close.
type Service struct {
	cfg     Config
	st      store.Store
	drivers map[string]driver.Driver // by mode
	log     *slog.Logger

	createMu sync.Mutex // serialises the quota check with the insert (the store checks too)
	mu       sync.Mutex
	live     map[string]*live
	hosts    map[string]*host // host sides provisioned, of live and warm sandboxes (see host.go)
	ids      *idAllocator
	closed   bool
	wg       sync.WaitGroup
	pool     *warmPool
	loop     *replicaLoop // heartbeats and sweeps (replicas.go)

	repMu        sync.Mutex               // guards the replicas' addresses (route.go) and healthySince
	repCache     map[string]store.Replica // by ID
	repRead      time.Time
	healthySince time.Time            // since when this replica's heartbeats succeed (replicas.go)
	swept        map[string]time.Time // lost replicas whose driver resources this one destroyed: their LostAt (sweep's goroutine only)
	lost         atomic.Bool          // declared lost: its sandboxes are being destroyed, creates are refused
}

// live is the in-memory state of a sandbox that has not been destroyed.
type live struct {
	id     string
	sp     spec
	warm   bool            // taken from the warm pool: provisioned already
	ctx    context.Context // ends when the sandbox is being destroyed
	cancel context.CancelFunc
	expiry *time.Timer
	ready  chan struct{} // closed when provisioning has ended, well or not
	// firstRun is closed when the sandbox's first run has ended or the sandbox's goroutine has
	// returned (firstRunEnded), and lastRunEnd is when its last run ended (unix ns; 0 while one
	// runs): the warm pool refills once they show the sandbox quiet (warmPool.replenishAfter).
	firstRun   chan struct{}
	firstOnce  sync.Once
	lastRunEnd atomic.Int64
	done       chan struct{} // closed when the sandbox's goroutine has returned
	gone       chan struct{} // closed when destroy has finished

	mu       sync.Mutex
	rec      store.Sandbox
	queue    []*job
	jobs     map[string]*job // queued and running
	wake     chan struct{}
	closing  bool // no more runs are accepted
	recorded bool // the destroyed record is written (record writes it once)
	destroy1 sync.Once

	net netCounters

	// execMu serialises what goes to the driver for this sandbox: runs and code-context operations.
	execMu sync.Mutex
}

type job struct {
	run    store.Run
	env    map[string]string
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed once run holds the final record
	out    *outputLog    // the run's output as written, for followers (FollowRun)

	finalMu sync.Mutex
	final   bool // the final record is written: execute does not write another (see endRuns)
	// unrecorded: the run has no record yet. A synchronous run that finds its sandbox idle is
	// recorded first as it starts (store.StartRun: one commit instead of two); nobody else knows
	// its ID before it ends, so nobody looks for its record meanwhile.
	unrecorded bool
	err        error          // the run could not be recorded: Run returns this instead of the run
	cx         *store.Context // an unrecorded run's context record, read as it was made (contextBefore)
}

// New opens the service: it reconciles what a previous process of this replica left (its live
// records are destroyed with reason server_restart, their runs ended, their host resources
// released), registers the replica and starts its heartbeat and sweep (replicas.go), and returns.
func New(ctx context.Context, cfg Config, st store.Store, drivers map[string]driver.Driver) (*Service, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("sandbox: Config.DataDir is required")
	}
	dir, err := filepath.Abs(cfg.DataDir) // host dirs handed to drivers must be absolute
	if err != nil {
		return nil, fmt.Errorf("sandbox: data dir: %w", err)
	}
	cfg.DataDir = dir
	if cfg.Plans == nil {
		cfg.Plans = DefaultPlans()
	}
	if cfg.ProvisionWait <= 0 {
		cfg.ProvisionWait = 10 * time.Second
	}
	if cfg.Observer == nil {
		cfg.Observer = noObserver{}
	}
	if cfg.PidsLimit <= 0 {
		cfg.PidsLimit = 256
	}
	if cfg.DiskBytes <= 0 {
		cfg.DiskBytes = DefaultDiskBytes
	}
	if cfg.DiskFreeFloor <= 0 {
		cfg.DiskFreeFloor = DefaultDiskFreeFloor
	}
	if cfg.IDs == (IDRange{}) {
		cfg.IDs = DefaultIDRange()
	}
	if err := cfg.IDs.Check(); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if cfg.Disks != nil && cfg.MountDir == "" {
		return nil, errors.New("sandbox: Config.MountDir is required with Config.Disks")
	}
	if cfg.HostCPUs <= 0 {
		cfg.HostCPUs = float64(runtime.NumCPU())
	}
	if cfg.HostMemory <= 0 {
		cfg.HostMemory = hostMemory()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Replica == "" {
		cfg.Replica = LocalReplica
	}
	if cfg.HeartbeatEvery <= 0 {
		cfg.HeartbeatEvery = DefaultHeartbeatEvery
	}
	if cfg.StaleAfter <= 0 {
		cfg.StaleAfter = DefaultStaleAfter
	}
	s := &Service{cfg: cfg, st: st, drivers: drivers, log: cfg.Logger, live: map[string]*live{},
		hosts: map[string]*host{}, ids: newIDAllocator(cfg.IDs)}
	if err := os.MkdirAll(s.sandboxesDir(), 0o711); err != nil {
		return nil, fmt.Errorf("sandbox: data dir: %w", err)
	}
	if err := s.reconcile(ctx); err != nil {
		return nil, err
	}
	if err := s.startReplica(ctx); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	s.pool = newWarmPool(s, cfg.WarmPool)
	if cfg.Catalog != nil {
		s.pool.watch(catalogWatch, func() { s.images() })
	}
	return s, nil
}

func (s *Service) sandboxesDir() string { return filepath.Join(s.cfg.DataDir, "sandboxes") }

// Images lists the approved images, each with its status (ready, or where its build is).
func (s *Service) Images() []api.Image {
	ims := s.images()
	out := make([]api.Image, 0, len(ims))
	for _, im := range ims {
		a := api.Image{Name: im.Name, Mode: im.Mode, Digest: im.Digest, Size: im.Size, Python: im.Python, Runtime: im.Runtime,
			Base: im.Base, Packages: im.Packages, Default: im.Default, ImageState: api.ImageState{Status: string(imagebuild.Ready)}}
		if a.Packages == nil {
			a.Packages = []api.ImagePackage{}
		}
		build := im.Build
		if im.Base != "" {
			// A WASM image of packages is as ready as its base; its Python is the base's.
			base, ok := s.base(ims, im)
			switch {
			case !ok:
				a.Status, a.Error = string(imagebuild.Failed), fmt.Sprintf("its base image %q is not served by this server", im.Base)
			case base.Python != "":
				a.Python = base.Python
			}
			build = base.Build
		}
		if build != nil {
			st := build.Status()
			a.Status = string(st.State)
			if im.Build != nil {
				a.Digest = st.Digest
			}
			switch st.State {
			case imagebuild.Building:
				left, progress := int(st.Left.Seconds()), math.Round(st.Progress*100)/100
				a.ReadyInSeconds, a.Progress, a.Log = &left, &progress, st.Log
			case imagebuild.Failed:
				a.Error, a.Log = st.Reason, st.Log
			}
		}
		out = append(out, a)
	}
	return out
}

// Health checks every driver; the map holds "ok" or the error per mode.
func (s *Service) Health(ctx context.Context) (map[string]string, bool) {
	out, ok := map[string]string{}, true
	for mode, d := range s.drivers {
		if err := d.Check(ctx); err != nil {
			out[mode], ok = err.Error(), false
		} else {
			out[mode] = "ok"
		}
	}
	return out, ok
}

// images is the approved list: the configured images, then the catalog's (those whose names
// the configured ones do not take). A catalog that cannot be read is logged and left out: the
// configured images still serve.
func (s *Service) images() []Image {
	if s.cfg.Catalog == nil {
		return s.cfg.Images
	}
	more, err := s.cfg.Catalog()
	if err != nil {
		s.log.Error("read the image catalog", "err", err)
		return s.cfg.Images
	}
	out := slices.Clip(s.cfg.Images)
	listed := map[string]bool{}
	for _, im := range more {
		if !slices.ContainsFunc(s.cfg.Images, func(c Image) bool { return c.Name == im.Name }) {
			im.Default = false
			out = append(out, im)
			listed[generationKey(im)] = true
		}
	}
	if s.pool != nil {
		s.pool.prune(listed)
	}
	return out
}

// generationKey names one generation of a catalog image (see Image.Generation).
func generationKey(im Image) string { return im.Name + "\x00" + im.Generation }

// base returns the configured WASM image im adds its packages to.
func (s *Service) base(ims []Image, im Image) (Image, bool) {
	i := slices.IndexFunc(ims, func(b Image) bool { return b.Name == im.Base && b.Mode == ModeWASM && b.Base == "" })
	if i < 0 {
		return Image{}, false
	}
	return ims[i], true
}

// onBase completes a WASM image of packages with its base's root (once the base is built).
func (s *Service) onBase(ims []Image, im Image) (Image, error) {
	b, ok := s.base(ims, im)
	if !ok {
		return Image{}, errorf(KindImageNotReady,
			"image %q adds packages to the WASM image %q, which this server does not serve: its operator starts sandboxd with --wasm-image or --wasm-build %s=…",
			im.Name, im.Base, im.Base)
	}
	if b.Build != nil {
		var err error
		if b, err = built(b); err != nil {
			return Image{}, err
		}
	}
	im.RootFS = b.RootFS
	if b.Python != "" {
		im.Python = b.Python
	}
	return im, nil
}

func (s *Service) resolveImage(name, mode string) (Image, error) {
	ims := s.images()
	for _, im := range ims {
		if (name == "" && im.Default && im.Mode == mode) || (name != "" && im.Name == name) {
			if im.Mode != mode {
				return Image{}, errorf(KindImageNotApproved, "image %q is approved for mode %q, not %q", name, im.Mode, mode)
			}
			if im.Base != "" {
				return s.onBase(ims, im)
			}
			if im.Build != nil {
				return built(im)
			}
			return im, nil
		}
	}
	if name == "" {
		return Image{}, errorf(KindUnsupported, "mode %q is not available on this server (no image is configured for it)", mode)
	}
	return Image{}, errorf(KindImageNotApproved, "image %q is not on the approved list (GET /api/images lists them)", name)
}

// built returns an image the server builds (Image.Build) once it is ready, or says why not.
func built(im Image) (Image, error) {
	st := im.Build.Status()
	switch st.State {
	case imagebuild.Ready:
		im.RootFS, im.Digest, im.Build = st.Dir, st.Digest, nil
		return im, nil
	case imagebuild.Building:
		return Image{}, &Error{Kind: KindImageNotReady, RetryAfter: st.Left, Message: fmt.Sprintf(
			"image %q is being built by the server (for %s so far): ready in about %s; try again then (GET /api/images shows its progress)",
			im.Name, roughly(time.Since(st.Started)), roughly(st.Left))}
	default:
		return Image{}, errorf(KindImageNotReady,
			"image %q is not available: the server's build of it failed (%s); its operator must fix the build (log: %s) and restart sandboxd",
			im.Name, st.Reason, st.Log)
	}
}

// roughly writes a duration for people: seconds under two minutes, else minutes.
func roughly(d time.Duration) string {
	if d < 2*time.Minute {
		return fmt.Sprintf("%d s", int(d.Round(time.Second).Seconds()))
	}
	return fmt.Sprintf("%d min", int(d.Round(time.Minute).Minutes()))
}

// Create validates req, records the sandbox and provisions it. It returns once the sandbox is
// ready, or after Config.ProvisionWait with status "provisioning" (provisioning goes on).
func (s *Service) Create(ctx context.Context, acct store.Account, req api.CreateSandboxRequest) (api.CreateSandboxResponse, error) {
	start := time.Now()
	resp, err := s.create(ctx, acct, req)
	outcome := resp.Status
	if err != nil {
		outcome = string(KindOf(err))
		if k := KindOf(err); k == KindConcurrencyLimit || k == KindCapacityExhausted {
			s.cfg.Observer.QuotaRejected(string(k))
		}
	}
	mode := req.Mode // a label of metrics: only the modes there are, whatever the request said
	switch mode {
	case "":
		mode = ModeContainer
	case ModeContainer, ModeWASM:
	default:
		mode = "invalid"
	}
	s.cfg.Observer.Created(mode, outcome, time.Since(start))
	return resp, err
}

func (s *Service) create(ctx context.Context, acct store.Account, req api.CreateSandboxRequest) (api.CreateSandboxResponse, error) {
	plan, ok := s.cfg.Plans[acct.Plan]
	if !ok {
		return api.CreateSandboxResponse{}, internal("unknown plan", fmt.Errorf("account %s has plan %q", acct.ID, acct.Plan))
	}
	sp, err := s.validateCreate(req, plan)
	if err != nil {
		return api.CreateSandboxResponse{}, err
	}
	drv, ok := s.drivers[sp.mode]
	if !ok {
		return api.CreateSandboxResponse{}, errorf(KindUnsupported, "mode %q is not available on this server", sp.mode)
	}
	if sp.cpu > s.cfg.HostCPUs || sp.memoryBytes > s.cfg.HostMemory {
		return api.CreateSandboxResponse{}, errorf(KindCapacityExhausted, "this host cannot fit %s cores and %s of memory", formatCPU(sp.cpu), formatMemory(sp.memoryBytes))
	}
	if err := s.checkFreeSpace(); err != nil {
		return api.CreateSandboxResponse{}, err
	}
	cfgJSON, err := json.Marshal(sp.config)
	if err != nil {
		return api.CreateSandboxResponse{}, internal("encode config", err)
	}
	now := now()
	rec := store.Sandbox{
		AccountID: acct.ID, AgentID: sp.agentID, Mode: sp.mode,
		Status: store.SandboxProvisioning, Config: cfgJSON, CreatedAt: now,
		ExpiresAt: now.Add(time.Duration(sp.timeout) * time.Second), ImageDigest: sp.image.Digest,
		Replica: s.cfg.Replica,
	}

	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return api.CreateSandboxResponse{}, errorf(KindUnavailable, "the service is shutting down")
	}
	if s.lost.Load() {
		return api.CreateSandboxResponse{}, &Error{Kind: KindUnavailable, RetryAfter: 5 * time.Second,
			Message: "this replica was cut off from the database and is registering again; try again"}
	}
	warmID, warm := s.pool.take(sp)
	first := make(chan struct{}) // the live sandbox closes it (firstRunEnded); else the defer below
	var lv *live
	defer func() {
		var quietSince func() time.Time
		if lv == nil {
			close(first)
		} else {
			quietSince = lv.quietSince
		}
		s.pool.replenishAfter(sp, first, quietSince)
	}()
	rec.ID = warmID
	if !warm {
		rec.ID = newID("sbx_")
	}
	s.createMu.Lock()
	err = s.st.CreateSandbox(ctx, rec, plan.MaxSandboxes)
	s.createMu.Unlock()
	if err != nil && warm {
		s.pool.give(sp, warmID)
	}
	if errors.Is(err, store.ErrQuota) {
		s.audit(ctx, store.Event{AccountID: acct.ID, Type: "quota.denied", AgentID: sp.agentID,
			Detail: obj("plan", acct.Plan, "limit", plan.MaxSandboxes)})
		return api.CreateSandboxResponse{}, errorf(KindConcurrencyLimit, "your %s plan allows %d concurrent sandboxes and all are live: delete one or wait for one to expire", acct.Plan, plan.MaxSandboxes)
	}
	if err != nil {
		return api.CreateSandboxResponse{}, internal("record sandbox", err)
	}
	s.audit(ctx, store.Event{AccountID: acct.ID, Type: "sandbox.created", SandboxID: rec.ID, AgentID: sp.agentID,
		Detail: obj("mode", sp.mode, "image", sp.image.Name)})

	lctx, cancel := context.WithCancel(context.Background())
	lv = &live{id: rec.ID, sp: sp, warm: warm, ctx: lctx, cancel: cancel, rec: rec, jobs: map[string]*job{},
		wake: make(chan struct{}, 1), ready: make(chan struct{}), done: make(chan struct{}), gone: make(chan struct{}),
		firstRun: first}
	s.mu.Lock()
	s.live[rec.ID] = lv
	lv.expiry = time.AfterFunc(time.Until(rec.ExpiresAt), func() { s.destroy(lv, ReasonExpired) })
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		s.serve(lv, drv)
	}()

	resp := api.CreateSandboxResponse{SandboxID: rec.ID, Mode: rec.Mode, CreatedAt: rec.CreatedAt, ExpiresAt: rec.ExpiresAt}
	t := time.NewTimer(s.cfg.ProvisionWait)
	defer t.Stop()
	select {
	case <-lv.ready:
	case <-t.C:
	case <-ctx.Done():
	}
	lv.mu.Lock()
	resp.Status = lv.rec.Status
	provErr := lv.rec.Error
	lv.mu.Unlock()
	if resp.Status == store.SandboxError {
		var e struct{ Message string }
		_ = json.Unmarshal(provErr, &e)
		return resp, errorf(KindProvisioningFailed, "sandbox %s could not be provisioned: %s", rec.ID, e.Message)
	}
	return resp, nil
}

// serve provisions a sandbox, then executes its runs one at a time until it is destroyed.
func (s *Service) serve(lv *live, drv driver.Driver) {
	defer close(lv.done)
	defer func() {
		lv.lastRunEnd.CompareAndSwap(0, time.Now().UnixNano()) // nothing runs any more
		lv.firstRunEnded()
	}()
	if !s.provision(lv, drv) {
		return
	}
	for {
		j := lv.next()
		if j == nil {
			return
		}
		lv.lastRunEnd.Store(0)
		s.execute(lv, drv, j)
		lv.lastRunEnd.Store(time.Now().UnixNano())
		lv.firstRunEnded()
	}
}

// quietSince is when lv's last run ended, or the zero time while one runs.
func (lv *live) quietSince() time.Time {
	if ns := lv.lastRunEnd.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// firstRunEnded closes lv.firstRun, once.
func (lv *live) firstRunEnded() { lv.firstOnce.Do(func() { close(lv.firstRun) }) }

func (s *Service) provision(lv *live, drv driver.Driver) bool {
	defer close(lv.ready)
	start := time.Now()
	var err error
	if lv.warm {
		if err = adopt(lv.ctx, drv, lv.id, lv.sp); err != nil {
			// Not usable after all: provision it afresh under its ID.
			s.log.Error("adopt a warm sandbox", "sandbox", lv.id, "err", err)
			lv.warm = false
			s.pool.discard(lv.sp.mode, lv.id)
		}
	}
	if !lv.warm {
		err = s.createOn(lv.ctx, drv, lv.id, lv.sp)
	}
	lv.mu.Lock()
	defer lv.mu.Unlock()
	ctx := context.Background()
	if err != nil {
		if lv.ctx.Err() != nil { // deleted while provisioning: destroy records it
			return false
		}
		s.log.Error("provision sandbox", "sandbox", lv.id, "err", err)
		s.releaseHost(lv.id, drv.Destroy(ctx, lv.id) == nil)
		t := now()
		lv.rec.Status, lv.rec.DestroyedAt, lv.rec.DestroyReason = store.SandboxError, &t, ReasonError
		lv.rec.Error = obj("error", string(KindProvisioningFailed), "message", publicMessage(err))
		lv.closing = true
		if uerr := s.st.UpdateSandbox(ctx, lv.rec); uerr != nil {
			s.log.Error("record sandbox error", "sandbox", lv.id, "err", uerr)
		}
		s.audit(ctx, store.Event{AccountID: lv.rec.AccountID, Type: "sandbox.error", SandboxID: lv.id, AgentID: lv.rec.AgentID,
			Detail: obj("message", publicMessage(err))})
		go s.forget(lv)
		return false
	}
	t := now()
	lv.rec.Status, lv.rec.ReadyAt = store.SandboxReady, &t
	if err := s.st.UpdateSandbox(ctx, lv.rec); err != nil {
		s.log.Error("record sandbox ready", "sandbox", lv.id, "err", err)
	}
	s.audit(ctx, store.Event{AccountID: lv.rec.AccountID, Type: "sandbox.ready", SandboxID: lv.id, AgentID: lv.rec.AgentID,
		Detail: obj("provision_ms", time.Since(start).Milliseconds(), "warm", lv.warm)})
	return true
}

// forget drops a sandbox that failed to provision from the live set.
func (s *Service) forget(lv *live) {
	s.stopExpiry(lv)
	s.mu.Lock()
	delete(s.live, lv.id)
	s.mu.Unlock()
	lv.cancel()
	lv.destroy1.Do(func() { close(lv.gone) })
}

// publicMessage is an error's text without internal paths: the last element of its chain.
func publicMessage(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 && i+2 < len(msg) {
		return msg[i+2:]
	}
	return msg
}

// Get returns a sandbox's whole record.
func (s *Service) Get(ctx context.Context, acct store.Account, id string) (api.Sandbox, error) {
	rec, err := s.st.GetSandbox(ctx, acct.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return api.Sandbox{}, errorf(KindNotFound, "no sandbox %q", id)
	}
	if err != nil {
		return api.Sandbox{}, internal("get sandbox", err)
	}
	return s.view(ctx, rec)
}

// diskUsed is what live sandbox id (of mode) uses of its disk: its host disk's, or what its
// driver says when the driver keeps its files (driver.Filer; at most diskUsageWait, 0 if it
// cannot tell: a sandbox's GET does not fail for it).
func (s *Service) diskUsed(ctx context.Context, id, mode string) int64 {
	h := s.hostOf(id)
	if h == nil {
		return 0
	}
	f, ok := s.drivers[mode].(driver.Filer)
	if !h.filer || !ok {
		return h.diskUsed()
	}
	ctx, cancel := context.WithTimeout(ctx, diskUsageWait)
	defer cancel()
	used, err := f.DiskUsage(ctx, id)
	if err != nil {
		return 0
	}
	return used
}

// diskUsageWait bounds a Filer driver's answer to how much of its disk a sandbox uses.
const diskUsageWait = 2 * time.Second

func (s *Service) view(ctx context.Context, rec store.Sandbox) (api.Sandbox, error) {
	u, err := s.st.SandboxUsage(ctx, rec.ID)
	if err != nil {
		return api.Sandbox{}, internal("sandbox usage", err)
	}
	out := api.Sandbox{
		SandboxID: rec.ID, AgentID: rec.AgentID, Status: rec.Status, Mode: rec.Mode, Config: rec.Config,
		CreatedAt: rec.CreatedAt, ReadyAt: rec.ReadyAt, ExpiresAt: rec.ExpiresAt, DestroyedAt: rec.DestroyedAt,
		Error: rec.Error, ImageDigest: rec.ImageDigest, Runs: api.RunCounts{Total: u.RunsTotal, Active: u.RunsActive},
		Usage: api.SandboxUsage{CPUSeconds: float64(u.CPUMS) / 1000, MemoryPeakBytes: u.MemoryPeakBytes,
			BilledMinutes: billedMinutes(rec.CreatedAt, rec.DestroyedAt), DiskUsedBytes: rec.DiskUsedBytes},
	}
	if rec.DestroyedAt == nil {
		out.Usage.DiskUsedBytes = s.diskUsed(ctx, rec.ID, rec.Mode)
	}
	if rec.DestroyReason != "" {
		r := rec.DestroyReason
		out.DestroyReason = &r
	}
	if out.Error == nil {
		out.Error = json.RawMessage("null")
	}
	return out, nil
}

// billedMinutes counts each started minute of a lifetime (at least one).
func billedMinutes(created time.Time, destroyed *time.Time) int64 {
	end := time.Now()
	if destroyed != nil {
		end = *destroyed
	}
	return store.BilledMinutes(created, end)
}

// List returns a page of the caller's sandboxes, newest first.
func (s *Service) List(ctx context.Context, acct store.Account, status, agentID string, page, limit int) (api.SandboxList, error) {
	recs, total, err := s.st.ListSandboxes(ctx, store.SandboxFilter{AccountID: acct.ID, Status: status, AgentID: agentID,
		Offset: (page - 1) * limit, Limit: limit})
	if err != nil {
		return api.SandboxList{}, internal("list sandboxes", err)
	}
	out := api.SandboxList{Sandboxes: []api.Sandbox{}, Total: total, Page: page}
	for _, r := range recs {
		v, err := s.view(ctx, r)
		if err != nil {
			return api.SandboxList{}, err
		}
		out.Sandboxes = append(out.Sandboxes, v)
	}
	return out, nil
}

// Delete destroys a sandbox now. Deleting a destroyed sandbox succeeds (idempotent).
func (s *Service) Delete(ctx context.Context, acct store.Account, id string) error {
	rec, err := s.st.GetSandbox(ctx, acct.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return errorf(KindNotFound, "no sandbox %q", id)
	} else if err != nil {
		return internal("get sandbox", err)
	}
	s.mu.Lock()
	lv := s.live[id]
	s.mu.Unlock()
	if lv != nil {
		s.end(lv, ReasonDeleted, true)
	} else if err := s.elsewhere(rec); err != nil {
		// Another replica runs it (the request reached this one anyway): saying it is deleted
		// would be false.
		return err
	}
	return nil
}

// elsewhere returns the error for a request about rec, a sandbox this replica does not run, when
// another replica runs it (the request reached this one anyway, e.g. marked forwarded): 503
// unavailable, try again — nothing was done here; nil when rec is final or this replica's.
func (s *Service) elsewhere(rec store.Sandbox) error {
	if rec.Replica == "" || rec.Replica == s.cfg.Replica || rec.Status == store.SandboxDestroyed || rec.Status == store.SandboxError {
		return nil
	}
	return &Error{Kind: KindUnavailable, RetryAfter: 5 * time.Second,
		Message: fmt.Sprintf("sandbox %q runs on replica %s, which did not take this request; try again", rec.ID, rec.Replica)}
}

// destroy ends a live sandbox: it stops taking runs, cancels the queued and running ones, releases
// everything the driver holds and records the sandbox as destroyed. Concurrent calls wait for the
// first one.
func (s *Service) destroy(lv *live, reason string) { s.end(lv, reason, false) }

// end is destroy. With recordFirst (DELETE), the sandbox is recorded destroyed (and leaves the
// live set) as soon as its runs are cancelled, and its resources are released in the background
// — off the request path, within the service's wait group, so Close still waits for them; a crash
// meanwhile leaves them to the start-up reconciliation, which removes whatever the driver still
// lists. Without it (expiry, shutdown) the record is written once everything is released, and the
// call returns then.
func (s *Service) end(lv *live, reason string, recordFirst bool) {
	first := false
	lv.destroy1.Do(func() {
		first = true
		s.stopExpiry(lv)
		lv.mu.Lock()
		lv.closing = true
		queued := lv.queue
		lv.queue = nil
		lv.mu.Unlock()
		lv.cancel() // aborts provisioning or the running run
		ctx := context.Background()
		for _, j := range queued {
			s.finishCancelled(ctx, lv, j)
		}
		if !recordFirst {
			s.release(lv, reason)
			s.record(lv, reason)
			close(lv.gone)
			return
		}
		<-lv.ready // provisioning ends at once when cancelled
		s.endRuns(lv, runStopWait)
		s.record(lv, reason)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer close(lv.gone)
			s.release(lv, reason)
		}()
	})
	if !first && !recordFirst {
		<-lv.gone
	}
}

// release waits for the sandbox's goroutine (its running run killed) and frees what the driver
// holds and the sandbox's host directories.
func (s *Service) release(lv *live, reason string) {
	<-lv.done
	s.flushNetwork(lv)
	lv.mu.Lock()
	failed := lv.rec.Status == store.SandboxError
	lv.mu.Unlock()
	if failed {
		return // provisioning cleaned up after itself
	}
	ctx := context.Background()
	destroyed := false
	if drv, ok := s.drivers[lv.rec.Mode]; ok {
		err := drv.Destroy(ctx, lv.id)
		if err != nil {
			s.log.Error("destroy sandbox", "sandbox", lv.id, "err", err)
		}
		destroyed = err == nil
	}
	s.releaseHost(lv.id, destroyed)
}

// record writes the sandbox's destroyed record and event, once, and drops it from the live set.
func (s *Service) record(lv *live, reason string) {
	lv.mu.Lock()
	if lv.recorded {
		lv.mu.Unlock()
		return
	}
	lv.recorded = true
	failed, mode := lv.rec.Status == store.SandboxError, lv.rec.Mode
	lv.mu.Unlock()
	var used int64
	if !failed {
		used = s.diskUsed(context.Background(), lv.id, mode) // a driver may be asked: not under lv.mu
	}
	lv.mu.Lock()
	if !failed {
		t := now()
		lv.rec.Status, lv.rec.DestroyedAt, lv.rec.DestroyReason = store.SandboxDestroyed, &t, reason
		lv.rec.DiskUsedBytes = used
	}
	rec := lv.rec
	lv.mu.Unlock()
	if _, err := s.st.EndContexts(context.Background(), lv.id, "sandbox "+reason, now()); err != nil {
		s.log.Error("record contexts deleted", "sandbox", lv.id, "err", err)
	}
	ctx := context.Background()
	if !failed {
		s.cfg.Observer.Destroyed(rec.Mode, reason)
		if err := s.st.UpdateSandbox(ctx, rec); errors.Is(err, store.ErrFinal) {
			// Another replica ended its record (it declared this one lost) and wrote its event.
			s.log.Warn("sandbox record ended by another replica", "sandbox", lv.id)
			failed = true
		} else if err != nil {
			s.log.Error("record sandbox destroyed", "sandbox", lv.id, "err", err)
		}
	}
	if !failed {
		s.audit(ctx, store.Event{AccountID: rec.AccountID, Type: "sandbox.destroyed", SandboxID: lv.id, AgentID: rec.AgentID,
			Detail: obj("reason", reason)})
	}
	s.mu.Lock()
	delete(s.live, lv.id)
	s.mu.Unlock()
}

// runStopWait bounds how long DELETE waits for a running run to be killed and recorded before it
// records it cancelled itself.
const runStopWait = 3 * time.Second

// endRuns waits until the running run of a sandbox being destroyed (cancelled by then) has its
// final record, so that DELETE answers with every run final; past wait (runStopWait for DELETE, 0
// for a stop out of time) — a driver slow to kill — it records the run cancelled itself, and
// execute's later record is dropped.
func (s *Service) endRuns(lv *live, wait time.Duration) {
	lv.mu.Lock()
	var running []*job
	for _, j := range lv.jobs {
		running = append(running, j)
	}
	lv.mu.Unlock()
	expired := make(chan struct{})
	deadline := time.AfterFunc(wait, func() { close(expired) })
	defer deadline.Stop()
	for _, j := range running {
		select {
		case <-j.done:
			continue
		case <-expired:
		}
		t := now()
		j.finalMu.Lock()
		if !j.final {
			j.final = true
			r := j.run
			r.Status, r.FinishedAt = string(driver.StatusCancelled), &t
			write := s.st.UpdateRun
			if j.unrecorded {
				write = s.st.CreateRun
			}
			if err := write(context.Background(), r); err != nil {
				s.log.Error("record run cancelled", "run", r.ID, "err", err)
			}
		}
		j.finalMu.Unlock()
	}
}

// stopExpiry stops a sandbox's expiry timer (set under s.mu when the sandbox was created).
func (s *Service) stopExpiry(lv *live) {
	s.mu.Lock()
	t := lv.expiry
	s.mu.Unlock()
	t.Stop()
}

// hardStopWait bounds how long Close waits, once its ctx has ended and it has killed what was
// left, for the destroys in flight to finish.
const hardStopWait = 3 * time.Second

// Close destroys every live sandbox (reason server_restart) and the warm ones, and waits for all
// goroutines. If ctx ends first (a stop's grace time ran out, or a second signal came), it kills
// every sandbox not destroyed yet at once (driver.Killer), records each destroyed — its running
// run cancelled — waits up to hardStopWait for the destroys in flight, and returns an error
// naming how many it killed; whatever a driver has not released by then goes with the process's
// mount namespace or is removed by the next start's reconciliation (the driver still lists it).
// Either way no sandbox is left live in the records.
func (s *Service) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	var all []*live
	for _, lv := range s.live {
		all = append(all, lv)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(s.pool.close)
	for _, lv := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.destroy(lv, ReasonServerRestart)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); s.wg.Wait(); close(done) }()
	defer s.stopReplica() // heartbeats go on while the sandboxes are destroyed
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	var left []*live
	for _, lv := range s.live {
		left = append(left, lv)
	}
	s.mu.Unlock()
	for _, lv := range left {
		if k, ok := s.drivers[lv.rec.Mode].(driver.Killer); ok {
			if err := k.Kill(lv.id); err != nil {
				s.log.Error("kill sandbox", "sandbox", lv.id, "err", err)
			}
		}
	}
	for _, lv := range left {
		s.endRuns(lv, 0)
		s.record(lv, ReasonServerRestart)
	}
	select {
	case <-done:
	case <-time.After(hardStopWait):
	}
	return fmt.Errorf("close sandbox service: %w: killed %d sandboxes not destroyed in time (recorded destroyed)", ctx.Err(), len(left))
}

// LiveCount returns how many sandboxes are live (not destroyed), warm ones not included.
func (s *Service) LiveCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.live)
}

// SetWarmPool sets how many warm sandboxes the service keeps per shape (0: none); the ones over
// it are destroyed. (Config.WarmPool is the initial value.)
func (s *Service) SetWarmPool(n int) { s.pool.resize(n) }

// WarmSettled returns a channel closed once no warm sandbox is being provisioned (benchmarks wait
// on it so that background provisioning does not disturb what they measure).
func (s *Service) WarmSettled() <-chan struct{} { return s.pool.settled() }

// reconcile destroys what a previous process of this replica left live: its own records (and
// those from before replicas, which have none), never another replica's — a live one's are its
// own business, a lost one's the sweep's (replicas.go).
func (s *Service) reconcile(ctx context.Context) error {
	recs, err := s.st.LiveSandboxes(ctx)
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	for _, rec := range recs {
		if rec.Replica != s.cfg.Replica && rec.Replica != "" {
			continue
		}
		if d, ok := s.drivers[rec.Mode]; ok {
			if err := d.Destroy(ctx, rec.ID); err != nil {
				return fmt.Errorf("reconcile: destroy %s: %w", rec.ID, err)
			}
		}
		t := now()
		if _, err := s.st.EndOpenRuns(ctx, rec.ID, "error", obj("type", "ServerRestart",
			"message", "the service restarted while this run was queued or running", "traceback", ""), t); err != nil {
			return fmt.Errorf("reconcile: end runs of %s: %w", rec.ID, err)
		}
		// The interpreters of its code contexts are gone with it; the records stay, deleted.
		if _, err := s.st.EndContexts(ctx, rec.ID, "sandbox "+ReasonServerRestart, t); err != nil {
			return fmt.Errorf("reconcile: end contexts of %s: %w", rec.ID, err)
		}
		rec.Status, rec.DestroyedAt, rec.DestroyReason = store.SandboxDestroyed, &t, ReasonServerRestart
		if err := s.st.UpdateSandbox(ctx, rec); err != nil {
			return fmt.Errorf("reconcile: %w", err)
		}
		s.audit(ctx, store.Event{AccountID: rec.AccountID, Type: "sandbox.destroyed", SandboxID: rec.ID, AgentID: rec.AgentID,
			Detail: obj("reason", ReasonServerRestart)})
		s.log.Info("reconciled sandbox left live by a previous run of the service", "sandbox", rec.ID)
	}
	for mode, d := range s.drivers {
		ids, err := d.List(ctx)
		if err != nil {
			return fmt.Errorf("reconcile: list %s sandboxes: %w", mode, err)
		}
		for _, id := range ids {
			s.log.Info("removing orphaned sandbox resources", "sandbox", id, "mode", mode)
			if err := d.Destroy(ctx, id); err != nil {
				return fmt.Errorf("reconcile: destroy orphan %s: %w", id, err)
			}
		}
	}
	entries, err := os.ReadDir(s.sandboxesDir())
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	for _, e := range entries {
		// A disk a crashed process mounted went with its mount namespace; what its containers
		// still held went with them (the driver destroyed them above).
		if err := os.RemoveAll(filepath.Join(s.sandboxesDir(), e.Name())); err != nil {
			return fmt.Errorf("reconcile: %w", err)
		}
	}
	return nil
}

// audit records an event; a failure is logged, never returned (the action already happened).
func (s *Service) audit(ctx context.Context, e store.Event) {
	s.addEvent(ctx, s.event(e))
}

// event gives e its ID and time: an audit event to write (addEvent, or with a store write).
func (s *Service) event(e store.Event) store.Event {
	e.ID = newID("evt_")
	e.At = now()
	return e
}

// addEvent writes the audit event e, made by event.
func (s *Service) addEvent(ctx context.Context, e store.Event) {
	if err := s.st.AddEvent(context.WithoutCancel(ctx), e); err != nil {
		s.log.Error("record audit event", "type", e.Type, "err", err)
	}
}

// Audit returns a page of the caller's audit events, oldest first.
func (s *Service) Audit(ctx context.Context, acct store.Account, f store.EventFilter, page, limit int) (api.EventList, error) {
	f.AccountID, f.Offset, f.Limit = acct.ID, (page-1)*limit, limit
	evs, total, err := s.st.ListEvents(ctx, f)
	if err != nil {
		return api.EventList{}, internal("list events", err)
	}
	out := api.EventList{Events: []api.Event{}, Total: total, Page: page}
	for _, e := range evs {
		d := e.Detail
		if d == nil {
			d = json.RawMessage("{}")
		}
		out.Events = append(out.Events, api.Event{EventID: e.ID, Type: e.Type, At: e.At,
			SandboxID: optional(e.SandboxID), RunID: optional(e.RunID), AgentID: optional(e.AgentID), Detail: d})
	}
	return out, nil
}

// Usage returns the caller's usage per day in [from, to).
func (s *Service) Usage(ctx context.Context, acct store.Account, from, to time.Time) (api.Usage, error) {
	days, err := s.st.Usage(ctx, acct.ID, from, to, time.Now().UTC())
	if err != nil {
		return api.Usage{}, internal("usage", err)
	}
	out := api.Usage{From: from, To: to, Days: []api.UsageDay{}}
	for _, d := range days {
		out.Days = append(out.Days, api.UsageDay(d))
		out.BilledMinutes += d.BilledMinutes
		out.CPUSeconds += d.CPUSeconds
		out.Runs += d.Runs
	}
	return out, nil
}

// AuthFailed records a failed authentication.
func (s *Service) AuthFailed(ctx context.Context, reason, remote string) {
	s.audit(ctx, store.Event{Type: "auth.failed", Detail: obj("reason", reason, "remote", remote)})
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// obj builds a JSON object from key, value pairs.
func obj(kv ...any) json.RawMessage {
	m := make(map[string]any, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	b, _ := json.Marshal(m)
	return b
}

var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// newID returns prefix + 120 random bits.
func newID(prefix string) string {
	b := make([]byte, 15)
	_, _ = rand.Read(b)
	return prefix + idEncoding.EncodeToString(b)
}

func now() time.Time { return time.Now().UTC().Truncate(time.Millisecond) }

func hostMemory() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 1 << 40
	}
	var kb int64
	for _, line := range strings.Split(string(b), "\n") {
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			return kb << 10
		}
	}
	return 1 << 40
}
