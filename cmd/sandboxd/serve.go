package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/driver"
	// The drivers serve opens by name (driver.Open): importing them registers them.
	_ "github.com/sandboxd/sandboxd/internal/driver/container"
	"github.com/sandboxd/sandboxd/internal/driver/kubernetes"
	_ "github.com/sandboxd/sandboxd/internal/driver/wasm"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/imagestore"
	"github.com/sandboxd/sandboxd/internal/metrics"
	"github.com/sandboxd/sandboxd/internal/mountns"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/postgres"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
)

// openStore opens the records of every command that reads or writes them: the PostgreSQL
// database at url (--store postgres://…, else $SANDBOXD_STORE: config.StoreURL), or when there
// is none the SQLite file in dataDir.
func openStore(ctx context.Context, dataDir, url string) (store.Store, error) {
	url, err := config.StoreURL(url)
	if err != nil {
		return nil, err
	}
	if url != "" {
		return postgres.Open(ctx, url)
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	return sqlite.Open(ctx, filepath.Join(dataDir, "sandboxd.db"))
}

// replicaID returns this data directory's replica ID (data/replica-id), making it on first use:
// stable across restarts, so that a restarted server reconciles its own sandboxes.
func replicaID(dataDir string) (string, error) {
	p := filepath.Join(dataDir, "replica-id")
	b, err := os.ReadFile(p)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if !strings.HasPrefix(id, "rep_") || len(id) > 64 || strings.ContainsAny(id, " \t") {
			return "", fmt.Errorf("replica id in %s: %q is not one", p, id)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("replica id: %w", err)
	}
	r := make([]byte, 10)
	if _, err := rand.Read(r); err != nil {
		return "", fmt.Errorf("replica id: %w", err)
	}
	id := "rep_" + hex.EncodeToString(r)
	if err := os.WriteFile(p, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("replica id: %w", err)
	}
	return id, nil
}

func createKey(ctx context.Context, st store.Store, account, plan string) (string, store.Account, bool, error) {
	return sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), account, plan)
}

// lockDataDir makes sure one server at a time owns a data directory.
func lockDataDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	// A server killed a moment ago may still be exiting: give it a few seconds.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("data dir %s is in use by another sandboxd (stop it first)", dir)
		}
	}
}

// daemon is a started service: the HTTP server and what it needs.
type daemon struct {
	cfg  config.Config
	st   store.Store
	svc  *sandbox.Service
	drvs []driver.Driver // to close at the end
	srv  *http.Server
	ln   net.Listener
	lock *os.File
	log  *slog.Logger
	// builds make the images approved before their files exist (--wasm-build; firststart.go).
	builds *builds
}

