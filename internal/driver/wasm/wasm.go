// Package wasm is the sandbox driver that runs Python compiled to WebAssembly (CPython 3.11 for
// WASI, python.wasm) under the wazero runtime; it registers itself as driver "wasm". This package
// is the host side, in sandboxd: pools, cgroups, timeouts, sandboxes' state. The guest runs in
// worker processes (package wasm/worker), which it talks to through package wasm/protocol. Why it
// is built this way, with the measurements: RATIONALE.md ("WASM mode", "the WASM driver").
//
// # Processes
//
//	sandboxd serve (this package)         root; never runs guest code
//	└─ sandboxd wasm-worker (wasm/worker) one per sandbox, and idle ones in a pool per image: own
//	                                      process group, Pdeathsig SIGKILL, an empty network
//	                                      namespace, a cgroup of its own; root while it compiles
//	                                      and waits, its sandbox's host uid once configured
//	                                      (Spec.HostIDs + driver.SandboxUser)
//
// The driver keeps a pool of idle, compiled workers per image (Options.WasmPool, default 2),
// refilled in the background one at a time at the least CPU weight; Prepare fills an image's pool
// ahead of the first Create. Create claims a worker (it waits for a compile only when the pool is
// empty), makes the worker's cgroup the sandbox's by giving it the sandbox's limits, and
// configures the worker: the mounts it plans, as directory descriptors it opens itself (the
// worker opens no host path). A worker that was killed or died is replaced at the sandbox's next
// run by one from the pool, moved into the sandbox's cgroup and given the same configuration.
//
// # Contract
//
//   - Image: Spec.RootFS is a directory holding python.wasm and lib/python3.11/ (the unzipped
//     standard library; scripts/build-python-wasm.sh makes one). The guest sees <image>/lib
//     read-only at /usr/local/lib and runs with PYTHONHOME=/usr/local. Spec.SitePackages, when
//     set (an operator's WASM image of pure-Python packages, package imagestore), is mounted
//     read-only at /usr/local/lib/python3.11/dist-packages, which site.py puts on sys.path.
//   - Resources: the sandbox's cgroup (<cgroupRoot>/<hash of the state dir>/w-<random>, package
//     cgroup: v1, v2 and the v1 hybrid layout) has a CFS quota of Spec.CPU cores, a memory limit of
//     Spec.MemoryBytes + WorkerOverhead (the guest's linear memory itself is capped at
//     Spec.MemoryBytes by the worker's allocator: Python gets MemoryError) and a pids limit of at
//     least WorkerMinPids (the worker's threads; the guest can start neither processes nor
//     threads).
//   - Filesystem: the standard library, /tmp (Spec.TmpDir), the runs' working directory
//     (Spec.WorkDir) and each Spec.Mounts entry at its Path (read-only when ReadOnly), resolved
//     beneath their directories by the worker, links refused. Spec.Blocked paths are absent: a
//     mount at or under one is not mounted, one inside a mount is cut out of it. No network: a
//     policy that asks for egress is refused.
//   - Runs: every run but a code context's is a fresh instance of the compiled module (its
//     interpreter started ahead of it by the worker, the standby), output streamed to
//     ExecRequest.OnOutput, at most MaxOutput bytes per stream. The timeout and ctx's end kill the worker's process group,
//     whatever the guest does. ExecResult.CPU is the cgroup's CPU time during the run;
//     ExecResult.MemoryPeak the high-water mark of the instance's linear memory (start-up,
//     static data and stack included). The status is driver.Classify's; "oom" is an uncaught
//     MemoryError or a trap after the guest was refused memory past its cap, or a cgroup OOM
//     kill of the worker (a MemoryError without a refusal is "failed", as in a container). A trap is "failed", exit code 134, with "sandbox: the interpreter crashed
//     (why)" on stderr and, when the interpreter's C stack overflowed, error {type:
//     StackOverflow}; the next run gets a fresh instance.
//   - Code contexts (driver.Contexter, contexts.go): a context is a long-lived instance in the
//     sandbox's worker, at most protocol.MaxContexts; the linear memory of every instance of the
//     worker (contexts, the standby, a fresh run's) counts against Spec.MemoryBytes together. A
//     run's timeout or cancel — in a context or not — kills the worker and so resets every
//     context of the sandbox (ExecResult.ContextLost for the run's own, ContextRestarted at each
//     other's next run); a crash or os._exit in a context's run resets that context only.
//   - State: everything of a sandbox is <StateDir>/sandboxes/<id>/ (meta.json names its cgroup)
//     and its cgroup. List finds the state dirs and Destroy removes both (killing whatever is
//     left in the cgroup), so sandboxes left by a crashed sandboxd are found and removed; their
//     workers died with it (Pdeathsig, and EOF on their control socket). Cgroups of no sandbox
//     (pool workers of a crashed process) are removed when a driver opens the same state dir.
package wasm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Name is the driver's registry name.
const Name = "wasm"

