// Package container is the sandbox driver that runs each sandbox as an OCI container with crun (or
// runc, or gVisor's runsc when the operator or the image asks for it: runtime.go, broker.go),
// driven through the runtime's command line with a config.json generated from the runtime-spec
// types. It registers itself as driver "container".
//
// A sandbox is one long-lived container whose PID 1 is sandbox-agent (bound read-only at
// /.sandbox/bin/sandbox-agent); each Exec is one run the agent executes, over the unix socket
// <state>/sandboxes/<id>/agent.sock, which the driver binds in that root-only directory (mounted
// nowhere in the sandbox) and hands to the agent as an inherited descriptor. The container runs
// as uid 10000 of a user namespace that maps it onto the sandbox's own host ids (Spec.HostIDs;
// userns.go), with no capabilities, no_new_privs, Docker's default seccomp profile, its own PID,
// mount, IPC, UTS, cgroup and network namespaces, a read-only root, /tmp on the sandbox's disk
// (Spec.TmpDir), and cgroup limits for CPU, memory (swap included) and process count.
//
// Network: each sandbox's network namespace is made by package netsetup (a veth pair to the host,
// nftables on both sides) and joined by the container; the driver's egress gateway (package
// egress) listens on the host side's address — DNS (53, also what /etc/resolv.conf names), the
// HTTP proxy (3128, in every run's HTTP(S)_PROXY) and the transparent proxy the host's rules send
// the sandbox's other TCP to — and enforces Spec.Network. Every decision goes to
// Options.OnNetwork.
//
// The root is an overlay (lower: the image, never written; upper: per sandbox) that the driver
// mounts in sandboxd's private mount namespace (package mountns), so mount points for
// user paths can be created without touching the image and no mount outlives sandboxd.
//
// Everything of a sandbox is on disk under Options.StateDir: runtime state under runtime/<name>,
// sandboxes/<id>/{meta.json, config.json, upper, work, agent.sock, agent.log}, and the network
// namespaces under net/ns/<id>; its root and what it binds are in the driver's mount directory
// (mountdir.go), gone with sandboxd's mount namespace. Destroy and List work from disk (and the host's
// links) alone, so sandboxes left by a crashed process can be found and removed.
package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/mountns"
	"github.com/sandboxd/sandboxd/internal/netsetup"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Name is the driver's registry name.
const Name = "container"

func init() {
	driver.Register(Name, func(opts driver.Options) (driver.Driver, error) { return Open(opts) })
}

// Tunables.
const (
	readyTimeout   = 15 * time.Second // Create: container start to agent ready, at most
	destroyTimeout = 30 * time.Second // Destroy: bound of the runtime commands
	agentGrace     = 10 * time.Second // Exec: how long past the run's timeout the agent may take to answer
	stragglerWait  = 500 * time.Millisecond
	stragglerLimit = 15 * time.Second // a fork bomb thrashing at its memory limit can take seconds to die
	logCap         = 1 << 20          // bytes of container stdout/stderr kept in agent.log
	logTail        = 2048             // bytes of agent.log quoted in errors
	maxSocketPath  = 107              // sun_path holds 108 bytes with the NUL
)

// probeResources are the limits of the runtime probe container.
var probeResources = driver.Spec{CPU: 0.1, MemoryBytes: 32 << 20, PidsLimit: 8, HostIDs: driver.HelperIDs}

// Driver is the container driver. It is safe for concurrent use.
type Driver struct {
	stateDir string
	log      *slog.Logger  // Options.Log()
	mnt      string        // the driver's directory in sandboxd's mount namespace (mountns.Dir): sandbox roots, what they bind
	agentBin string        // the agent binary, copied into mnt
	rt       *ociRuntime   // the runtime of new sandboxes whose spec names none
	all      []*ociRuntime // every runtime found: for sandboxes that name theirs, listing, destroying
	probeMu  sync.Mutex
	probed   map[string]error // runtimes probed so far (by name) and how it went
	cg       cgroupLayout
	seccomp  *specs.LinuxSeccomp
	net      *netsetup.Manager // per-sandbox network plumbing
	gw       *egress.Gateway   // per-sandbox DNS, HTTP proxy and transparent proxy

	nsenter      string // util-linux nsenter, which starts zygotes ("": sandboxes get none)
	unshare, cat string // util-linux unshare and cat, which make and hold owned user namespaces (userns.go)
	zygoteFilter []byte // d.seccomp compiled for zygotes (see zygote.go)

	mu    sync.Mutex
	boxes map[string]*box // sandboxes this process knows (created or loaded from disk)
}

// meta is the per-sandbox record on disk (meta.json): what Exec and Destroy need after a restart.
type meta struct {
	ID         string    `json:"id"`
	Runtime    string    `json:"runtime"`
	AllowSpawn bool      `json:"allow_spawn"`
	Pid        int       `json:"pid"` // host PID of the container's init (the agent)
	Created    time.Time `json:"created"`
	Gateway    string    `json:"gateway,omitempty"` // the sandbox's egress gateway address
	Broker     int       `json:"broker,omitempty"`  // runsc: host PID of the agent's broker (broker.go)
}

type box struct {
	meta
	dir     string
	logDone chan struct{}                  // closed when the copier of the container's stdout/stderr ends; nil after a reload
	standby atomic.Int64                   // the agent's standby process for the next run (PID inside the sandbox; 0: none)
	ctxPIDs atomic.Pointer[map[string]int] // the code contexts' interpreters (PIDs inside the sandbox) by name, as the agent last said
	zygote  chan struct{}                  // closed once startZygote has returned; nil after a reload
	zygoted bool                           // startZygote started one (read once zygote is closed)
	broker  *os.Process                    // runsc: the agent's broker started by this process (nil after a reload)
	known   knownProcs                     // the straggler check's own processes, pinned by pidfds
}