// start opens everything serve needs and starts listening; the caller runs d.srv.Serve(d.ln).
// Everything logs to log: the drivers with the attribute "driver" (their name).
func start(ctx context.Context, cfg config.Config, firstKey bool, log *slog.Logger) (*daemon, error) {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	lock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	d := &daemon{cfg: cfg, lock: lock, log: log}
	fail := func(err error) (*daemon, error) {
		d.close(context.Background())
		return nil, err
	}
	if d.st, err = openStore(ctx, cfg.DataDir, cfg.Store); err != nil {
		return fail(err)
	}
	replica, err := replicaID(cfg.DataDir)
	if err != nil {
		return fail(err)
	}
	if firstKey {
		if _, err := d.st.AccountByName(ctx, "default"); errors.Is(err, store.ErrNotFound) {
			key, _, _, err := createKey(ctx, d.st, "default", "free")
			if err != nil {
				return fail(err)
			}
			fmt.Fprintf(os.Stderr, "\nFirst start: created account \"default\" (plan free). Its API key:\n\n    %s\n\nUse it as the X-AgentCop-Key header. More keys: sandboxd keys create --data-dir %s --account NAME --plan pro\n\n", key, cfg.DataDir)
			fmt.Println(key)
		}
	}
	// The driver reports egress decisions from its first sandbox on; the service that records
	// them is built after it (it needs the driver), so decisions go through this pointer.
	var sink atomic.Pointer[sandbox.Service]
	opts := driver.Options{
		StateDir: filepath.Join(cfg.DataDir, "container"), AgentBin: cfg.AgentBin, Runtime: cfg.Runtime, RunscBin: cfg.RunscBin,
		NetworkPool: cfg.NetworkPool, Logger: log.With("driver", "container"),
		OnNetwork: func(d egress.Decision) {
			if s := sink.Load(); s != nil {
				s.NetworkDecision(d)
			}
		},
	}
	if cfg.StaticHosts != nil {
		opts.Resolver = cfg.StaticHosts
	}
	if cfg.Driver == kubernetes.Name {
		k := kubernetesOptions(cfg, replica, log)
		k.OnNetwork, k.Resolver = opts.OnNetwork, opts.Resolver // the pods' gateways report and resolve so too
		opts = k
	}
	drv, err := driver.Open(cfg.Driver, opts)
	if err != nil {
		return fail(fmt.Errorf("container mode (driver %s): %w", cfg.Driver, err))
	}
	d.drvs = append(d.drvs, drv)
	drivers := map[string]driver.Driver{sandbox.ModeContainer: drv}
	if wasmImages := imagesOf(cfg.Images, sandbox.ModeWASM); len(wasmImages) > 0 {
		wd, err := driver.Open("wasm", driver.Options{StateDir: filepath.Join(cfg.DataDir, "wasm"), Logger: log.With("driver", "wasm")})
		if err != nil {
			return fail(fmt.Errorf("wasm mode: %w", err))
		}
		d.drvs = append(d.drvs, wd)
		drivers[sandbox.ModeWASM] = wd
		// Compile python.wasm and fill the worker pools now, not at the first create.
		if p, ok := wd.(interface {
			Prepare(context.Context, string) error
		}); ok {
			for _, im := range wasmImages {
				if im.RootFS == "" { // built in the background: prepared when built (startBuilds)
					continue
				}
				go func() {
					// (Canceled: the driver closed, the server is stopping.)
					if err := p.Prepare(context.WithoutCancel(ctx), im.RootFS); err != nil && !errors.Is(err, context.Canceled) {
						log.Error("prepare wasm image", "image", im.Name, "err", err)
					}
				}()
			}
		}
	}
	images := cfg.Images
	if len(cfg.Builds) > 0 {
		images, d.builds = startBuilds(cfg, drivers[sandbox.ModeWASM], log)
	}
	images = describeImages(images, runtimeOf(drv))
	// The operator's imported and pulled images (sandboxd images import|pull), read again at
	// each lookup when the index changed: no restart after an import.
	imgStore, err := imagestore.Open(imagesDir(cfg.DataDir))
	if err != nil {
		return fail(err)
	}
	m := metrics.New(func() map[[2]string]int {
		if s := sink.Load(); s != nil {
			return s.LiveCounts()
		}
		return nil
	})
	// Every sandbox's disk: images in the data directory, mounted in sandboxd's mount namespace
	// (none when no sandbox runs on this host: the kubernetes driver's are in their pods).
	var disks *disk.Manager
	var mountDir string
	if cfg.HostRuns() {
		if disks, err = disk.NewManager(filepath.Join(cfg.DataDir, "disks")); err != nil {
			return fail(err)
		}
		if mountDir, err = mountns.Dir(cfg.DataDir); err != nil {
			return fail(err)
		}
	}
	agents, err := agentcall.New(cfg.Agents)
	if err != nil {
		return fail(err)
	}
	d.svc, err = sandbox.New(ctx, sandbox.Config{
		Agents:  agents,
		DataDir: cfg.DataDir, Images: images, Plans: cfg.Plans, PidsLimit: cfg.PidsLimit, Logger: log,
		DiskBytes: cfg.DiskBytes, DiskFreeFloor: cfg.DiskFreeFloor, IDs: cfg.IDs, Disks: disks, MountDir: mountDir,
		MaxUploadBytes: cfg.MaxUploadBytes, WarmPool: cfg.WarmPool, Observer: m, Catalog: catalog(imgStore, runtimeOf(drv)),
		Replica: replica, Address: cfg.Advertise,
	}, m.Store(d.st), drivers)
	if err != nil {
		return fail(err)
	}
	sink.Store(d.svc)
	d.builds.settle() // a cached image is ready before the first request
	if d.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return fail(err)
	}
	d.srv = &http.Server{
		Handler:           logFirstRequest(httpapi.New(d.svc, httpapi.Options{Version: version, RatePerSec: cfg.RatePerSec, RateBurst: cfg.RateBurst, Logger: log, Metrics: m.Handler()}), log),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	log.Info("sandboxd serving", "addr", d.ln.Addr().String(), "data_dir", cfg.DataDir, "replica", replica, "store", storeKind(cfg.Store), "runtime", runtimeOf(drv), "version", version)
	return d, nil
}

// kubernetesOptions are the kubernetes driver's options: the configured container images' cluster
// references, by their root filesystems (images imported into the store later have none: creates
// of them fail until the config names them); its pods carry this data directory's replica ID, so
// that a restarted server reconciles its own and no other replica's.
func kubernetesOptions(cfg config.Config, replica string, log *slog.Logger) driver.Options {
	ims := map[string]driver.ClusterImage{}
	for _, im := range imagesOf(cfg.Images, sandbox.ModeContainer) {
		if ci, ok := cfg.ClusterImages[im.Name]; ok {
			ims[im.RootFS] = ci
		}
	}
	return driver.Options{Kubeconfig: cfg.Kubeconfig, Namespace: cfg.Namespace, AgentImage: cfg.AgentImage,
		ClusterImages: ims, Replica: replica, CPURequest: cfg.CPURequest, Kubelet: cfg.Kubelet, Logger: log.With("driver", kubernetes.Name)}
}

