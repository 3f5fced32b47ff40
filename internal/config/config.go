// Package config is where sandboxd's configuration enters: command-line flags, plus an optional
// JSON file for what flags express badly (the approved images, the plans). Unknown flags, unknown
// JSON fields and bad values are errors with a message that names the fix.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// DefaultImage is the name of the image approved out of the box.
const DefaultImage = "agentcop/agent-sandbox:latest"

// DefaultWasmImage is the name of the WASM image approved out of the box.
const DefaultWasmImage = "python:3.11-wasi"

// The warm pool's default and upper bound (sandboxes per shape; see sandbox.Config.WarmPool).
const (
	DefaultWarmPool = 2
	MaxWarmPool     = 64
)

// Config is the whole configuration of the serve command.
type Config struct {
	Listen  string
	DataDir string
	// Store is where the records live: "" for the SQLite file in DataDir, or a postgres:// URL
	// (--store) of a database that several serve processes (API replicas) may share.
	Store string
	// Advertise is the URL this replica's API is reached at, as other replicas and operators see
	// it (--advertise; default http://<Listen>).
	Advertise  string
	Runtime    string // crun, runc, runsc (gVisor) or "" (detect crun or runc)
	RunscBin   string // gVisor's runsc binary ("": runsc in PATH, if any)
	AgentBin   string
	RatePerSec float64
	RateBurst  int
	Images     []sandbox.Image
	// Builds are the WASM images the server builds in the background (--wasm-build): each is in
	// Images too, without a RootFS, until serve gives it its sandbox.Image.Build.
	Builds    []Build
	Plans     map[string]sandbox.Plan
	PidsLimit int64
	// Disks: the default resources.disk (0: the service's), the free space the data directory
	// keeps (creates are refused below it; 0: the service's), the host ids of sandboxes (zero: the
	// service's).
	DiskBytes     int64
	DiskFreeFloor int64
	IDs           sandbox.IDRange
	// MaxUploadBytes is the files API's per-file limit (0: the service's default, 100 MiB).
	MaxUploadBytes int64
	// WarmPool is how many provisioned sandboxes the service keeps ready per shape asked for
	// (--warm-pool, file key warm_pool; default DefaultWarmPool, 0 turns the pool off).
	WarmPool int
	// Egress: where sandbox addresses come from (zero: the driver's default), and static host
	// records the gateway resolves instead of asking the host's resolver (nil: none).
	NetworkPool netip.Prefix
	StaticHosts egress.StaticResolver
	// StopGrace bounds a clean stop (SIGINT, SIGTERM, SIGHUP): how long the server lets its live
	// sandboxes be destroyed one by one before it kills the rest at once (--stop-grace; default
	// DefaultStopGrace). A service manager's stop timeout must exceed it by a few seconds.
	StopGrace time.Duration
	// Agents are the operator's endpoints of runs' agent calls (agent.run, agent.call), by
	// agent_id: the file's "agents" (see package agentcall).
	Agents map[string]agentcall.Endpoint
	// Driver runs container-mode sandboxes: "container" (default) or "kubernetes" (--driver; WASM
	// stays local). The kubernetes driver's cluster: Kubeconfig (--kubeconfig; "": the cluster
	// sandboxd runs in, by its pod's service account), Namespace
	// (--namespace), AgentImage (--agent-image: the agent image's digest-pinned reference),
	// CPURequest (--cpu-request: the share of the CPU limit a pod requests) and,
	// per image name, what the cluster runs for it (the file's "cluster_images"). Under the
	// kubernetes driver an image may have no root on this host (--image NAME, a file image
	// without rootfs): its RootFS is then its cluster reference (IsClusterRef).
	Driver        string
	Kubeconfig    string
	Namespace     string
	AgentImage    string
	CPURequest    float64
	ClusterImages map[string]driver.ClusterImage
	Kubelet       driver.KubeletLimits // what every kubelet sets, as the operator declares (the file's "kubelet")
}