// Open opens the container driver: it requires mountns.Enter to have run, checks the agent
// binary, and picks the OCI runtime (opts.Runtime, or crun then runc) by creating a real probe
// container with it. It fails with an error naming the fix when no runtime works. Then it sets up
// networking: the netsetup manager (which removes the veths and host rules a crashed process
// left) and the egress gateway. Close releases them.
func Open(opts driver.Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errors.New("container driver: Options.StateDir is required")
	}
	if !mountns.Entered() {
		return nil, errors.New("container driver: call mountns.Enter() first thing in main (sandboxd must run in a private mount namespace)")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("container driver: needs root")
	}
	stateDir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(stateDir, sandboxesDir), 0o700); err != nil {
		return nil, fmt.Errorf("container driver: state dir: %w", err)
	}
	if opts.AgentBin == "" {
		return nil, errors.New("container driver: Options.AgentBin (the sandbox-agent binary) is required")
	}
	agentBin, err := filepath.Abs(opts.AgentBin)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(agentBin); err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("container driver: sandbox-agent binary %s is missing or not executable (build it: CGO_ENABLED=0 go build ./cmd/sandbox-agent)", agentBin)
	}
	cg, err := readCgroupLayout()
	if err != nil {
		return nil, fmt.Errorf("container driver: cgroups: %w", err)
	}
	prof, err := defaultSeccomp()
	if err != nil {
		return nil, fmt.Errorf("container driver: %w", err)
	}
	mnt, err := mountns.Dir(stateDir)
	if err != nil {
		return nil, fmt.Errorf("container driver: %w", err)
	}
	d := &Driver{stateDir: stateDir, log: opts.Log(), mnt: mnt, agentBin: agentBin, cg: cg, seccomp: prof, boxes: map[string]*box{}}
	if err := d.openMountDir(); err != nil {
		return nil, fmt.Errorf("container driver: %w", err)
	}
	d.openZygotes()

	candidates := knownRuntimes
	switch opts.Runtime {
	case "":
	case "crun", "runc", runscName:
		candidates = []string{opts.Runtime}
	default:
		return nil, fmt.Errorf("container driver: unknown OCI runtime %q (want crun, runc or runsc)", opts.Runtime)
	}
	bin := func(name string) string {
		if name == runscName {
			return opts.RunscBin
		}
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var problems []string
	for _, name := range candidates {
		rt, err := newRuntime(name, bin(name), stateDir)
		if err == nil {
			err = rt.probe(ctx, stateDir, mnt, d.agentBin, prof)
		}
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		d.rt = rt
		break
	}
	if d.rt == nil {
		hint := installHint
		if opts.Runtime == runscName {
			hint = "build runsc with scripts/build-runsc.sh"
		}
		if mountns.HybridCgroup() {
			hint += "; crun needs cgroup2 unmounted on this cgroup v1 hybrid host (mountns.Enter does it)"
		}
		return nil, fmt.Errorf("container driver: no working OCI runtime (%s): %s", strings.Join(problems, "; "), hint)
	}
	d.probed = map[string]error{d.rt.name: nil}
	// Every runtime found, for sandboxes that name theirs (probed at first use) and for listing
	// and destroying what older processes made with them.
	for _, name := range append(knownRuntimes[:len(knownRuntimes):len(knownRuntimes)], runscName) {
		if name == d.rt.name {
			d.all = append(d.all, d.rt)
		} else if rt, err := newRuntime(name, bin(name), stateDir); err == nil {
			d.all = append(d.all, rt)
		}
	}
	if slices.ContainsFunc(d.all, (*ociRuntime).ownedUserNS) {
		if d.unshare, err = exec.LookPath("unshare"); err == nil {
			d.cat, err = exec.LookPath("cat")
		}
		if err != nil {
			return nil, fmt.Errorf("container driver: making each sandbox's user namespace needs util-linux's unshare and cat (install util-linux and coreutils): %w", err)
		}
	}
	d.removeStaleHelpers(ctx)
	if err := d.openNetwork(opts); err != nil {
		return nil, fmt.Errorf("container driver: %w", err)
	}
	return d, nil
}

// netDir is the netsetup manager's state dir (the network namespace files).
const netDir = "net"

func (d *Driver) openNetwork(opts driver.Options) error {
	m, err := netsetup.New(netsetup.Config{
		StateDir: filepath.Join(d.stateDir, netDir), Pool: opts.NetworkPool, OnDecision: opts.OnNetwork,
	})
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	// The gateway adds the always-denied set and the host's addresses itself; other sandboxes
	// are the pool. Its DNS answers are pinned in the host's rules before they leave (m.Pin):
	// connections by address to other ports than 80 and 443 are decided there, at connect.
	gw, err := egress.NewGateway(egress.Config{
		Resolver: opts.Resolver, OnDecision: opts.OnNetwork, Denied: []netip.Prefix{m.Pool()}, OnAnswer: m.Pin,
	})
	if err != nil {
		m.Close()
		return fmt.Errorf("egress gateway: %w", err)
	}
	d.net, d.gw = m, gw
	return nil
}

// Close stops the driver's egress gateway and network manager, waiting for teardowns in
// progress. Sandboxes are left as they are (a new driver on the same state dir finds and removes
// them); their network is cut until then.
func (d *Driver) Close() error {
	// The sandboxes' cgroup parent goes too when no sandbox (of any server) is left in it.
	for _, m := range d.cg.Mounts() {
		_ = os.Remove(cgroup.Dir(m, cgroupParent))
	}
	for _, rt := range d.all {
		rt.close()
	}
	// The sandboxes live on (a reopened driver finds them); the straggler check's pidfds of their
	// processes are this driver's.
	d.mu.Lock()
	for _, b := range d.boxes {
		b.known.close()
	}
	d.mu.Unlock()
	return errors.Join(d.gw.Close(), d.net.Close())
}

// Containers of the driver's own that are not sandboxes: runtime probes and floor measurements.
const (
	probePrefix = "probe-"
	floorPrefix = "floor-"
)

func isHelper(id string) bool {
	return strings.HasPrefix(id, probePrefix) || strings.HasPrefix(id, floorPrefix)
}