func init() {
	driver.Register(Name, func(opts driver.Options) (driver.Driver, error) { return Open(opts) })
}

// Defaults and limits.
const (
	// DefaultPool is the number of idle workers kept per image when Options.WasmPool is 0.
	DefaultPool = 2
	// WorkerOverhead is what a sandbox's memory cgroup allows on top of the guest's cap and its
	// /tmp: the worker's own memory, charged to the sandbox since the worker's cgroup becomes the
	// sandbox's. Measured with TestWorkerOverhead on python.wasm 3.11: 41 MiB anonymous and
	// 22 MiB page cache between runs, 56–64 MiB beyond the linear memory at a run's peak (runs
	// importing json, sqlite3, zlib, decimal). 96 MiB leaves room for the Go heap's slack.
	WorkerOverhead = 96 << 20
	// WorkerMinPids is the least pids limit of a sandbox's cgroup: the worker's threads.
	WorkerMinPids = 64

	cgroupRoot   = "/sandboxd-wasm" // the driver's cgroups: cgroupRoot/<instance>/w-<hex>
	sandboxesDir = "sandboxes"
	compileCache = "/var/cache/sandboxd/wasm-compiled"
	stdlibPath   = "/usr/local/lib"
	// sitePath is where Spec.SitePackages is mounted: a directory the site module of python.wasm
	// puts on sys.path when it exists (built from Debian's sources, its site.py looks in
	// <prefix>/lib/python3.X/dist-packages, not site-packages, outside a virtual environment).
	sitePath = stdlibPath + "/python3.11/dist-packages"
	tmpPath  = "/tmp"
)

// Driver is the wasm driver. It is safe for concurrent use.
type Driver struct {
	stateDir  string
	log       *slog.Logger // Options.Log()
	workerCmd []string
	poolSize  int
	cg        cgroup.Layout
	cgParent  string // cgroupRoot/<hash of stateDir>: this driver's cgroups, apart from other sandboxds'
	// compileCache is the workers' compilation cache: compileCache (the constant) but in tests
	// that need a cold one.
	compileCache string

	mu     sync.Mutex
	pools  map[string]*pool // by image directory
	boxes  map[string]*box
	closed bool
}

// box is a sandbox this process created.
type box struct {
	id     string
	dir    string
	image  string
	cfg    protocol.Config
	limits cgroup.Limits
	meta   meta

	mu        sync.Mutex
	group     string // the sandbox's cgroup: its first worker's ("" until it has one)
	w         *proc  // the current worker; nil after it was killed or died
	destroyed bool
	contexts  map[string]*codeCtx // its code contexts, by name (contexts.go)

	standbyRuns atomic.Int64 // runs its workers served with a standby (for tests)
}

// meta is the per-sandbox record on disk (meta.json): for people, and for Destroy after a
// restart (the cgroup).
type meta struct {
	ID      string    `json:"id"`
	Image   string    `json:"image"`
	Created time.Time `json:"created"`
	Cgroup  string    `json:"cgroup,omitempty"`
}

// Open opens the wasm driver: it needs root (cgroups, the /tmp tmpfs), a kernel with openat2, a
// cgroup layout with the memory controller, and the worker command (opts.WasmWorker, default
// this executable's wasm-worker subcommand). Pools start on first use of an image (or Prepare).
func Open(opts driver.Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errors.New("wasm driver: Options.StateDir is required")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("wasm driver: needs root (cgroups and the sandboxes' /tmp)")
	}
	stateDir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(stateDir, sandboxesDir), 0o700); err != nil {
		return nil, fmt.Errorf("wasm driver: state dir: %w", err)
	}
	if err := os.MkdirAll(compileCache, 0o700); err != nil {
		return nil, fmt.Errorf("wasm driver: compilation cache: %w", err)
	}
	if err := os.Chmod(compileCache, 0o700); err != nil { // whatever made it before
		return nil, fmt.Errorf("wasm driver: compilation cache: %w", err)
	}
	if err := checkOpenat2(stateDir); err != nil {
		return nil, fmt.Errorf("wasm driver: %w", err)
	}
	cg, err := cgroup.ReadLayout()
	if err != nil {
		return nil, fmt.Errorf("wasm driver: cgroups: %w", err)
	}
	cmd := opts.WasmWorker
	if len(cmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("wasm driver: worker command: %w", err)
		}
		cmd = []string{exe, protocol.WorkerCommand}
	}
	if _, err := os.Stat(cmd[0]); err != nil {
		return nil, fmt.Errorf("wasm driver: worker command: %w", err)
	}
	size := opts.WasmPool
	if size <= 0 {
		size = DefaultPool
	}
	sum := sha256.Sum256([]byte(stateDir))
	d := &Driver{stateDir: stateDir, log: opts.Log(), workerCmd: cmd, poolSize: size, cg: cg,
		cgParent: cgroupRoot + "/" + hex.EncodeToString(sum[:6]), compileCache: compileCache,
		pools: map[string]*pool{}, boxes: map[string]*box{}}
	d.removeStaleCgroups()
	return d, nil
}