// StoreUsage is the --store flag's help, for every command that opens the store.
const StoreUsage = "where the records live: a postgres://user@host/db URL, shared by several serve replicas (default: $SANDBOXD_STORE, else the SQLite file in the data directory)"

// CheckStore checks a --store value: "" (the SQLite file in the data directory) or a
// postgres:// (postgresql://) URL.
func CheckStore(s string) error {
	if s == "" || strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		return nil
	}
	return fmt.Errorf("--store %q: want a postgres://user@host/db URL, or nothing (the SQLite file in the data directory)", s)
}

// Build is an image the server builds while it serves: the command prints the image's directory
// as the last line of its stdout (see internal/imagebuild).
type Build struct {
	Image   string // the image's name (in Config.Images)
	Command string // run with /bin/sh -c in the server's working directory
}

// DefaultStopGrace is --stop-grace's default.
const DefaultStopGrace = 20 * time.Second

// file is the JSON configuration file.
type file struct {
	Images []struct {
		Name    string `json:"name"`
		Mode    string `json:"mode"`
		RootFS  string `json:"rootfs"`
		Default bool   `json:"default"`
	} `json:"images"`
	Plans map[string]struct {
		MaxSandboxes int     `json:"max_sandboxes"`
		MaxCPU       float64 `json:"max_cpu"`
		MaxMemory    int64   `json:"max_memory_bytes"`
		MaxDisk      int64   `json:"max_disk_bytes"`
	} `json:"plans"`
	RatePerSec float64 `json:"rate_per_sec"`
	RateBurst  int     `json:"rate_burst"`
	PidsLimit  int64   `json:"pids_limit"`
	TmpBytes   *int64  `json:"tmp_bytes"` // gone: an error that says so
	DiskBytes  int64   `json:"disk_bytes"`
	DiskFloor  int64   `json:"disk_free_floor_bytes"`
	IDs        *struct {
		First     uint32 `json:"first"`
		Sandboxes int    `json:"sandboxes"`
	} `json:"ids"`
	MaxUpload int64 `json:"max_upload_bytes"`
	WarmPool  *int  `json:"warm_pool"`
	Egress    struct {
		Pool        string              `json:"pool"`
		StaticHosts map[string][]string `json:"static_hosts"`
	} `json:"egress"`
	ClusterImages map[string]driver.ClusterImage `json:"cluster_images"`
	Kubelet       driver.KubeletLimits           `json:"kubelet"`
	Agents        map[string]struct {
		URL     string            `json:"url"`
		Headers map[string]string `json:"headers"`
		Timeout *float64          `json:"timeout"` // seconds
	} `json:"agents"`
}

type imageFlags []string

func (f *imageFlags) String() string     { return strings.Join(*f, ",") }
func (f *imageFlags) Set(v string) error { *f = append(*f, v); return nil }

// ParseServe reads the serve command's flags (and the file --config names), and checks the files
// they name: at least one image, each image's root (CheckImage), the agent binary (CheckAgentBin).
func ParseServe(args []string) (Config, error) {
	c, err := parse("serve", args)
	if err != nil {
		return c, err
	}
	if len(c.Images) == 0 {
		return c, fmt.Errorf("no approved image: pass --image %s=ROOTFS_DIR (build one with scripts/build-image.sh, or use make run)", DefaultImage)
	}
	for i := range c.Images {
		if IsClusterRef(c.Images[i].RootFS) {
			continue
		}
		if err := CheckImage(&c.Images[i]); err != nil {
			return c, err
		}
	}
	return c, CheckAgentBin(c.AgentBin)
}

// ParseDoctor reads the same flags as ParseServe (so sandboxd doctor checks the settings serve
// would use) without checking the files they name: no image is required, and the doctor reports
// on images and the agent binary itself (with CheckImage and CheckAgentBin).
func ParseDoctor(args []string) (Config, error) { return parse("doctor", args) }