// removeStaleHelpers removes probe and floor containers an earlier process left behind (it
// crashed while one ran). Best effort.
func (d *Driver) removeStaleHelpers(ctx context.Context) {
	for _, rt := range d.all {
		ids, _ := rt.list(ctx)
		for _, id := range ids {
			if isHelper(id) {
				_ = rt.delete(ctx, id)
				_ = d.cg.removeCgroups(id)
			}
		}
	}
	for _, sub := range []string{"probe", "floor"} {
		ents, _ := os.ReadDir(filepath.Join(d.stateDir, sub))
		for _, e := range ents {
			if !slices.ContainsFunc(d.all, func(rt *ociRuntime) bool { return rt.exists(e.Name()) }) {
				_ = os.RemoveAll(filepath.Join(d.stateDir, sub, e.Name()))
			}
		}
	}
}

// Name returns "container".
func (d *Driver) Name() string { return Name }

// Runtime returns the name of the OCI runtime of new sandboxes whose spec names none ("crun",
// "runc" or "runsc").
func (d *Driver) Runtime() string { return d.rt.name }

// runtime returns the runtime named name ("": the default), probing it on first use (a probe
// container, as Open does for the default): nil and why when it cannot run sandboxes here.
func (d *Driver) runtime(ctx context.Context, name string) (*ociRuntime, error) {
	if name == "" {
		return d.rt, nil
	}
	i := slices.IndexFunc(d.all, func(rt *ociRuntime) bool { return rt.name == name })
	if i < 0 {
		if name == runscName {
			return nil, fmt.Errorf("OCI runtime runsc is not available: build it with scripts/build-runsc.sh and pass its path (--runsc)")
		}
		return nil, fmt.Errorf("OCI runtime %q is not available here (want crun, runc or runsc, installed)", name)
	}
	rt := d.all[i]
	d.probeMu.Lock()
	defer d.probeMu.Unlock()
	err, done := d.probed[name]
	if !done {
		err = rt.probe(ctx, d.stateDir, d.mnt, d.agentBin, d.seccomp)
		if ctx.Err() == nil {
			d.probed[name] = err
		}
	}
	if err != nil {
		return nil, fmt.Errorf("OCI runtime %s does not work here: %w", name, err)
	}
	return rt, nil
}

// runtimeOfID returns the runtime of sandbox id (d.rt when the driver does not know it).
func (d *Driver) runtimeOfID(id string) *ociRuntime {
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b == nil {
		return d.rt
	}
	return d.runtimeOf(b)
}

// runtimeOf returns the runtime sandbox b was made with (d.rt if that one is gone).
func (d *Driver) runtimeOf(b *box) *ociRuntime {
	for _, rt := range d.all {
		if rt.name == b.Runtime {
			return rt
		}
	}
	return d.rt
}

// Check asks the runtime to list our containers: cheap, and proves the binary still answers.
func (d *Driver) Check(ctx context.Context) error {
	if _, err := d.rt.output(ctx, "list", "--quiet"); err != nil {
		return fmt.Errorf("container runtime check: %w", err)
	}
	if _, err := os.Stat(d.agentBin); err != nil {
		return fmt.Errorf("container runtime check: sandbox-agent: %w", err)
	}
	return nil
}

func (d *Driver) boxDir(id string) string { return filepath.Join(d.stateDir, sandboxesDir, id) }

func socketPath(dir string) string { return filepath.Join(dir, agent.SocketName) }

// Create provisions sandbox id: overlay root, config.json, `<runtime> run -d`, then waits for the
// agent. On any error (or ctx cancellation) everything is destroyed again.
func (d *Driver) Create(ctx context.Context, id string, spec driver.Spec) (err error) {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	dir := d.boxDir(id)
	if n := len(socketPath(dir)); n > maxSocketPath {
		return fmt.Errorf("create sandbox %s: agent socket path is %d bytes, over the unix limit of %d: use a shorter state directory", id, n, maxSocketPath)
	}
	if err := checkRootFS(spec.RootFS); err != nil {
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	if spec.SitePackages != "" {
		return fmt.Errorf("create sandbox %s: site-packages of a WASM image given to a container (its image holds its packages)", id)
	}
	rt, err := d.runtime(ctx, spec.Runtime)
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	// Claim the id: the state dir is created exclusively.
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create sandbox %s: already exists", id)
		}
		return fmt.Errorf("create sandbox %s: %w", id, err)
	}
	b := &box{meta: meta{ID: id, Runtime: rt.name, AllowSpawn: spec.AllowSpawn, Created: time.Now().UTC()}, dir: dir}
	d.mu.Lock()
	d.boxes[id] = b
	d.mu.Unlock()
	defer func() {
		if err != nil {
			// Stop the container first so its output is complete, read it, then remove everything.
			_ = rt.delete(context.WithoutCancel(ctx), id)
			if b.broker != nil { // not in the sandbox's cgroups yet, perhaps
				_ = b.broker.Kill()
			}
			tail := logTailOf(b)
			if derr := d.Destroy(context.WithoutCancel(ctx), id); derr != nil {
				err = fmt.Errorf("%w (and cleaning up failed: %v)", err, derr)
			}
			err = fmt.Errorf("create sandbox %s: %w%s", id, err, tail)
		}
	}()
	if err := statedir.WriteJSON(filepath.Join(dir, "meta.json"), b.meta); err != nil {
		return err
	}
	// The overlay's root dir takes the upper dir's mode: the image's 0755.
	for _, sub := range []string{"upper", "work"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o755); err != nil {
			return err
		}
	}
	mdir := d.sandboxMountDir(id)
	merged := filepath.Join(mdir, "root")
	if err := os.Mkdir(mdir, 0o711); err != nil {
		return err
	}
	if err := os.Mkdir(merged, 0o755); err != nil {
		return err
	}
	// The user namespace (a fork + exec: userns.go) is made while the root and the network are set
	// up; an early return still waits for it and lets it go.
	type madeNS struct {
		ns  *userNS
		err error
	}
	var nsc chan madeNS
	if rt.ownedUserNS() {
		nsc = make(chan madeNS, 1)
		go func() {
			ns, err := d.newUserNS(spec.HostIDs)
			nsc <- madeNS{ns, err}
		}()
		defer func() {
			if nsc != nil {
				if m := <-nsc; m.ns != nil {
					m.ns.close()
				}
			}
		}()
	}
	if err := mountOverlay(spec.RootFS, filepath.Join(dir, "upper"), filepath.Join(dir, "work"), merged); err != nil {
		return err
	}
	nb, err := d.setupNetwork(ctx, b, spec.Network)
	if err != nil {
		return err
	}
	if spec.HostReady != nil { // the disk, made by the service meanwhile
		if err := spec.HostReady(); err != nil {
			return err
		}
	}
	mounts, masked, cwd, err := d.planMounts(mdir, merged, spec)
	if err != nil {
		return err
	}
	// The agent starts the first run's Python at once (see agent.RunResult.StandbyPID).
	prestart := "0"
	if spec.AllowSpawn {
		prestart = "1"
	}
	cs := containerSpec{id: id, rootfs: merged, args: []string{agentPath, "--prestart", prestart}, cwd: cwd, mounts: mounts,
		masked: masked, res: spec, netns: nb.NSPath, gvisor: rt.gvisor()}
	var userns *userNS
	if nsc != nil {
		m := <-nsc
		nsc = nil
		if m.err != nil {
			return m.err
		}
		userns, cs.userns = m.ns, m.ns.path
	}
	err = statedir.WriteJSON(filepath.Join(dir, "config.json"), makeSpec(cs, d.seccomp))
	if err == nil {
		err = d.start(ctx, rt, b, spec.HostIDs)
	}
	if userns != nil {
		go userns.close() // the container's processes hold the namespace now
	}
	if err != nil {
		return err
	}
	if err := statedir.WriteJSON(filepath.Join(dir, "meta.json"), b.meta); err != nil {
		return err
	}
	// OOM detection depends on the memory cgroup being where we expect it: never fail silently.
	if _, err := d.cg.oomKills(id); err != nil {
		return fmt.Errorf("the sandbox's memory cgroup is not where expected (%s): %w", d.cg.memoryDir(id), err)
	}
	if err := d.waitReady(ctx, b); err != nil {
		return err
	}
	// In the background (Warm waits for it, Destroy too). Without a zygote the sandbox works all
	// the same — the agent launches each run — so that is no error.
	b.zygote = make(chan struct{})
	go func() {
		defer close(b.zygote)
		started, err := d.startZygote(b)
		if err != nil {
			d.log.Warn("no zygote: the agent launches the sandbox's runs", "sandbox", id, "err", err)
		}
		b.zygoted = started
	}()
	return nil
}