// removeStaleCgroups removes the driver's empty cgroups that no sandbox owns: those of pool
// workers of an earlier process on the same state dir (its workers died with it). Groups with
// processes are left alone (a sandbox being created, or another driver's pool on this state dir).
func (d *Driver) removeStaleCgroups() {
	owned := map[string]bool{}
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, sandboxesDir))
	for _, e := range ents {
		if m, err := readMeta(filepath.Join(d.stateDir, sandboxesDir, e.Name())); err == nil && m.Cgroup != "" {
			owned[m.Cgroup] = true
		}
	}
	names, _ := d.cg.Children(d.cgParent)
	for _, n := range names {
		g := d.cgParent + "/" + n
		if owned[g] {
			continue
		}
		if pids, err := d.cg.Procs(g); err == nil && len(pids) == 0 {
			_ = d.cg.Remove(g)
		}
	}
}

func readMeta(dir string) (meta, error) {
	var m meta
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return m, err
	}
	err = json.Unmarshal(b, &m)
	return m, err
}

// checkOpenat2 makes sure the kernel resolves paths beneath a directory (Linux 5.6+): the
// workers' mounts depend on it (package worker).
func checkOpenat2(dir string) error {
	root, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(root)
	fd, err := unix.Openat2(root, ".", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH})
	if err != nil {
		return fmt.Errorf("the kernel cannot resolve paths beneath a directory (openat2, Linux 5.6+): %w", err)
	}
	unix.Close(fd)
	return nil
}

// Name returns "wasm".
func (d *Driver) Name() string { return Name }

func (d *Driver) cacheDir() string { return d.compileCache }

func (d *Driver) boxDir(id string) string { return filepath.Join(d.stateDir, sandboxesDir, id) }

// Check reports whether the driver can run sandboxes: the worker command is there, the state
// dir is writable, and no image's pool is failing to start workers.
func (d *Driver) Check(ctx context.Context) error {
	if _, err := os.Stat(d.workerCmd[0]); err != nil {
		return fmt.Errorf("wasm driver check: worker command: %w", err)
	}
	f, err := os.CreateTemp(d.stateDir, ".check-")
	if err != nil {
		return fmt.Errorf("wasm driver check: state dir: %w", err)
	}
	f.Close()
	os.Remove(f.Name())
	d.mu.Lock()
	defer d.mu.Unlock()
	for image, p := range d.pools {
		if err := p.err(); err != nil {
			return fmt.Errorf("wasm driver check: image %s: %w", image, err)
		}
	}
	return nil
}

// checkImage verifies that dir looks like a wasm image.
func checkImage(dir string) error {
	if dir == "" || !filepath.IsAbs(dir) {
		return fmt.Errorf("image %q is not an absolute path", dir)
	}
	if st, err := os.Stat(filepath.Join(dir, "python.wasm")); err != nil || !st.Mode().IsRegular() {
		return fmt.Errorf("image %s has no python.wasm", dir)
	}
	if st, err := os.Stat(filepath.Join(dir, "lib", "python3.11")); err != nil || !st.IsDir() {
		return fmt.Errorf("image %s has no lib/python3.11", dir)
	}
	return nil
}

// poolFor returns the pool of image, starting it on first use.
func (d *Driver) poolFor(image string) (*pool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, errors.New("wasm driver is closed")
	}
	p := d.pools[image]
	if p == nil {
		p = newPool(d, image, d.poolSize)
		d.pools[image] = p
	}
	return p, nil
}

// Prepare starts image's pool, if not yet, and waits until it holds an idle worker, so the next
// Create finds one (sandboxd calls it for its wasm images at start-up). It returns early with the
// error of a failed worker start (the pool keeps retrying in the background) or when ctx ends.
func (d *Driver) Prepare(ctx context.Context, image string) error {
	if err := checkImage(image); err != nil {
		return fmt.Errorf("wasm driver: %w", err)
	}
	p, err := d.poolFor(image)
	if err != nil {
		return err
	}
	return p.wait(ctx)
}