// parse reads the flags of command name (serve's flags) and the file --config names: paths are
// made absolute, AgentBin defaults to sandbox-agent next to the running binary.
func parse(name string, args []string) (Config, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	c := Config{}
	var cfgPath string
	var images, wasmImages, wasmBuilds imageFlags
	fs.StringVar(&c.Listen, "listen", "127.0.0.1:8080", "address to serve the API on")
	fs.StringVar(&c.DataDir, "data-dir", "data", "directory for the database and the sandboxes' files")
	fs.StringVar(&c.Store, "store", "", StoreUsage)
	fs.StringVar(&c.Advertise, "advertise", "", "URL this replica's API is reached at, recorded for the other replicas (default http://<listen>)")
	fs.StringVar(&c.Runtime, "runtime", "", "OCI runtime of every sandbox: crun, runc or runsc (gVisor; see --runsc) (default: detect crun, then runc)")
	fs.StringVar(&c.RunscBin, "runsc", "", "gVisor's runsc binary, built by scripts/build-runsc.sh (default: runsc in PATH, if any)")
	fs.StringVar(&c.AgentBin, "agent-bin", "", "path of the sandbox-agent binary (default: next to sandboxd)")
	fs.StringVar(&cfgPath, "config", "", "optional JSON file with images, plans and limits")
	fs.StringVar(&c.Driver, "driver", "container", "what runs container-mode sandboxes: container (this host) or kubernetes (pods of --kubeconfig's cluster; the config file's cluster_images)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "--driver kubernetes: the cluster's kubeconfig (default: the cluster sandboxd runs in, by its pod's service account)")
	fs.StringVar(&c.Namespace, "namespace", "default", "--driver kubernetes: the namespace of the sandboxes' pods")
	fs.StringVar(&c.AgentImage, "agent-image", "", "--driver kubernetes: the agent image's digest-pinned reference (REPO@sha256:…)")
	fs.Float64Var(&c.CPURequest, "cpu-request", 0.1, "--driver kubernetes: the share of a sandbox's CPU limit its pod requests from the scheduler, in (0, 1] (1: Guaranteed pods)")
	fs.Var(&images, "image", "approved image as NAME=ROOTFS_DIR, or NAME alone under --driver kubernetes (the config file's cluster_images[NAME]) (repeatable; the first is the container default)")
	idsSlot := fs.String("ids-slot", "", "K/N: use the K-th of N equal parts (K from 0) of the host ids range (the config file's ids, or the default): replicas sharing a cluster need disjoint ones, e.g. a StatefulSet's pod index")
	warm := fs.Int("warm-pool", DefaultWarmPool, fmt.Sprintf("provisioned sandboxes kept ready per shape asked for, 0 to %d (0: none; over the config file's warm_pool)", MaxWarmPool))
	fs.DurationVar(&c.StopGrace, "stop-grace", DefaultStopGrace, "on SIGINT/SIGTERM, how long live sandboxes may take to be destroyed before the rest are killed at once")
	fs.Var(&wasmImages, "wasm-image", "approved WASM image as NAME=DIR holding python.wasm and lib/ (repeatable; the first is the wasm default)")
	fs.Var(&wasmBuilds, "wasm-build", "WASM image the server builds in the background as NAME=COMMAND: COMMAND (run with sh -c, output to <data-dir>/logs/wasm-build.log) prints the image's directory as its last line; the image is approved when it succeeds (repeatable; a default after --wasm-image)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: sandboxd %s [flags]\nflags:\n", name)
		fs.PrintDefaults()
	}
	err := fs.Parse(args)
	if err != nil {
		return c, err
	}
	warmSet := false
	fs.Visit(func(f *flag.Flag) { warmSet = warmSet || f.Name == "warm-pool" })
	if warmSet && *warm < 0 {
		return c, fmt.Errorf("--warm-pool %d: want 0 (no warm pool) to %d sandboxes per shape", *warm, MaxWarmPool)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("%s takes no arguments, got %q", name, fs.Args())
	}
	if c.Store, err = StoreURL(c.Store); err != nil {
		return c, err
	}
	if c.StopGrace <= 0 {
		return c, fmt.Errorf("--stop-grace %v: want a positive duration, e.g. 20s", c.StopGrace)
	}
	if c.DataDir, err = filepath.Abs(c.DataDir); err != nil {
		return c, err
	}
	if c.Advertise == "" {
		// The listen address, when other replicas can dial it as it is written: a host that is
		// empty or unspecified (":8080", "0.0.0.0:8080") names no one, so replicas sharing a
		// database must be told (the default store has no other replicas: any address does).
		host, _, _ := net.SplitHostPort(c.Listen)
		if ip := net.ParseIP(host); c.Store != "" && (host == "" || (ip != nil && ip.IsUnspecified())) {
			return c, fmt.Errorf("--listen %s with --store: other replicas cannot reach that address; set --advertise http://<this host's address>:<port>", c.Listen)
		}
		c.Advertise = "http://" + c.Listen
	}
	c.WarmPool = DefaultWarmPool
	if cfgPath != "" {
		if err := c.loadFile(cfgPath); err != nil {
			return c, err
		}
	}
	if warmSet {
		c.WarmPool = *warm
	}
	if *idsSlot != "" {
		if c.IDs, err = slotOf(c.IDs, *idsSlot); err != nil {
			return c, err
		}
	}
	if err := c.checkDriver(); err != nil {
		return c, err
	}
	if c.WarmPool > MaxWarmPool {
		return c, fmt.Errorf("warm pool of %d sandboxes per shape: at most %d", c.WarmPool, MaxWarmPool)
	}
	for i, v := range images {
		name, root, ok := strings.Cut(v, "=")
		if !ok && name != "" && c.Driver == "kubernetes" {
			ok, root = true, "" // the cluster's image: clusterImages
		} else if !ok || name == "" || root == "" {
			return c, fmt.Errorf("--image %q: want NAME=ROOTFS_DIR, e.g. --image %s=$(scripts/build-image.sh | tail -1)", v, DefaultImage)
		}
		c.Images = append(c.Images, sandbox.Image{Name: name, Mode: sandbox.ModeContainer, RootFS: root, Default: i == 0 && !hasDefault(c.Images, sandbox.ModeContainer)})
	}
	for i, v := range wasmImages {
		name, root, ok := strings.Cut(v, "=")
		if !ok || name == "" || root == "" {
			return c, fmt.Errorf("--wasm-image %q: want NAME=DIR, e.g. --wasm-image %s=$(scripts/build-python-wasm.sh | tail -1)", v, DefaultWasmImage)
		}
		c.Images = append(c.Images, sandbox.Image{Name: name, Mode: sandbox.ModeWASM, RootFS: root, Default: i == 0 && !hasDefault(c.Images, sandbox.ModeWASM)})
	}
	for i, v := range wasmBuilds {
		name, command, ok := strings.Cut(v, "=")
		if !ok || name == "" || strings.TrimSpace(command) == "" {
			return c, fmt.Errorf("--wasm-build %q: want NAME=COMMAND, e.g. --wasm-build %s=scripts/build-python-wasm.sh", v, DefaultWasmImage)
		}
		for _, im := range c.Images {
			if im.Name == name {
				return c, fmt.Errorf("--wasm-build %q: image %s is approved already (by --wasm-image, --image or the config file)", v, name)
			}
		}
		c.Images = append(c.Images, sandbox.Image{Name: name, Mode: sandbox.ModeWASM, Default: i == 0 && !hasDefault(c.Images, sandbox.ModeWASM)})
		c.Builds = append(c.Builds, Build{Image: name, Command: command})
	}
	if err := c.clusterImages(); err != nil {
		return c, err
	}
	for i := range c.Images {
		if c.Images[i].RootFS == "" || IsClusterRef(c.Images[i].RootFS) { // built by the server (--wasm-build); the cluster's
			continue
		}
		if c.Images[i].RootFS, err = filepath.Abs(c.Images[i].RootFS); err != nil {
			return c, err
		}
	}
	if c.AgentBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, err
		}
		c.AgentBin = filepath.Join(filepath.Dir(exe), "sandbox-agent")
	}
	return c, nil
}