// Warm waits until sandbox id's zygote runs and has forked the agent's standby (driver.Warmer),
// or there is none, or ctx ends.
func (d *Driver) Warm(ctx context.Context, id string) error {
	b, err := d.lookup(id)
	if err != nil {
		return err
	}
	if b.zygote == nil {
		return nil
	}
	select {
	case <-b.zygote:
	case <-ctx.Done():
		return ctx.Err()
	}
	if !b.zygoted {
		return nil
	}
	// Polled, from every 2 ms up to every 25 ms: each look lists the cgroup's processes and, once
	// there are enough for a zygote's child, reads each one's status in /proc; a zygote's start takes from tens of ms to over a second on a busy machine (at a
	// steady 2 ms, half of the server's CPU in `bench --cpu-only`).
	t := time.NewTimer(0)
	defer t.Stop()
	every := 2 * time.Millisecond
	for end := time.Now().Add(zygoteWait); time.Now().Before(end); every = min(every*3/2, 25*time.Millisecond) {
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		if d.zygoteReady(id) {
			return nil
		}
		t.Reset(every)
	}
	return nil // no zygote after all: the agent launches the runs
}

// setupNetwork gives sandbox b its network namespace (netsetup) and attaches the egress gateway
// to its gateway address; it writes the resolv.conf that names the gateway. Destroy undoes it.
func (d *Driver) setupNetwork(ctx context.Context, b *box, p egress.Policy) (*netsetup.Sandbox, error) {
	nb, err := d.net.Setup(ctx, b.ID, p)
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	if err := d.gw.Attach(b.ID, nb.Gateway, p); err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	b.Gateway = nb.Gateway.String()
	if err := os.WriteFile(filepath.Join(d.sandboxMountDir(b.ID), "resolv.conf"), []byte("nameserver "+b.Gateway+"\n"), 0o644); err != nil {
		return nil, err
	}
	return nb, nil
}

// Released reports whether nothing of sandbox id is left: its state dir gone and its network
// released down to the kernel's destruction of its namespace (see netsetup.Manager.Released).
// For benchmarks, which wait for it so that a teardown does not overlap what they measure.
func (d *Driver) Released(id string) bool {
	if _, err := os.Stat(d.boxDir(id)); !errors.Is(err, fs.ErrNotExist) {
		return false
	}
	return d.net.Released(id)
}

// CPUUsage returns the CPU time every process of sandbox id has used so far, dead ones included
// (its cgroup's): for benchmarks.
func (d *Driver) CPUUsage(id string) (time.Duration, error) {
	return d.cg.CPUUsage(cgroupGroup(id))
}

// SetNetwork replaces the egress policy of ready sandbox id (driver.NetworkSetter): the host rules
// stay (p must have their shape), the gateway enforces p from now on.
func (d *Driver) SetNetwork(ctx context.Context, id string, p egress.Policy) error {
	b, err := d.lookup(id)
	if err != nil {
		return err
	}
	if exited(b.Pid) { // a warm sandbox whose agent died while it waited is of no use
		return fmt.Errorf("sandbox %s: its agent (the container's init) has exited", id)
	}
	if err := d.net.SetPolicy(id, p); err != nil {
		return err
	}
	return d.gw.SetPolicy(id, p)
}

// proxyEnv is what every run's environment gets when the sandbox has a gateway: the gateway's
// HTTP proxy for HTTP and HTTPS, loopback exempt. These variables are the driver's: they replace
// the caller's (clients that ignore them are caught by the transparent proxy anyway).
func proxyEnv(gateway string) map[string]string {
	if gateway == "" {
		return nil
	}
	proxy := "http://" + netip.AddrPortFrom(netip.MustParseAddr(gateway), netsetup.ProxyPort).String()
	noProxy := "localhost,127.0.0.1,::1"
	return map[string]string{
		"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
		"NO_PROXY": noProxy, "no_proxy": noProxy,
	}
}