// planConfig turns a spec into the worker's configuration: the standard library and /tmp
// mounts, the user mounts (those at or below a blocked path left out: blocked wins), the
// blocked paths that lie inside a mount, and the standby's environment.
func planConfig(spec driver.Spec, tmpDir string) (protocol.Config, error) {
	c := protocol.Config{MemoryBytes: spec.MemoryBytes}
	env, err := buildEnv(nil) // a standby's: a run's that adds no variables
	if err != nil {
		return c, err
	}
	c.Env = env
	for _, b := range spec.Blocked {
		if err := checkPath("blocked", b); err != nil {
			return c, err
		}
	}
	blocked := func(p string) bool {
		return slices.ContainsFunc(spec.Blocked, func(b string) bool { return b == "/" || p == b || strings.HasPrefix(p, b+"/") })
	}
	var mounts []protocol.Mount
	add := func(m protocol.Mount) {
		if !blocked(m.Path) {
			mounts = append(mounts, m)
		}
	}
	add(protocol.Mount{Path: stdlibPath, HostDir: filepath.Join(spec.RootFS, "lib"), ReadOnly: true})
	if dynload := filepath.Join(spec.RootFS, "lib", "python3.11", "lib-dynload"); !isDir(dynload) {
		// Python looks for it to settle its exec_prefix (and warns on stderr without it); WASI
		// Python has no extension modules to load from it.
		add(protocol.Mount{Path: stdlibPath + "/python3.11/lib-dynload", ReadOnly: true, Empty: true})
	}
	if spec.SitePackages != "" {
		if !filepath.IsAbs(spec.SitePackages) || !isDir(spec.SitePackages) {
			return c, fmt.Errorf("site-packages %q is not an absolute path of a directory", spec.SitePackages)
		}
		add(protocol.Mount{Path: sitePath, HostDir: spec.SitePackages, ReadOnly: true})
	}
	userTmp := false
	for _, m := range spec.Mounts {
		if err := checkPath("mount", m.Path); err != nil {
			return c, err
		}
		if m.Path == "/" || m.Path == protocol.RunDir || strings.HasPrefix(m.Path, protocol.RunDir+"/") {
			return c, fmt.Errorf("mount path %q is not allowed", m.Path)
		}
		if !filepath.IsAbs(m.HostDir) {
			return c, fmt.Errorf("mount %s: host dir %q is not absolute", m.Path, m.HostDir)
		}
		if st, err := os.Stat(m.HostDir); err != nil || !st.IsDir() {
			return c, fmt.Errorf("mount %s: host dir %s is not a directory", m.Path, m.HostDir)
		}
		if slices.ContainsFunc(mounts, func(o protocol.Mount) bool { return o.Path == m.Path }) {
			return c, fmt.Errorf("mount path %s appears twice", m.Path)
		}
		userTmp = userTmp || m.Path == tmpPath
		add(protocol.Mount{Path: m.Path, HostDir: m.HostDir, ReadOnly: m.ReadOnly})
	}
	if !userTmp {
		add(protocol.Mount{Path: tmpPath, HostDir: tmpDir})
	}
	if spec.WorkDir != "" {
		add(protocol.Mount{Path: pyrunner.WorkDir, HostDir: spec.WorkDir})
	}
	sort.SliceStable(mounts, func(i, j int) bool { return mounts[i].Path < mounts[j].Path })
	c.Mounts = mounts
	for _, b := range spec.Blocked {
		if slices.ContainsFunc(mounts, func(m protocol.Mount) bool { return strings.HasPrefix(b, m.Path+"/") }) {
			c.Blocked = append(c.Blocked, b)
		}
	}
	return c, nil
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// checkPath validates a sandbox path: absolute, clean, no NUL.
func checkPath(what, p string) error {
	if p == "" || !path.IsAbs(p) || path.Clean(p) != p || strings.ContainsRune(p, 0) {
		return fmt.Errorf("%s path %q is not an absolute clean path", what, p)
	}
	return nil
}

// refuseEgress fails for a network policy that asks for egress: a WASI guest has no sockets.
func refuseEgress(spec driver.Spec) error {
	if !spec.Network.BlockOutbound || len(spec.Network.Rules) > 0 {
		return errors.New("wasm sandboxes have no network: the policy must block outbound traffic and allow nothing")
	}
	return nil
}

// Create provisions sandbox id: its state dir and /tmp, its cgroup, and a worker from the image's
// pool, moved into the cgroup and configured. On any error (or ctx cancellation) everything is
// removed again.
func (d *Driver) Create(ctx context.Context, id string, spec driver.Spec) (err error) {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	if err := refuseEgress(spec); err != nil {
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	if err := checkImage(spec.RootFS); err != nil {
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	if spec.MemoryBytes < 16<<20 {
		return fmt.Errorf("create sandbox %s: memory %d is below 16 MiB", id, spec.MemoryBytes)
	}
	p, err := d.poolFor(spec.RootFS)
	if err != nil {
		return err
	}
	if spec.HostIDs == 0 || spec.TmpDir == "" || spec.WorkDir == "" {
		return fmt.Errorf("create sandbox %s: the spec has no host ids, /tmp or working directory", id)
	}
	if spec.HostReady != nil {
		if err := spec.HostReady(); err != nil {
			return fmt.Errorf("create sandbox %s: %w", id, err)
		}
	}
	dir := d.boxDir(id)
	uid, gid := int(spec.HostIDs+driver.SandboxUser), int(spec.HostIDs+driver.SandboxUser)
	cfg, err := planConfig(spec, spec.TmpDir)
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	cfg.UID, cfg.GID = uid, gid
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create sandbox %s: already exists", id)
		}
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	pids := max(spec.PidsLimit, WorkerMinPids)
	b := &box{id: id, dir: dir, image: spec.RootFS, cfg: cfg,
		limits: cgroup.Limits{CPU: spec.CPU, CPUWeight: 100, MemoryBytes: spec.MemoryBytes + WorkerOverhead, Pids: pids},
		meta:   meta{ID: id, Image: spec.RootFS, Created: time.Now().UTC()}, contexts: map[string]*codeCtx{}}
	d.mu.Lock()
	d.boxes[id] = b
	d.mu.Unlock()
	defer func() {
		if err != nil {
			if derr := d.Destroy(context.WithoutCancel(ctx), id); derr != nil {
				err = fmt.Errorf("%w (and cleaning up failed: %v)", err, derr)
			}
			err = fmt.Errorf("create sandbox %s: %w", id, err)
		}
	}()
	// meta.json is written once, with the cgroup, in attach: rewriting a file costs ext4 a flush.
	// The worker runs as the sandbox's user: /tmp and the user mounts become its own, as in the
	// container driver.
	for _, d := range []string{spec.TmpDir, spec.WorkDir} {
		if err := chownDir(d, uid, gid); err != nil {
			return fmt.Errorf("%s: %w", d, err)
		}
	}
	for _, m := range spec.Mounts {
		if err := statedir.ChownTree(m.HostDir, uid, gid); err != nil {
			return fmt.Errorf("mount %s: %w", m.Path, err)
		}
	}
	w, err := p.get(ctx)
	if err != nil {
		return err
	}
	return d.attach(ctx, b, w)
}

// attach makes w the worker of b, configures it and has it start the first run's instance (the
// standby). The first worker's cgroup becomes the sandbox's (recorded in meta.json, which is
// written here, given the sandbox's limits); a later one (after a kill) is moved into it. On error
// w is killed.
func (d *Driver) attach(ctx context.Context, b *box, w *proc) error {
	b.mu.Lock()
	first := b.group == ""
	if first {
		b.group = w.group
	}
	group := b.group
	b.mu.Unlock()
	if first {
		// The limits are written while the worker is configured: neither waits for the other,
		// and the worker runs nothing of the guest before protocol.FrameStandby or a run, sent
		// after both.
		b.meta.Cgroup = group
		limits := make(chan error, 1)
		go func() { limits <- d.cg.Set(group, b.limits) }()
		err := statedir.WriteJSON(filepath.Join(b.dir, "meta.json"), b.meta)
		if err == nil {
			err = w.configure(ctx, b.cfg)
		}
		if lerr := <-limits; lerr != nil && err == nil {
			err = fmt.Errorf("the sandbox's cgroup limits: %w", lerr)
		}
		if err != nil {
			w.kill()
			return err
		}
	} else {
		if err := d.cg.AddProc(group, w.pid); err != nil {
			d.discard(w)
			return fmt.Errorf("move the worker into the sandbox's cgroup: %w", err)
		}
		_ = d.cg.Remove(w.group) // empty now
		if err := w.configure(ctx, b.cfg); err != nil {
			w.kill()
			return err
		}
	}
	// The first run's instance starts now (see protocol.FrameStandby). A worker that died meanwhile is
	// found dead by the next run.
	_ = w.fw.Send(protocol.FrameStandby, nil)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.destroyed {
		w.kill()
		return driver.ErrNotFound
	}
	b.w = w
	return nil
}

// worker returns b's worker, claiming a new one from the pool when the last was killed or died.
func (d *Driver) worker(ctx context.Context, b *box) (*proc, error) {
	b.mu.Lock()
	w, destroyed := b.w, b.destroyed
	if w != nil && !w.alive() {
		b.w, w = nil, nil
	}
	b.mu.Unlock()
	if destroyed {
		return nil, driver.ErrNotFound
	}
	if w != nil {
		return w, nil
	}
	p, err := d.poolFor(b.image)
	if err != nil {
		return nil, err
	}
	if w, err = p.get(ctx); err != nil {
		return nil, err
	}
	if err := d.attach(ctx, b, w); err != nil {
		return nil, err
	}
	return w, nil
}

// dropWorker forgets b's worker w (after killing it).
func (b *box) dropWorker(w *proc) {
	b.mu.Lock()
	if b.w == w {
		b.w = nil
	}
	b.mu.Unlock()
}

func (d *Driver) lookup(id string) (*box, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.boxes[id]
	if b == nil {
		return nil, driver.ErrNotFound
	}
	return b, nil
}

// wasmEnv is what runs get on top of pyrunner.BaseEnv: the standard library's home.
var wasmEnv = map[string]string{"PYTHONHOME": "/usr/local"}

// buildEnv returns a run's environment (protocol.Run.Env): pyrunner.BaseEnv, wasmEnv, then extra
// (ExecRequest.Env).
func buildEnv(extra map[string]string) ([]string, error) { return pyrunner.Env(wasmEnv, extra) }

// Exec runs req in sandbox id: a fresh instance in the sandbox's worker. The timeout and ctx are
// enforced by killing the worker (the sandbox gets a new one for its next run).
func (d *Driver) Exec(ctx context.Context, id string, req driver.ExecRequest) (driver.ExecResult, error) {
	b, err := d.lookup(id)
	if err != nil {
		return driver.ExecResult{}, err
	}
	env, err := buildEnv(req.Env)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
	}
	if req.Context != "" && !protocol.ValidContextName(req.Context) {
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: invalid context name %q", id, req.Context)
	}
	return d.exec(ctx, b, protocol.Run{Code: req.Code, Env: env, MaxOutput: req.MaxOutput, Agent: req.Agent, Context: req.Context}, req)
}

// exec runs m in b's worker (see Exec), in steps: acquire the worker (noWorker when there is
// none), send it the run, stream the output until the run ends (the worker killed if it does not
// end by itself), release the worker for the next run, classify the end.
func (d *Driver) exec(ctx context.Context, b *box, m protocol.Run, req driver.ExecRequest) (driver.ExecResult, error) {
	w, err := d.worker(ctx, b)
	if err != nil {
		return noWorker(ctx, b, err)
	}
	restarted := ""
	if m.Context != "" {
		restarted = b.contextBefore(m.Context, w)
	}
	e, err := d.send(b, w, m)
	if err != nil {
		b.loseContexts(w, "the sandbox's WASM worker could not take a run, and every code context of the sandbox ended with it")
		return driver.ExecResult{}, err
	}
	e.stream(ctx, req)
	d.release(e, len(m.Args) == 0)
	res, err := e.classify(ctx)
	if m.Context != "" && err == nil {
		b.contextAfter(m.Context, w, e.ex, &res, restarted)
	}
	if e.ex == nil {
		// The worker was killed (or died): the instances of the sandbox's contexts with it.
		b.loseContexts(w, workerKilled(res.Status))
	}
	return res, err
}

// execution is one run in a worker, as exec's steps pass it on.
type execution struct {
	b         *box
	w         *proc
	group     string        // the sandbox's cgroup
	cpuBefore time.Duration // the cgroup's CPU time when the run was sent
	oomBefore int64         // the cgroup's OOM kills when the run was sent
	res       driver.ExecResult

	// How the run ended (stream): by the worker's report (ex), killed by exec at the timeout or
	// at ctx's end (stopped), or with the worker's frames (readErr: it died or broke the protocol).
	ex      *protocol.Exit
	stopped driver.Status
	readErr error
	// oomKill: the cgroup's OOM-kill count went up during the run (release).
	oomKill bool
}

// noWorker is the end of a run that got no worker (acquiring one failed with err): cancelled when
// ctx ended meanwhile, else err — ErrNotFound (the sandbox was destroyed) as it is.
func noWorker(ctx context.Context, b *box, err error) (driver.ExecResult, error) {
	if ctx.Err() != nil {
		res := driver.ExecResult{Started: time.Now()}
		driver.Classify(driver.Outcome{Cancelled: true}, &res)
		return res, nil
	}
	if errors.Is(err, driver.ErrNotFound) {
		return driver.ExecResult{}, err
	}
	return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: %w", b.id, err)
}

// send starts run m in b's worker w: it reads the cgroup's figures the run is measured from, then
// sends the run (its output budget defaulted). The run's start is the moment it is sent. A worker
// that cannot take the run is killed and dropped (the sandbox gets a fresh one next time).
func (d *Driver) send(b *box, w *proc, m protocol.Run) (*execution, error) {
	b.mu.Lock()
	group := b.group
	b.mu.Unlock()
	e := &execution{b: b, w: w, group: group}
	e.cpuBefore, _ = d.cg.CPUUsage(group)
	e.oomBefore, _ = d.cg.OOMKills(group)
	if m.MaxOutput <= 0 {
		m.MaxOutput = protocol.DefaultMaxOutput
	}
	e.res.Started = time.Now()
	if err := w.fw.SendJSON(protocol.FrameRun, m); err != nil {
		w.kill()
		b.dropWorker(w)
		return nil, fmt.Errorf("exec in sandbox %s: %w: %v%s", b.id, errWorkerGone, err, w.logTail())
	}
	return e, nil
}

// stream collects the run's output, passing each chunk to req.OnOutput as it comes, until the run
// ends (see await). A run that did not end by itself has its worker killed (or already dead)
// and dropped: the sandbox gets a fresh one for its next run. When stream returns, nothing reads
// the worker's socket any more, and e.res.Duration is the run's wall time.
func (e *execution) stream(ctx context.Context, req driver.ExecRequest) {
	frames, stop := readFrames(e.w)
	defer stop() // after the kill below, which ends a read that would block
	var timeout <-chan time.Time
	if req.Timeout > 0 {
		t := time.NewTimer(req.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	// A worker sends one call at a time; each is answered while await goes on reading output.
	calls := pyrunner.NewCallServer(ctx, func(ctx context.Context, line []byte) []byte {
		return driver.AnswerAgentCall(ctx, req, line)
	}, func(ans []byte) {
		_ = e.w.fw.Send(protocol.FrameAnswer, ans) // fails only if the worker is gone
	})
	e.await(ctx, frames, timeout, req.OnOutput, calls)
	calls.Stop()
	e.res.Duration = time.Since(e.res.Started)
	if e.ex == nil {
		e.w.kill()
		e.b.dropWorker(e.w)
	}
}

// frame is one frame read from a worker, or the error that ended its frames.
type frame struct {
	typ byte
	p   []byte
	err error
}

// readFrames reads w's frames in a goroutine and passes them on until a read fails or the run's
// exit frame has come. stop ends the goroutine and waits for it: a read that blocks must have been
// ended first (by killing the worker).
func readFrames(w *proc) (frames <-chan frame, stop func()) {
	ch := make(chan frame)
	stopRead := make(chan struct{})
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			t, p, err := protocol.ReadFrame(w.br)
			select {
			case ch <- frame{t, p, err}:
			case <-stopRead:
				return
			}
			if err != nil || t == protocol.FrameExit {
				return
			}
		}
	}()
	return ch, func() {
		close(stopRead)
		<-readDone
	}
}

// await takes the run's frames until it ends: its exit frame (e.ex), the timeout or ctx's end
// (e.stopped), or a read error or a frame out of place (e.readErr). Output goes to e.res and to
// onOutput, if set.
func (e *execution) await(ctx context.Context, frames <-chan frame, timeout <-chan time.Time, onOutput func(driver.Stream, []byte), calls *pyrunner.CallServer) {
	for {
		select {
		case f := <-frames:
			if f.err != nil {
				e.readErr = f.err
				return
			}
			switch f.typ {
			case protocol.FrameStdout, protocol.FrameStderr:
				s, buf := driver.Stdout, &e.res.Stdout
				if f.typ == protocol.FrameStderr {
					s, buf = driver.Stderr, &e.res.Stderr
				}
				*buf = append(*buf, f.p...)
				if onOutput != nil {
					onOutput(s, f.p)
				}
			case protocol.FrameCall:
				calls.Serve(f.p)
			case protocol.FrameExit:
				var ex protocol.Exit
				if err := json.Unmarshal(f.p, &ex); err != nil {
					e.readErr = fmt.Errorf("exit message: %w", err)
				} else {
					e.ex = &ex
				}
				return
			default:
				e.readErr = fmt.Errorf("unexpected frame %q from the worker", f.typ)
				return
			}
		case <-timeout:
			e.stopped = driver.StatusTimeout
			return
		case <-ctx.Done():
			e.stopped = driver.StatusCancelled
			return
		}
	}
}

// release reads what the run cost the sandbox's cgroup (CPU time, OOM kills) and, when the run
// ended by itself and was a runner's (not a command line of its own), has the worker start the
// next run's instance, the standby: only now, so that its start-up counts for no run. A worker
// that died meanwhile is found dead by the next run.
func (d *Driver) release(e *execution, runner bool) {
	if cpu, err := d.cg.CPUUsage(e.group); err == nil {
		e.res.CPU = max(cpu-e.cpuBefore, 0)
	}
	oomAfter, err := d.cg.OOMKills(e.group)
	e.oomKill = err == nil && oomAfter > e.oomBefore
	if e.ex != nil && runner {
		_ = e.w.fw.Send(protocol.FrameStandby, nil)
		if e.ex.Standby {
			e.b.standbyRuns.Add(1)
		}
	}
}

// classify returns the run's result, its status from driver.Classify: of the worker's report
// when the run ended by itself; else of the kill (timeout, ctx's end, the sandbox destroyed) or
// of the memory limit that killed the worker. A worker that died of nothing known is the driver's
// error (errWorkerGone, with how it ended and its log).
func (e *execution) classify(ctx context.Context) (driver.ExecResult, error) {
	e.b.mu.Lock()
	destroyed := e.b.destroyed
	e.b.mu.Unlock()
	res := e.res
	o := driver.Outcome{
		TimedOut:  e.stopped == driver.StatusTimeout,
		Cancelled: e.stopped == driver.StatusCancelled || destroyed || ctx.Err() != nil,
		OOMKill:   e.oomKill,
	}
	if e.ex != nil {
		e.report(&res)
		o.Exited, o.ExitCode, o.OutOfMemory = true, e.ex.ExitCode, outOfMemory(res.Error, e.ex)
	}
	if !driver.Classify(o, &res) {
		state := "still running"
		if e.w.waitExit(time.Second) {
			state = e.w.state.String()
		}
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: %w (%s): %v%s", e.b.id, errWorkerGone, state, e.readErr, e.w.logTail())
	}
	return res, nil
}

// report fills res from the worker's report of a run that ended by itself: truncation, the
// memory peak, the run's own duration, and the runner's result and error — a StackOverflow when
// the guest's stack overflowed and the runner could report nothing.
func (e *execution) report(res *driver.ExecResult) {
	ex := e.ex
	res.StdoutTruncated, res.StderrTruncated = ex.StdoutTruncated, ex.StderrTruncated
	res.MemoryPeak = ex.MemoryPeak
	if ex.DurationNS > 0 {
		res.Duration = time.Duration(ex.DurationNS)
	}
	if len(ex.Report) > 0 {
		if rep, err := pyrunner.ParseReport(ex.Report); err == nil {
			res.SetRich(rep.Rich)
			if len(rep.Result) > 0 {
				res.Result = rep.Result
			}
			res.Error = (*driver.PyError)(rep.Error)
		}
	}
	if ex.StackOverflow && res.Error == nil {
		// The guest trapped: the runner reported nothing. Say what happened.
		res.Error = &driver.PyError{Type: "StackOverflow", Message: protocol.StackOverflowMessage}
	}
}

// outOfMemory reports whether a failed run failed for want of memory under its limit: the guest
// was refused memory past its cap, and the run ended in an uncaught MemoryError, a trap or a
// failure without a reported exception (the runner could not report it: formatting needs memory
// too). A MemoryError without a refusal (a request no allocator could grant, say) is an ordinary
// failure, as it is in a container, where only the memory limit's kill is oom.
func outOfMemory(e *driver.PyError, ex *protocol.Exit) bool {
	return ex.GrowRefused && (e == nil || e.Type == "MemoryError")
}

// Destroy kills sandbox id's worker and removes its cgroup (killing anything left in it) and its
// state dir. Idempotent; works from disk alone (after a crash of sandboxd).
// Cleaning up is not abandoned when ctx ends.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	_ = ctx // cleaning up is short and must not be abandoned
	dir := d.boxDir(id)
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	var group string
	if b != nil {
		b.mu.Lock()
		b.destroyed = true
		w := b.w
		b.w = nil
		group = b.group
		b.mu.Unlock()
		if w != nil {
			w.kill()
		}
	} else if m, err := readMeta(dir); err == nil {
		group = m.Cgroup
	}
	var errs []error
	if group != "" && strings.HasPrefix(group, d.cgParent+"/") {
		if err := d.cg.Remove(group); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("destroy sandbox %s: %w", id, errors.Join(errs...))
	}
	d.mu.Lock()
	if d.boxes[id] == b {
		delete(d.boxes, id)
	}
	d.mu.Unlock()
	return nil
}