// clusterImages gives each container image without a root on this host (kubernetes driver) its
// cluster reference as RootFS (what the driver's Options.ClusterImages is keyed by) and the
// reference's digest.
func (c *Config) clusterImages() error {
	for i, im := range c.Images {
		if im.Mode != sandbox.ModeContainer || im.RootFS != "" {
			continue
		}
		ci, ok := c.ClusterImages[im.Name]
		if !ok {
			return fmt.Errorf("image %s has no root filesystem on this host: name it in the config file's cluster_images (\"%s\": {\"ref\": \"REPO@sha256:…\"}), or pass --image %s=ROOTFS_DIR", im.Name, im.Name, im.Name)
		}
		c.Images[i].RootFS = ci.Ref
		_, c.Images[i].Digest, _ = strings.Cut(ci.Ref, "@")
	}
	return nil
}

// IsClusterRef tells an image's RootFS that is a cluster's image reference (clusterImages) from
// a directory of this host (absolute after parsing).
func IsClusterRef(rootfs string) bool {
	return !filepath.IsAbs(rootfs) && strings.Contains(rootfs, "@sha256:")
}

// HostRuns reports whether this host runs sandboxes itself — the container driver, or a WASM
// image (WASM runs locally whatever the driver) — and so needs the host's set-up (a delegated
// cgroup, a mount namespace, loop-device disks). A kubernetes replica with container images
// only runs none: it needs no privilege and runs in a pod as a plain user.
func (c *Config) HostRuns() bool {
	if c.Driver != "kubernetes" {
		return true
	}
	for _, im := range c.Images {
		if im.Mode == sandbox.ModeWASM {
			return true
		}
	}
	return false
}