// waitReady waits for the agent to answer on its socket, for at most readyTimeout, and
// fails at once if the agent (the container's init) exits meanwhile.
func (d *Driver) waitReady(ctx context.Context, b *box) error {
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	died := make(chan struct{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if exited(b.Pid) {
					close(died)
					cancel()
					return
				}
			}
		}
	}()
	err := agentWaitReady(rctx, socketPath(b.dir))
	close(stop)
	wg.Wait()
	select {
	case <-died:
		return errors.New("the agent (container init) exited during start")
	default:
	}
	if err != nil {
		return fmt.Errorf("agent not ready: %w", err)
	}
	return nil
}

func checkRootFS(rootfs string) error {
	if rootfs == "" || !filepath.IsAbs(rootfs) {
		return fmt.Errorf("root filesystem %q is not an absolute path", rootfs)
	}
	if strings.ContainsAny(rootfs, ",:") {
		return fmt.Errorf("root filesystem path %q contains ',' or ':' (not usable as an overlay lower dir)", rootfs)
	}
	st, err := os.Stat(rootfs)
	if err != nil {
		return fmt.Errorf("root filesystem: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("root filesystem %s is not a directory", rootfs)
	}
	return nil
}

// start runs `<runtime> run -d`, with the container's stdout/stderr copied into agent.log (capped)
// by a goroutine that ends when the container's last process does. ids is the sandbox's first
// host id (the broker's user under runsc).
func (d *Driver) start(ctx context.Context, rt *ociRuntime, b *box, ids uint32) error {
	logf, err := os.OpenFile(filepath.Join(b.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		logf.Close()
		return err
	}
	b.logDone = make(chan struct{})
	go func() {
		defer close(b.logDone)
		defer logf.Close()
		defer pr.Close()
		_, _ = io.Copy(logf, io.LimitReader(pr, logCap))
		_, _ = io.Copy(io.Discard, pr)
	}()
	// The agent's socket: bound here, in the sandbox's root-only state dir, and passed to the agent
	// as its descriptor 3 (agent.ListenFD): the only way to it is this path, which nothing inside
	// the sandbox can see, create or replace. Under gVisor the agent gets a broker socket there
	// instead, and the listening socket goes to the broker (broker.go).
	ln, err := agent.Listen(socketPath(b.dir))
	if err != nil {
		pw.Close()
		return err
	}
	defer ln.Close()
	pidFile := filepath.Join(b.dir, "pid")
	fdArgs := []string{"--preserve-fds", "1"}
	agentFD := ln
	if rt.gvisor() {
		if agentFD, err = d.startBroker(b, ln, ids, pw); err != nil {
			pw.Close()
			return err
		}
		defer agentFD.Close()
		fdArgs = []string{"--pass-fd", "3:" + strconv.Itoa(agent.ListenFD)}
	}
	cmd := rt.command(ctx, append(append([]string{"run", "--detach"}, fdArgs...), "--pid-file", pidFile, "--bundle", b.dir, b.ID)...)
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.ExtraFiles = []*os.File{agentFD}
	err = cmd.Run()
	pw.Close()
	if err != nil {
		return fmt.Errorf("%s run: %w", rt.name, err)
	}
	pb, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("%s run: no pid file: %w", rt.name, err)
	}
	if b.Pid, err = strconv.Atoi(strings.TrimSpace(string(pb))); err != nil {
		return fmt.Errorf("%s run: pid file: %w", rt.name, err)
	}
	if rt.gvisor() {
		// The broker joins the cgroups runsc made: Kill and Destroy's cgroup removal end it with
		// the sandbox (it also exits once the sandbox's end of its socket closes).
		if err := d.joinCgroups(b.ID, b.Broker); err != nil {
			if exited(b.Pid) {
				return errors.New("the agent (container init) exited during start")
			}
			return fmt.Errorf("broker: %w", err)
		}
	}
	return nil
}

// logTailOf returns the end of the sandbox's agent.log, formatted for an error message.
func logTailOf(b *box) string {
	if b.logDone != nil {
		select {
		case <-b.logDone:
		case <-time.After(500 * time.Millisecond):
		}
	}
	data, err := os.ReadFile(filepath.Join(b.dir, "agent.log"))
	if err != nil || len(strings.TrimSpace(string(data))) == 0 {
		return ""
	}
	if len(data) > logTail {
		data = data[len(data)-logTail:]
	}
	return "; runtime/agent log: " + strings.TrimSpace(string(data))
}

// planMounts turns the spec's mounts and blocked paths into OCI mounts (in order: the agent's,
// user mounts parents first, then blocked paths so that they win), creating missing mount points
// inside the overlay root or inside the host dir of the user mount that holds them, so the
// runtime never has to create one in a read-only place. It also chowns user mounts' host dirs to
// the sandbox user, and its /tmp too. It returns extra masked paths and the working directory.
// mdir is the sandbox's mount directory (see mountdir.go), merged its root.
func (d *Driver) planMounts(mdir, merged string, spec driver.Spec) (ms []specs.Mount, masked []string, cwd string, err error) {
	if spec.HostIDs == 0 || spec.HostIDs > driver.HelperIDs-driver.IDsPerSandbox {
		return nil, nil, "", fmt.Errorf("host ids %d: want a range of %d ids below %d", spec.HostIDs, driver.IDsPerSandbox, driver.HelperIDs)
	}
	uid, gid := int(spec.HostIDs+sandboxUID), int(spec.HostIDs+sandboxGID)
	if spec.TmpDir != "" {
		if err := chownDir(spec.TmpDir, uid, gid, 0o1777); err != nil {
			return nil, nil, "", fmt.Errorf("/tmp: %w", err)
		}
	}
	if spec.WorkDir == "" {
		return nil, nil, "", errors.New("the spec has no working directory")
	}
	if err := chownDir(spec.WorkDir, uid, gid, 0o700); err != nil {
		return nil, nil, "", fmt.Errorf("working directory: %w", err)
	}
	if err := mkdirAllInRoot(merged, pyrunner.WorkDir); err != nil {
		return nil, nil, "", fmt.Errorf("working directory's mount point: %w", err)
	}
	// The runtime works in the sandbox's user namespace, where the image's files are nobody's:
	// every mount point must be there before it starts.
	if err := standardMountPoints(merged); err != nil {
		return nil, nil, "", err
	}
	ms = []specs.Mount{
		{Destination: agentPath, Type: "bind", Source: d.agentBin, Options: []string{"bind", "ro", "nosuid", "nodev"}},
		{Destination: pyrunner.WorkDir, Type: "bind", Source: spec.WorkDir, Options: []string{"bind", "rw", "nosuid", "nodev"}},
	}
	// The resolver is the gateway: /etc/resolv.conf names it (user mounts and blocked paths,
	// mounted after, may cover it; DNS to 127.0.0.1:53 reaches the gateway too).
	if resolv := filepath.Join(mdir, "resolv.conf"); fileExists(resolv) {
		ok, err := regularFileInRoot(merged, "etc/resolv.conf")
		if err != nil {
			return nil, nil, "", fmt.Errorf("resolv.conf mount point: %w", err)
		}
		if ok {
			ms = append(ms, specs.Mount{Destination: "/etc/resolv.conf", Type: "bind", Source: resolv, Options: []string{"bind", "ro", "nosuid", "nodev", "noexec"}})
		}
	}
	user := sortMounts(spec.Mounts)
	// where finds the place that holds path p when the mounts before index n are in place: the
	// host dir and relative path, or "" for a tmpfs the runtime mounts itself (nothing to do).
	where := func(p string, n int) (root, rel string) {
		for i := n - 1; i >= 0; i-- {
			if within(p, user[i].Path) {
				return user[i].HostDir, strings.TrimPrefix(strings.TrimPrefix(p, user[i].Path), "/")
			}
		}
		if within(p, "/tmp") {
			return "", ""
		}
		return merged, strings.TrimPrefix(p, "/")
	}
	for i, m := range user {
		if err := checkPath("mount", m.Path); err != nil {
			return nil, nil, "", err
		}
		if m.Path == "/" || slices.ContainsFunc(pseudoFS, func(p string) bool { return within(m.Path, p) }) {
			return nil, nil, "", fmt.Errorf("mount path %q is not allowed", m.Path)
		}
		if !filepath.IsAbs(m.HostDir) {
			return nil, nil, "", fmt.Errorf("mount %s: host dir %q is not absolute", m.Path, m.HostDir)
		}
		if st, err := os.Stat(m.HostDir); err != nil || !st.IsDir() {
			return nil, nil, "", fmt.Errorf("mount %s: host dir %s is not a directory", m.Path, m.HostDir)
		}
		if root, rel := where(m.Path, i); root != "" {
			if err := mkdirAllInRoot(root, rel); err != nil {
				return nil, nil, "", fmt.Errorf("mount %s: mount point: %w", m.Path, err)
			}
		}
		if err := statedir.ChownTree(m.HostDir, uid, gid); err != nil {
			return nil, nil, "", fmt.Errorf("mount %s: %w", m.Path, err)
		}
		mode := "rw"
		if m.ReadOnly {
			mode = "ro"
		}
		ms = append(ms, specs.Mount{Destination: m.Path, Type: "bind", Source: m.HostDir, Options: []string{"rbind", mode, "nosuid", "nodev"}})
	}
	cwd = "/tmp"
	for _, p := range pruneBlocked(spec.Blocked) {
		if err := checkPath("blocked", p); err != nil {
			return nil, nil, "", err
		}
		if p == "/" {
			return nil, nil, "", errors.New("blocked path \"/\" is not allowed")
		}
		if slices.ContainsFunc(pseudoFS, func(f string) bool { return within(p, f) }) {
			masked = append(masked, p)
			continue
		}
		if within("/tmp", p) {
			cwd = "/"
		}
		kind := kindMissing
		root, rel := where(p, len(user))
		if root != "" {
			if kind, err = statInRoot(root, rel); err != nil {
				return nil, nil, "", fmt.Errorf("blocked %s: %w", p, err)
			}
			if kind == kindMissing {
				if err := mkdirAllInRoot(root, rel); err != nil {
					return nil, nil, "", fmt.Errorf("blocked %s: mount point: %w", p, err)
				}
			}
		}
		// An empty, root-owned, mode-000 directory or file is bound read-only over the path. (A
		// mode=000 tmpfs would do for crun, but runc copies the mount point's mode onto a tmpfs.)
		src, err := blockedSource(d.mnt, kind == kindOther)
		if err != nil {
			return nil, nil, "", err
		}
		ms = append(ms, specs.Mount{Destination: p, Type: "bind", Source: src, Options: []string{"bind", "ro", "nosuid", "nodev", "noexec"}})
	}
	return ms, masked, cwd, nil
}

// blockedSource returns (creating it on first use) the empty mode-000 file or directory in dir
// that blocked paths are covered with.
func blockedSource(dir string, file bool) (string, error) {
	src := filepath.Join(dir, "blocked-dir")
	if file {
		src = filepath.Join(dir, "blocked-file")
	}
	if _, err := os.Lstat(src); err == nil {
		return src, nil
	}
	var err error
	if file {
		err = os.WriteFile(src, nil, 0)
	} else {
		err = os.Mkdir(src, 0)
	}
	if err == nil {
		err = os.Chmod(src, 0) // whatever the umask
	}
	return src, err
}

// lookup finds a sandbox this process created or, after a restart, one on disk.
func (d *Driver) lookup(id string) (*box, error) {
	if statedir.CheckID(id) != nil {
		return nil, driver.ErrNotFound
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if b, ok := d.boxes[id]; ok {
		return b, nil
	}
	dir := d.boxDir(id)
	m, err := readMeta(dir)
	if err != nil || m.Pid == 0 {
		return nil, driver.ErrNotFound
	}
	b := &box{meta: m, dir: dir}
	d.boxes[id] = b
	return b, nil
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

// Exec runs req in sandbox id through its agent.
func (d *Driver) Exec(ctx context.Context, id string, req driver.ExecRequest) (driver.ExecResult, error) {
	b, err := d.lookup(id)
	if err != nil {
		return driver.ExecResult{}, err
	}
	oomBefore, err := d.cg.oomKills(id)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: container is gone: %w", id, err)
	}
	env := req.Env
	if pe := proxyEnv(b.Gateway); pe != nil {
		env = make(map[string]string, len(req.Env)+len(pe))
		for k, v := range req.Env {
			env[k] = v
		}
		for k, v := range pe {
			env[k] = v
		}
	}
	areq := agent.RunRequest{
		Code:       req.Code,
		TimeoutMS:  req.Timeout.Milliseconds(),
		Env:        env,
		AllowSpawn: b.AllowSpawn,
		MaxOutput:  req.MaxOutput,
		Context:    req.Context,
		Agent:      req.Agent,
	}
	runCtx := ctx
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, req.Timeout+agentGrace)
		defer cancel()
	}
	onEvent := driver.AgentOutput(req)
	started := time.Now()
	onCall := func(ctx context.Context, call json.RawMessage) []byte { return driver.AnswerAgentCall(ctx, req, call) }
	res, runErr := agentRun(runCtx, socketPath(b.dir), areq, onEvent, onCall)
	wall := time.Since(started)
	// Whatever happened, no process of the run may be left when we return.
	b.standby.Store(int64(res.StandbyPID))
	if runErr == nil {
		b.ctxPIDs.Store(&res.ContextPIDs)
	} else if req.Context != "" && ctx.Err() == nil {
		// No answer, and not the caller's cancel (on which the agent interrupts the code and keeps
		// the interpreter, as a cancel promises): the agent failed or overran, and the context's
		// interpreter may still run the code. It is not spared (the stragglers' kill below ends
		// it) and the next run of the context reports the reset.
		b.dropContextPID(req.Context)
	}
	// With an answer, the run has been reaped: a child of the zygote is the next run's standby.
	if err := d.killStragglers(id, b.Pid, res.StandbyPID, runErr == nil); err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: %w", id, err)
	}
	oomAfter, oomErr := d.cg.oomKills(id)
	oom := oomErr == nil && oomAfter > oomBefore
	if runErr != nil {
		deadline := errors.Is(runErr, context.DeadlineExceeded)
		gvisorOOM := oom && d.runtimeOf(b).gvisor()
		if ctx.Err() == nil && !deadline && !gvisorOOM {
			// The agent failed, not the run: ours. (Under gVisor an OOM kill is the host's memory
			// cgroup killing the Sentry, and the whole sandbox with it: the run's result, after
			// which the sandbox is gone; gVisor has no OOM killer of its own.)
			if oom {
				runErr = fmt.Errorf("%w (the sandbox hit its memory limit)", runErr)
			}
			return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: %w", id, runErr)
		}
		// The caller ended the run, or the agent did not answer in time: a result. When the run
		// thrashed at the memory limit (a fork bomb with allow_spawn), what the code did is an
		// OOM, not a failure of ours.
		killed := driver.ExecResult{Started: started, Duration: wall}
		driver.Classify(driver.Outcome{Cancelled: ctx.Err() != nil, TimedOut: deadline, OOMKill: oom}, &killed)
		return killed, nil
	}
	if res.AgentError != "" {
		return driver.ExecResult{}, fmt.Errorf("exec in sandbox %s: agent: %s", id, res.AgentError)
	}
	return driver.AgentResult(res, started, wall, oom), nil
}