// storeKind names the store in the log (never the URL: it may hold a password).
func storeKind(url string) string {
	if url == "" {
		return "sqlite"
	}
	return "postgres"
}

// runtimeOf names the OCI runtime a container driver runs (crun or runc).
func runtimeOf(drv driver.Driver) string {
	if r, ok := drv.(interface{ Runtime() string }); ok {
		return r.Runtime()
	}
	return drv.Name()
}

// describeImages fills in what GET /api/images shows of the configured images, once at start:
// the server's runtime, and for a root at hand its Python's version and its packages.
func describeImages(ims []sandbox.Image, rt string) []sandbox.Image {
	out := slices.Clone(ims)
	for i, im := range out {
		if im.RootFS == "" || im.Build != nil || config.IsClusterRef(im.RootFS) { // nothing at hand to read
			if im.Mode == sandbox.ModeContainer {
				out[i].Runtime = rt
			}
			continue
		}
		switch im.Mode {
		case sandbox.ModeContainer:
			out[i].Runtime = rt
			out[i].Python, _ = imagestore.PythonVersion(im.RootFS)
		case sandbox.ModeWASM:
			out[i].Python = imagestore.WASMPythonVersion(im.RootFS)
		}
		out[i].Packages, _ = imagestore.Packages(im.RootFS)
	}
	return out
}

// catalog is the service's view of the image store: a container image on its root, or a WASM
// image of packages on its base. The conversion is redone only when the store's list changed.
func catalog(st *imagestore.Store, serverRuntime string) func() ([]sandbox.Image, error) {
	var mu sync.Mutex
	var last []imagestore.Image
	var out []sandbox.Image
	return func() ([]sandbox.Image, error) {
		ims, err := st.Images()
		if err != nil {
			return nil, err
		}
		mu.Lock()
		defer mu.Unlock()
		if out != nil && len(ims) == len(last) && (len(ims) == 0 || &ims[0] == &last[0]) {
			return out, nil // the store's cached list: unchanged
		}
		conv := make([]sandbox.Image, 0, len(ims))
		for _, im := range ims {
			si := sandbox.Image{Name: im.Name, Digest: im.Digest, Size: im.Size, Python: im.Python, Packages: im.Packages,
				Generation: im.Digest + "@" + im.Unpacked.Format(time.RFC3339Nano)}
			switch im.Mode {
			case imagestore.ModeWASM:
				si.Mode, si.Base, si.SitePackages = sandbox.ModeWASM, im.Base, st.RootFS(im.Digest)
			default:
				si.Mode, si.RootFS, si.Runtime = sandbox.ModeContainer, st.RootFS(im.Digest), im.Runtime
				if si.Runtime == "" {
					si.Runtime = serverRuntime
				}
			}
			conv = append(conv, si)
		}
		last, out = ims, conv
		return out, nil
	}
}

// imagesOf returns the images of one mode.
func imagesOf(ims []sandbox.Image, mode string) []sandbox.Image {
	var out []sandbox.Image
	for _, im := range ims {
		if im.Mode == mode {
			out = append(out, im)
		}
	}
	return out
}

// close stops the background image builds, stops serving, destroys every live sandbox, closes
// the driver (its host network rules and egress gateway) and the store.
func (d *daemon) close(ctx context.Context) {
	d.builds.close() // first: a build killed now is not readied for a service going away
	if d.srv != nil {
		_ = d.srv.Shutdown(ctx)
	}
	if d.svc != nil {
		if err := d.svc.Close(ctx); err != nil {
			d.log.Error("close the service", "err", err)
		}
	}
	for _, drv := range d.drvs {
		if c, ok := drv.(io.Closer); ok {
			if err := c.Close(); err != nil {
				d.log.Error("close a driver", "driver", drv.Name(), "err", err)
			}
		}
	}
	if d.st != nil {
		d.st.Close()
	}
	if d.lock != nil {
		d.lock.Close()
	}
}

func serve(args []string, log *slog.Logger) error {
	cfg, err := config.ParseServe(args)
	if err != nil {
		return err
	}
	if cfg.HostRuns() { // a kubernetes replica runs no sandbox here, unprivileged (config.HostRuns)
		if err := cgroup.EnterScope(cfg.DataDir, filepath.Join(cfg.DataDir, "lock")); err != nil {
			return err
		}
		if err := mountns.Enter(); err != nil {
			return err
		}
		if base, err := cgroup.Delegate(); err != nil {
			return err
		} else if base != "" {
			log.Info("cgroup v2: sandboxes' groups below a delegated cgroup", "cgroup", base)
		}
	}
	// Watched from here to the exit (stop.go): a signal during start-up cancels it, and one
	// during the stop is the "second signal".
	w := watchStop()
	defer w.stop()
	d, err := start(w.ctx, cfg, true, log)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- d.srv.Serve(d.ln) }()
	select {
	case <-w.ctx.Done():
	case err = <-errc:
	}
	d.shutdown(w, cfg.StopGrace)
	return serveErr(err)
}