// slotOf is the slot-th part (--ids-slot K/N) of r (zero: sandbox.DefaultIDRange()).
func slotOf(r sandbox.IDRange, slot string) (sandbox.IDRange, error) {
	ks, ns, ok := strings.Cut(slot, "/")
	k, kerr := strconv.Atoi(ks)
	n, nerr := strconv.Atoi(ns)
	if !ok || kerr != nil || nerr != nil || n < 1 || k < 0 || k >= n {
		return r, fmt.Errorf("--ids-slot %q: want K/N with 0 <= K < N, e.g. 0/8", slot)
	}
	if r == (sandbox.IDRange{}) {
		r = sandbox.DefaultIDRange()
	}
	per := r.Sandboxes / n
	if per < 1 {
		return r, fmt.Errorf("--ids-slot %s: the id range's %d sandboxes do not split into %d parts", slot, r.Sandboxes, n)
	}
	return sandbox.IDRange{First: r.First + uint32(k*per)*driver.IDsPerSandbox, Sandboxes: per}, nil
}

// StoreURL is the store a command uses: flag (--store) or, when empty, $SANDBOXD_STORE (so that
// a URL with a password need not be on a command line: a pod takes it from a Secret), checked
// (CheckStore).
func StoreURL(flag string) (string, error) {
	if flag == "" {
		flag = os.Getenv("SANDBOXD_STORE")
	}
	return flag, CheckStore(flag)
}