// killStragglers waits until the sandbox has no process of a run left (see runProcesses) — the
// agent kills the run's processes itself — and SIGKILLs what is left after stragglerWait.
func (d *Driver) killStragglers(id string, initPid, standby int, forked bool) error {
	start, lastKill := time.Now(), time.Time{}
	for {
		pids, err := d.runProcesses(id, initPid, standby, forked)
		if err != nil {
			return fmt.Errorf("list sandbox processes: %w", err)
		}
		if len(pids) == 0 {
			return nil
		}
		el := time.Since(start)
		if el > stragglerLimit {
			return fmt.Errorf("%d processes of the run survive SIGKILL: %v", len(pids), pids)
		}
		// Again every stragglerWait: a process forked while the last signals went out escaped them.
		if el > stragglerWait && time.Since(lastKill) > stragglerWait {
			rt := d.runtimeOfID(id)
			for _, p := range pids {
				if rt.gvisor() {
					_ = rt.killGuest(id, p)
				} else {
					_ = syscall.Kill(p, syscall.SIGKILL)
				}
			}
			lastKill = time.Now()
		}
		time.Sleep(time.Millisecond)
	}
}

// runProcesses lists the processes (host PIDs) of sandbox id that are not the sandbox's own:
// everything in its cgroups but its init (the agent, initPid), its zygote (the process outside the
// sandbox's PID namespace), its code contexts' interpreters (children of the zygote or the agent
// whose PIDs in the sandbox the agent listed last) and the agent's standby process for the next run: the one whose PID in
// the sandbox is standby (0: none) and, if forked, any child of the zygote. (The agent answers a
// run only once the zygote has reaped it: after an answer, a child of the zygote is a standby.
// Without an answer it may be the run.)
//
// The status of a process seen at an earlier check is not read again while the host's pidfd of
// it says it lives (knownProcs: a PID cannot be reused while a pidfd of its process is open).
//
// Under gVisor (runsc) the sandbox's processes are not the host's: its cgroups hold the Sentry,
// the gofer and their helpers. There it lists the PIDs inside gVisor (runsc ps) but the agent's
// (1) and the standby's.
func (d *Driver) runProcesses(id string, initPid, standby int, forked bool) ([]int, error) {
	contexts := d.contextPIDs(id)
	if rt := d.runtimeOfID(id); rt.gvisor() {
		if exited(initPid) {
			return nil, nil // the Sentry is gone, and every process of the sandbox with it
		}
		pids, err := rt.guestPIDs(id)
		if err != nil {
			// A Sentry killed by the host (its memory cgroup's OOM killer) takes a moment to go.
			for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
				if exited(initPid) {
					return nil, nil
				}
			}
			return nil, err
		}
		return slices.DeleteFunc(pids, func(p int) bool { return p == 1 || p == standby || contexts[p] }), nil
	}
	pids, err := d.cg.procs(id)
	if err != nil {
		return nil, err
	}
	var procs []sandboxProc
	var zygotes map[int]bool
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b != nil {
		procs, zygotes = b.known.procsOf(pids, initPid)
	} else {
		procs, zygotes = procsOf(pids)
	}
	var out []int
	for _, p := range procs {
		own := p.pid == initPid || len(p.ns) <= 1 || (forked && zygotes[p.ppid]) || (standby > 0 && p.ns[len(p.ns)-1] == standby) ||
			(contexts[p.ns[len(p.ns)-1]] && (zygotes[p.ppid] || p.ppid == initPid))
		if !own {
			out = append(out, p.pid)
		}
	}
	return out, nil
}