// List returns the sandboxes with a state dir (a sandbox's cgroup is recorded there; cgroups of
// no sandbox are removed when the driver opens).
func (d *Driver) List(ctx context.Context) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(d.stateDir, sandboxesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && statedir.CheckID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	slices.Sort(ids)
	return ids, nil
}

// Close stops the pools and kills their idle workers. Sandboxes are left as they are (their
// workers die with sandboxd; a new driver on the same state dir lists and removes them). The
// driver is not usable afterwards.
func (d *Driver) Close() error {
	d.mu.Lock()
	d.closed = true
	pools := d.pools
	d.pools = map[string]*pool{}
	d.mu.Unlock()
	for _, p := range pools {
		p.close()
	}
	// The driver's cgroup parent goes too once no sandbox is left in it, and the root of every
	// wasm driver's groups once no other server has any.
	for _, m := range d.cg.Mounts() {
		_ = os.Remove(cgroup.Dir(m, d.cgParent))
		_ = os.Remove(cgroup.Dir(m, cgroupRoot))
	}
	return nil
}

// chownDir gives directory dir (not a link to one) to uid:gid, mode 0700.
func chownDir(dir string, uid, gid int) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, uid, gid); err != nil {
		return err
	}
	return unix.Fchmod(fd, 0o700)
}

// Kill SIGKILLs sandbox id's worker (its process group) and whatever else is in its cgroup, without
// waiting or releasing anything (driver.Killer: a stop whose grace ran out). Idempotent; Destroy
// still reaps the worker and removes the cgroup.
func (d *Driver) Kill(id string) error {
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b == nil {
		return nil
	}
	b.mu.Lock()
	w, group := b.w, b.group
	b.mu.Unlock()
	if w != nil {
		_ = syscall.Kill(-w.pid, syscall.SIGKILL)
	}
	if group == "" || !strings.HasPrefix(group, d.cgParent+"/") {
		return nil
	}
	pids, err := d.cg.Procs(group)
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	if err != nil {
		return fmt.Errorf("kill sandbox %s: %w", id, err)
	}
	return nil
}