// CheckImage checks that an image's directory (absolute) is what its mode needs — a root file
// system with usr/bin/python3, or a WASM image with python.wasm (WasmImage) — and fills in its
// digest when the image's build recorded one. An image the server builds (no directory yet) is
// checked when its build ends.
func CheckImage(im *sandbox.Image) error {
	abs := im.RootFS
	if abs == "" {
		return nil
	}
	if im.Mode == sandbox.ModeWASM {
		d, err := WasmImage(abs)
		if err != nil {
			return fmt.Errorf("wasm image %s: %w", im.Name, err)
		}
		im.Digest = d
		return nil
	}
	if st, err := os.Stat(filepath.Join(abs, "usr/bin/python3")); err != nil || st.IsDir() {
		return fmt.Errorf("image %s: %s has no usr/bin/python3: is it a root filesystem? (build one with scripts/build-image.sh)", im.Name, abs)
	}
	if d, err := os.ReadFile(filepath.Join(filepath.Dir(abs), "digest")); err == nil {
		im.Digest = strings.TrimSpace(string(d))
	}
	return nil
}

// CheckAgentBin checks that the sandbox-agent binary is at path.
func CheckAgentBin(path string) error {
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("sandbox-agent binary not found at %s: build it with make build, or pass --agent-bin", path)
	}
	return nil
}

// WasmImage checks that dir is a WASM image (it has python.wasm) and returns its digest, from the
// BUILDINFO scripts/build-python-wasm.sh writes ("" without one).
func WasmImage(dir string) (digest string, err error) {
	if st, err := os.Stat(filepath.Join(dir, "python.wasm")); err != nil || st.IsDir() {
		return "", fmt.Errorf("%s has no python.wasm (build one with scripts/build-python-wasm.sh)", dir)
	}
	if info, err := os.ReadFile(filepath.Join(dir, "BUILDINFO")); err == nil {
		for _, l := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(l, "python_wasm_sha256="); ok {
				digest = "sha256:" + strings.TrimSpace(v)
			}
		}
	}
	return digest, nil
}

func hasDefault(ims []sandbox.Image, mode string) bool {
	for _, im := range ims {
		if im.Default && im.Mode == mode {
			return true
		}
	}
	return false
}