// Destroy kills and removes sandbox id: the container (runtime delete --force), its egress gateway,
// its network plumbing (rules at once; veth and namespace in the background), the overlay mount,
// the cgroups in every hierarchy, and the state dir. Idempotent; works from disk alone. Cleaning
// up is not abandoned when ctx ends: it runs to the end (bounded by destroyTimeout).
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
	defer cancel()
	dir := d.boxDir(id)
	var errs []error
	rts := d.all
	if m, err := readMeta(dir); err == nil {
		for _, rt := range d.all {
			if rt.name == m.Runtime {
				rts = []*ociRuntime{rt}
			}
		}
	}
	d.mu.Lock()
	if b := d.boxes[id]; b != nil && b.zygote != nil {
		d.mu.Unlock()
		<-b.zygote // a zygote being started is in the sandbox's cgroups (or dead) after this
	} else {
		d.mu.Unlock()
	}
	d.killZygotes(id) // outside the container's PID namespace: the runtime would not kill it
	for _, rt := range rts {
		if err := rt.delete(ctx, id); err != nil {
			errs = append(errs, err)
		}
	}
	if err := d.cg.removeCgroups(id); err != nil {
		errs = append(errs, err)
	}
	d.gw.Detach(id)
	if err := d.net.Teardown(id); err != nil {
		errs = append(errs, err)
	}
	mdir := d.sandboxMountDir(id)
	merged := filepath.Join(mdir, "root")
	if err := unix.Unmount(merged, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount %s: %w", merged, err))
	}
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b != nil && b.logDone != nil {
		select {
		case <-b.logDone:
		case <-time.After(2 * time.Second):
			errs = append(errs, errors.New("container output did not close after the container was killed"))
		}
	}
	if mounted, err := isMountPoint(merged); err != nil || mounted {
		errs = append(errs, fmt.Errorf("%s is still mounted (%v): state dir kept", merged, err))
	} else if err := errors.Join(os.RemoveAll(mdir), os.RemoveAll(dir)); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("destroy sandbox %s: %w", id, errors.Join(errs...))
	}
	d.mu.Lock()
	if b := d.boxes[id]; b != nil {
		b.known.close()
	}
	delete(d.boxes, id)
	d.mu.Unlock()
	return nil
}