func (c *Config) loadFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f file
	if err := dec.Decode(&f); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	for _, im := range f.Images {
		mode := im.Mode
		if mode == "" {
			mode = sandbox.ModeContainer
		}
		if im.Name == "" || (im.RootFS == "" && (mode != sandbox.ModeContainer || c.Driver != "kubernetes")) {
			return fmt.Errorf("config %s: every image needs a name and a rootfs (under --driver kubernetes a container image may have none: cluster_images[NAME] is what runs)", path)
		}
		c.Images = append(c.Images, sandbox.Image{Name: im.Name, Mode: mode, RootFS: im.RootFS, Default: im.Default})
	}
	if len(f.Plans) > 0 {
		c.Plans = sandbox.DefaultPlans()
		for name, p := range f.Plans {
			if p.MaxCPU <= 0 || p.MaxMemory <= 0 {
				return fmt.Errorf("config %s: plan %s needs max_cpu and max_memory_bytes above 0", path, name)
			}
			if p.MaxDisk == 0 {
				p.MaxDisk = sandbox.DefaultDiskBytes
			}
			if p.MaxDisk < sandbox.MinDisk {
				return fmt.Errorf("config %s: plan %s: max_disk_bytes must be at least %d", path, name, sandbox.MinDisk)
			}
			c.Plans[name] = sandbox.Plan{MaxSandboxes: p.MaxSandboxes, MaxCPU: p.MaxCPU, MaxMemory: p.MaxMemory, MaxDisk: p.MaxDisk}
		}
	}
	if f.TmpBytes != nil {
		return fmt.Errorf("config %s: tmp_bytes is gone: /tmp is on each sandbox's disk, with its read_write paths (set disk_bytes, or resources.disk per sandbox)", path)
	}
	if f.RatePerSec < 0 || f.RateBurst < 0 || f.PidsLimit < 0 || f.DiskBytes < 0 || f.DiskFloor < 0 || f.MaxUpload < 0 {
		return errors.New("config: limits must not be negative")
	}
	if f.DiskBytes != 0 && f.DiskBytes < sandbox.MinDisk {
		return fmt.Errorf("config %s: disk_bytes must be at least %d", path, sandbox.MinDisk)
	}
	c.RatePerSec, c.RateBurst, c.PidsLimit = f.RatePerSec, f.RateBurst, f.PidsLimit
	c.DiskBytes, c.DiskFreeFloor = f.DiskBytes, f.DiskFloor
	if f.IDs != nil {
		c.IDs = sandbox.IDRange{First: f.IDs.First, Sandboxes: f.IDs.Sandboxes}
		if err := c.IDs.Check(); err != nil {
			return fmt.Errorf("config %s: ids: %w", path, err)
		}
	}
	c.MaxUploadBytes = f.MaxUpload
	if f.WarmPool != nil {
		if *f.WarmPool < 0 {
			return fmt.Errorf("config %s: warm_pool must not be negative", path)
		}
		c.WarmPool = *f.WarmPool
	}
	if f.Egress.Pool != "" {
		if c.NetworkPool, err = netip.ParsePrefix(f.Egress.Pool); err != nil {
			return fmt.Errorf("config %s: egress.pool: %w", path, err)
		}
	}
	c.ClusterImages = f.ClusterImages
	c.Kubelet = f.Kubelet
	for id, a := range f.Agents {
		if !sandbox.ValidAgentID(id) {
			return fmt.Errorf("config %s: agents[%q]: not an agent_id (1-128 characters of A-Z a-z 0-9 . _ : -)", path, id)
		}
		ep := agentcall.Endpoint{URL: a.URL, Headers: a.Headers}
		if a.Timeout != nil {
			if *a.Timeout < 1 || *a.Timeout > agentcall.MaxTimeout.Seconds() {
				return fmt.Errorf("config %s: agents[%q].timeout %v: want 1 to %v seconds", path, id, *a.Timeout, agentcall.MaxTimeout.Seconds())
			}
			ep.Timeout = time.Duration(*a.Timeout * float64(time.Second))
		}
		if err := ep.Check(); err != nil {
			return fmt.Errorf("config %s: agents[%q]: %w", path, id, err)
		}
		if c.Agents == nil {
			c.Agents = map[string]agentcall.Endpoint{}
		}
		c.Agents[id] = ep
	}
	for name, addrs := range f.Egress.StaticHosts {
		if c.StaticHosts == nil {
			c.StaticHosts = egress.StaticResolver{}
		}
		for _, a := range addrs {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				return fmt.Errorf("config %s: egress.static_hosts[%q]: %w", path, name, err)
			}
			key := strings.ToLower(strings.TrimSuffix(name, "."))
			c.StaticHosts[key] = append(c.StaticHosts[key], ip)
		}
	}
	return nil
}

// checkDriver checks --driver and what the kubernetes driver needs.
func (c *Config) checkDriver() error {
	switch c.Driver {
	case "container":
		return nil
	case "kubernetes":
	default:
		return fmt.Errorf("--driver %q: want container or kubernetes", c.Driver)
	}
	if c.CPURequest <= 0 || c.CPURequest > 1 {
		return fmt.Errorf("--cpu-request %v: want the share of the CPU limit a pod requests, in (0, 1]", c.CPURequest)
	}
	if !strings.Contains(c.AgentImage, "@sha256:") {
		return fmt.Errorf("--agent-image %q: want the agent image's reference pinned by digest (REPO@sha256:…)", c.AgentImage)
	}
	for name, ci := range c.ClusterImages {
		if !strings.Contains(ci.Ref, "@sha256:") {
			return fmt.Errorf("cluster_images[%q].ref %q: want a reference pinned by digest (REPO@sha256:…)", name, ci.Ref)
		}
	}
	return nil
}