// List returns the IDs of our containers known to any runtime plus the sandboxes with a state dir
// or network plumbing.
func (d *Driver) List(ctx context.Context) ([]string, error) {
	seen := map[string]bool{}
	for _, rt := range d.all {
		ids, err := rt.list(ctx)
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			if !isHelper(id) {
				seen[id] = true
			}
		}
	}
	ents, err := os.ReadDir(filepath.Join(d.stateDir, sandboxesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		if e.IsDir() && statedir.CheckID(e.Name()) == nil {
			seen[e.Name()] = true
		}
	}
	netIDs, err := d.net.List()
	if err != nil {
		return nil, err
	}
	for _, id := range netIDs {
		if statedir.CheckID(id) == nil {
			seen[id] = true
		}
	}
	ids := make([]string, 0, len(seen))
	for id := range seen {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// Kill SIGKILLs every process of sandbox id — the container's and its zygote, all in the
// sandbox's cgroup — without waiting or releasing anything (driver.Killer: a stop whose grace ran
// out). Idempotent; Destroy still deletes the container and removes the rest.
func (d *Driver) Kill(id string) error {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	pids, err := d.cg.procs(id)
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	if err != nil {
		return fmt.Errorf("kill sandbox %s: %w", id, err)
	}
	return nil
}

// contextPIDs are sandbox id's code contexts' interpreters as its agent last listed them (PIDs
// inside the sandbox).
func (d *Driver) contextPIDs(id string) map[int]bool {
	m := map[int]bool{}
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b == nil {
		return m
	}
	if p := b.ctxPIDs.Load(); p != nil {
		for _, pid := range *p {
			m[pid] = true
		}
	}
	return m
}

// dropContextPID forgets context name's interpreter: the kill after a run no longer spares it.
func (b *box) dropContextPID(name string) {
	for {
		old := b.ctxPIDs.Load()
		if old == nil {
			return
		}
		m := maps.Clone(*old)
		delete(m, name)
		if b.ctxPIDs.CompareAndSwap(old, &m) {
			return
		}
	}
}

// CreateContext starts code context name's interpreter in sandbox id (driver.Contexter). It
// waits for the sandbox's zygote first, so that the interpreter is forked from it.
func (d *Driver) CreateContext(ctx context.Context, id, name string) error {
	return d.contextOp(ctx, id, name, agent.OpContextCreate)
}

// DeleteContext ends code context name's interpreter in sandbox id (driver.Contexter).
func (d *Driver) DeleteContext(ctx context.Context, id, name string) error {
	return d.contextOp(ctx, id, name, agent.OpContextDelete)
}

func (d *Driver) contextOp(ctx context.Context, id, name, op string) error {
	b, err := d.lookup(id)
	if err != nil {
		return err
	}
	if op == agent.OpContextCreate {
		if err := d.Warm(ctx, id); err != nil {
			return fmt.Errorf("%s %s in sandbox %s: %w", op, name, id, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := agentRun(ctx, socketPath(b.dir), agent.RunRequest{Op: op, Context: name, Env: proxyEnv(b.Gateway),
		AllowSpawn: b.AllowSpawn, MaxOutput: agent.DefaultMaxOutput}, nil, nil)
	if err != nil {
		return fmt.Errorf("%s %s in sandbox %s: %w", op, name, id, err)
	}
	b.ctxPIDs.Store(&res.ContextPIDs)
	if res.AgentError != "" {
		return fmt.Errorf("%s %s in sandbox %s: agent: %s", op, name, id, res.AgentError)
	}
	return nil
}
