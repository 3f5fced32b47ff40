package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/container"
	"github.com/sandboxd/sandboxd/internal/driver/wasm"
	"github.com/sandboxd/sandboxd/internal/mountns"
	"github.com/sandboxd/sandboxd/internal/procstatus"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// bench measures sandboxd against baselines measured in the same run, interleaved with the API's
// calls so that load hits both alike: a detached `crun run -d` + delete of the same kind of bundle
// for create, the host's own `python3 -c 'print(1)'` for a run, a foreground `crun run` of it for
// create + run + delete. Then the first image's size, build time and `import pandas` run, throughput,
// and the cost of many idle sandboxes.
func bench(args []string, log *slog.Logger) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	n := fs.Int("n", 200, "latency samples per figure")
	idle := fs.Int("idle", 1000, "idle sandboxes for the scale figures (0: skip)")
	tputFor := fs.Duration("throughput-for", 10*time.Second, "how long the throughput figure runs (0: skip)")
	asJSON := fs.Bool("json", false, "print the figures as JSON")
	var serveArgs []string
	fs.Func("image", "approved image NAME=ROOTFS (also the baselines' rootfs)", func(v string) error {
		serveArgs = append(serveArgs, "--image", v)
		return nil
	})
	fs.Func("wasm-image", "approved WASM image NAME=DIR (adds the WASM figures)", func(v string) error {
		serveArgs = append(serveArgs, "--wasm-image", v)
		return nil
	})
	runtimeName := fs.String("runtime", "", "OCI runtime: crun or runc (default: detect)")
	runscBin := fs.String("runsc", "", "gVisor's runsc binary (scripts/build-runsc.sh): adds runsc's create and print(1) run figures beside the default runtime's")
	runscN := fs.Int("runsc-n", 20, "samples per runsc figure (and its baseline's)")
	cpuOnly := fs.Bool("cpu-only", false, "measure only the CPU per run, its floor and the runs/s of fresh and context runs")
	cpuProfile := fs.String("cpuprofile", "", "with --cpu-only: write a CPU profile of this process (the server) during it to FILE (go tool pprof)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *runtimeName != "" {
		serveArgs = append(serveArgs, "--runtime", *runtimeName)
	}
	if err := mountns.Enter(); err != nil { // re-executes: before any side effect
		return err
	}
	if _, err := cgroup.Delegate(); err != nil { // a cgroup v2 host: below our own cgroup if delegated
		return err
	}
	tmp, err := os.MkdirTemp("", "sandboxd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	cfg, err := config.ParseServe(append(serveArgs, "--data-dir", tmp, "--listen", "127.0.0.1:0"))
	if err != nil {
		return err
	}
	cfg.RatePerSec, cfg.RateBurst = 1e6, 1e6
	ctx := context.Background()
	drvAny, err := driver.Open("container", driver.Options{StateDir: tmp + "/floor", AgentBin: cfg.AgentBin, Runtime: cfg.Runtime,
		Logger: log.With("driver", "container")})
	if err != nil {
		return err
	}
	floorDrv, ok := drvAny.(*container.Driver)
	if !ok {
		return errors.New("bench: the container driver has no floor measurement")
	}
	defer floorDrv.Close()
	d, err := start(ctx, cfg, false, log)
	if err != nil {
		return err
	}
	go d.srv.Serve(d.ln)
	defer d.close(ctx)
	key, _, _, err := createKey(ctx, d.st, "bench", "enterprise")
	if err != nil {
		return err
	}
	c := newBenchClient("http://"+d.ln.Addr().String(), key)
	rootfs := cfg.Images[0].RootFS
	rep := &report{Date: time.Now().UTC().Format(time.RFC3339), CPUs: runtime.NumCPU(), Runtime: floorDrv.Runtime(), Samples: *n}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		rep.Kernel = strings.TrimSpace(string(b))
	}
	progress := func(format string, a ...any) {
		if !*asJSON {
			fmt.Fprintf(os.Stderr, format+"\n", a...)
		}
	}

	// Every sample starts with the warm pool settled: no sandbox being provisioned in the
	// background meanwhile (it would slow down what is measured, baselines included), and creates
	// find a warm sandbox, as they do when they come no faster than the pool refills.
	settle := func() { <-d.svc.WarmSettled() }
	// released waits until the driver holds nothing of a deleted sandbox (DELETE answers first).
	var rel interface{ Released(string) bool }
	for _, drv := range d.drvs {
		if r, ok := drv.(interface{ Released(string) bool }); ok && drv.Name() == container.Name {
			rel = r
		}
	}
	if rel == nil {
		return errors.New("bench: the container driver cannot tell when a sandbox is released")
	}
	released := func(id string) {
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end) && !rel.Released(id); {
			time.Sleep(time.Millisecond)
		}
	}
	cpuOf, ok := rel.(interface {
		CPUUsage(id string) (time.Duration, error)
	})
	if !ok {
		return errors.New("bench: the container driver cannot tell a sandbox's CPU time")
	}
	if *cpuOnly {
		progress("bench: CPU per run…")
		if *cpuProfile != "" {
			f, err := os.Create(*cpuProfile)
			if err != nil {
				return err
			}
			defer f.Close()
			if err := pprof.StartCPUProfile(f); err != nil {
				return err
			}
			defer pprof.StopCPUProfile()
		}
		if err := benchRunCPU(c, rep, cpuOf.CPUUsage, *n, settle); err != nil {
			return err
		}
		return rep.output(*asJSON)
	}

	// Latencies, interleaved.
	progress("bench: %d latency samples…", *n)
	live, err := c.create(benchConfig)
	if err != nil {
		return err
	}
	if _, err := c.run(live); err != nil { // warm-up
		return err
	}
	liveCtx, err := c.createContext(live)
	if err != nil {
		return err
	}
	if _, err := c.runIn(live, liveCtx); err != nil { // warm-up
		return err
	}
	diskCost, err := newDiskCost(tmp)
	if err != nil {
		return err
	}
	var s struct{ floorD, create, cold, del, netCost, diskCost, hostPy, run, ctxRun, floor, full []time.Duration }
	for i := 0; i < *n; i++ {
		settle()
		dd, err := floorDrv.FloorDetached(ctx, rootfs)
		if err != nil {
			return err
		}
		s.floorD = append(s.floorD, dd)
		if dd, err = floorDrv.NetworkCost(ctx); err != nil {
			return err
		}
		s.netCost = append(s.netCost, dd)
		if dd, err = diskCost(); err != nil {
			return err
		}
		s.diskCost = append(s.diskCost, dd)
		settle()
		t0 := time.Now()
		id, err := c.create(benchConfig)
		if err != nil {
			return err
		}
		s.create = append(s.create, time.Since(t0))
		settle()
		t0 = time.Now()
		if err := c.delete(id); err != nil {
			return err
		}
		s.del = append(s.del, time.Since(t0))
		// The run and its baseline do not share the machine with the deleted sandbox's teardown,
		// which goes on after DELETE has answered (the kernel's, mostly: namespaces, cgroups).
		released(id)

		settle()
		t0 = time.Now()
		if out, err := exec.Command("/usr/bin/python3", "-c", "print(1)").Output(); err != nil || string(out) != "1\n" {
			return fmt.Errorf("host /usr/bin/python3: %q %v", out, err)
		}
		s.hostPy = append(s.hostPy, time.Since(t0))
		if dd, err = c.run(live); err != nil {
			return err
		}
		s.run = append(s.run, dd)
		if dd, err = c.runIn(live, liveCtx); err != nil {
			return err
		}
		s.ctxRun = append(s.ctxRun, dd)

		if dd, err = floorDrv.Floor(ctx, rootfs); err != nil {
			return err
		}
		s.floor = append(s.floor, dd)
		settle()
		t0 = time.Now()
		if id, err = c.create(benchConfig); err != nil {
			return err
		}
		if _, err := c.run(id); err != nil {
			return err
		}
		if err := c.delete(id); err != nil {
			return err
		}
		s.full = append(s.full, time.Since(t0))
	}
	// The same create without the warm pool: what a create pays when it finds none.
	d.svc.SetWarmPool(0)
	for i := 0; i < *n; i++ {
		t0 := time.Now()
		id, err := c.create(benchConfig)
		if err != nil {
			return err
		}
		s.cold = append(s.cold, time.Since(t0))
		if err := c.delete(id); err != nil {
			return err
		}
	}
	d.svc.SetWarmPool(cfg.WarmPool)
	baseD := figure{Name: "baseline: crun run -d + delete", Samples: s.floorD}
	baseHost := figure{Name: "baseline: host python3 print(1)", Samples: s.hostPy}
	baseRun := figure{Name: "baseline: crun run python3 print(1)", Samples: s.floor}
	rep.add(baseD, nil, "")
	rep.add(figure{Name: "container create -> ready (allow list)", Samples: s.create}, &baseD, "p50 ≤ 25 ms, p99 ≤ 80 ms")
	rep.add(figure{Name: "container create -> ready, cold (no warm sandbox)", Samples: s.cold}, &baseD, "")
	rep.add(figure{Name: "  of which network setup", Samples: s.netCost}, &baseD, "≤ 10 ms")
	rep.add(figure{Name: "  of which its disk (1 GiB: copy, loop, mount)", Samples: s.diskCost}, &baseD, "")
	rep.add(figure{Name: "delete (request path)", Samples: s.del}, &baseD, "p50 ≤ 10 ms")
	rep.add(baseHost, nil, "")
	rep.add(figure{Name: "sync run print(1), live sandbox", Samples: s.run}, &baseHost, "p50 ≤ 5 ms")
	rep.add(figure{Name: "sync run print(1) in a code context, live sandbox", Samples: s.ctxRun}, &baseHost, "")
	rep.add(baseRun, nil, "")
	rep.add(figure{Name: "create + first run + delete", Samples: s.full}, &baseRun, "p50 ≤ 35 ms")
	if err := c.delete(live); err != nil {
		return err
	}
	progress("bench: pinning DNS answers…")
	settle()
	if err := benchPins(ctx, rep, floorDrv, *n); err != nil {
		return err
	}
	progress("bench: CPU per run…")
	if err := benchRunCPU(c, rep, cpuOf.CPUUsage, *n, settle); err != nil {
		return err
	}
	progress("bench: the image…")
	if err := benchImage(c, rep, cfg.Images[0], min(*n, 20), settle); err != nil {
		return err
	}

	if ims := imagesOf(cfg.Images, "wasm"); len(ims) > 0 {
		progress("bench: %d WASM samples…", *n)
		if err := benchWasm(ctx, c, rep, tmp, ims[0].RootFS, *n, settle, log); err != nil {
			return err
		}
	}
	if *runscBin != "" {
		progress("bench: %d runsc samples…", *runscN)
		if err := benchRuntimes(ctx, rep, tmp, rootfs, cfg.AgentBin, *runscBin, *runscN, log); err != nil {
			return err
		}
	}
	if *tputFor > 0 {
		progress("bench: throughput for %v…", *tputFor)
		rps, err := throughput(c, 20, 32, *tputFor, settle, false)
		if err != nil {
			return err
		}
		rep.Values = append(rep.Values, value{Name: "sync runs/s, print(1), 20 sandboxes, 32 clients", Value: rps, Unit: "runs/s", Target: "≥ 300"})
		if rps, err = throughput(c, 20, 32, *tputFor, settle, true); err != nil {
			return err
		}
		rep.Values = append(rep.Values, value{Name: "sync runs/s, print(1) in a code context, 20 sandboxes, 32 clients", Value: rps, Unit: "runs/s"})
	}
	if *idle > 0 {
		progress("bench: %d idle sandboxes…", *idle)
		if err := scale(c, rep, tmp, *idle, s.create, settle, released); err != nil {
			return err
		}
	}
	return rep.output(*asJSON)
}

// output prints the report, as JSON if asJSON.
func (r *report) output(asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	r.print()
	return nil
}

// benchWasm measures WASM create -> ready and a print(1) run against one fresh wazero instance of
// python.wasm in a worker. Creates take a warm sandbox (the service's pool) and baselines a
// compiled worker (the driver's pool); both refill in the background (a compile from the warm
// cache, ~0.1 s each), so samples are spaced so that each finds its pool full, as creates
// arriving at up to a few per second do, and no standby starts up during a baseline.
func benchWasm(ctx context.Context, c *benchClient, rep *report, tmp, image string, n int, settle func(), log *slog.Logger) error {
	drvAny, err := driver.Open("wasm", driver.Options{StateDir: tmp + "/wasm-baseline", Logger: log.With("driver", "wasm")})
	if err != nil {
		return err
	}
	if cl, ok := drvAny.(interface{ Close() error }); ok {
		defer cl.Close()
	}
	wd, ok := drvAny.(*wasm.Driver)
	if !ok {
		return fmt.Errorf("bench: the driver registered as \"wasm\" is a %T, not the wasm driver (its Baseline is what this bench times)", drvAny)
	}
	wasmCfg := map[string]any{"network": map[string]any{"block_outbound": true}}
	create := func() (string, error) {
		var r api.CreateSandboxResponse
		err := c.do("POST", "/api/sandbox/create", map[string]any{"agent_id": "bench", "mode": "wasm", "config": wasmCfg}, &r)
		if err == nil && r.Status != "ready" {
			err = fmt.Errorf("wasm create: status %s", r.Status)
		}
		return r.SandboxID, err
	}
	live, err := create()
	if err != nil {
		return err
	}
	defer c.delete(live)
	if _, err := c.run(live); err != nil { // warm-up
		return err
	}
	if _, err := wd.Baseline(ctx, image); err != nil { // compiles into the baseline driver's cache
		return err
	}
	const spacing = 250 * time.Millisecond
	var base, creates, runs []time.Duration
	for i := 0; i < n; i++ {
		d, err := wd.Baseline(ctx, image)
		if err != nil {
			return err
		}
		base = append(base, d)
		time.Sleep(spacing)
		settle()
		t0 := time.Now()
		id, err := create()
		if err != nil {
			return err
		}
		creates = append(creates, time.Since(t0))
		if err := c.delete(id); err != nil {
			return err
		}
		time.Sleep(spacing)
		if d, err = c.run(live); err != nil {
			return err
		}
		runs = append(runs, d)
		time.Sleep(spacing) // the live sandbox starts its next standby now: not during the baseline
	}
	b := figure{Name: "baseline: fresh wazero instance print(1)", Samples: base}
	rep.add(b, nil, "")
	rep.add(figure{Name: "wasm create -> ready", Samples: creates}, &b, "p50 ≤ 2 ms")
	rep.add(figure{Name: "wasm sync run print(1), live sandbox", Samples: runs}, &b, "p50 ≤ 10 ms")

	// A worker before its sandbox: python.wasm's compile, and its memory once ready. A cold
	// compile takes seconds: a few samples.
	settle()
	wc, err := wd.MeasureWorkers(ctx, image, min(n, workerSamples))
	if err != nil {
		return err
	}
	cached := figure{Name: "baseline: python.wasm from the compile cache", Samples: wc.CompileCached}
	rep.add(cached, nil, "")
	rep.add(figure{Name: "python.wasm compile, cold (empty cache)", Samples: wc.CompileCold}, &cached, "")
	plain, err := idleProcessRSS()
	if err != nil {
		return err
	}
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	slices.Sort(wc.IdleRSS)
	rep.Values = append(rep.Values,
		value{Name: "baseline: idle sandboxd process RSS", Value: mib(plain), Unit: "MiB"},
		value{Name: "idle wasm worker RSS (ready, median)", Value: mib(wc.IdleRSS[len(wc.IdleRSS)/2]), Unit: "MiB",
			Baseline: "baseline: idle sandboxd process RSS", Ratio: float64(wc.IdleRSS[len(wc.IdleRSS)/2]) / float64(plain)})
	return nil
}

// workerSamples bounds the samples of MeasureWorkers (each a cold compile of python.wasm).
const workerSamples = 3

// idleProcessRSS is the resident memory of a plain sandboxd process at rest: the CLI's `run`
// waiting for its code on stdin (a pipe nothing is written to), read once it is blocked reading
// it. The process is killed after.
func idleProcessRSS() (int64, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer pw.Close()
	cmd := exec.Command(exe, "run", "sbx_bench", "-")
	cmd.Stdin = pr
	err = cmd.Start()
	pr.Close()
	if err != nil {
		return 0, fmt.Errorf("idle sandboxd process: %w", err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	// Blocked: one of its threads in read(0, …) (os.Stdin on a pipe is read without the poller).
	reading := fmt.Sprintf("%d 0x0 ", unix.SYS_READ)
	tasks := fmt.Sprintf("/proc/%d/task/*/syscall", cmd.Process.Pid)
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		m, _ := filepath.Glob(tasks)
		if slices.ContainsFunc(m, func(p string) bool {
			b, _ := os.ReadFile(p)
			return strings.HasPrefix(string(b), reading)
		}) {
			break
		}
		if time.Now().After(end) {
			return 0, errors.New("idle sandboxd process: not reading its stdin after 10 s")
		}
	}
	return procstatus.RSS(cmd.Process.Pid)
}

// benchPins reports what the egress gateway's pinning of a DNS answer in the host's rules costs
// (each answer, before it leaves: a new address, one already pinned, a renewal) against one
// element of the same key added to a plain nft set in a transaction of its own.
func benchPins(ctx context.Context, rep *report, d *container.Driver, n int) error {
	pc, err := d.PinCost(ctx, n)
	if err != nil {
		return err
	}
	b := figure{Name: "baseline: nft add element (own transaction)", Samples: pc.Baseline}
	rep.add(b, nil, "")
	rep.add(figure{Name: "pin a DNS answer: a new address", Samples: pc.Fresh}, &b, "")
	rep.add(figure{Name: "pin a DNS answer: already pinned", Samples: pc.Again}, &b, "")
	rep.add(figure{Name: "pin a DNS answer: renewed (delete + add)", Samples: pc.Renew}, &b, "")
	return nil
}

// benchImage reports the container image's size (du -sb of its root), its build time (the
// build-seconds file scripts/build-image.sh writes beside the root, when there is one) and, when
// it has pandas, the run of `import pandas` in n fresh sandboxes (bench takes at most 20: an import
// takes about half a second) against a print(1) run just before it in the same sandbox.
func benchImage(c *benchClient, rep *report, im sandbox.Image, n int, settle func()) error {
	out, err := exec.Command("du", "-sb", im.RootFS).Output()
	if err != nil {
		return fmt.Errorf("du -sb %s: %w", im.RootFS, err)
	}
	size, err := strconv.ParseFloat(strings.Fields(string(out))[0], 64)
	if err != nil {
		return fmt.Errorf("du -sb %s: %q", im.RootFS, out)
	}
	rep.Values = append(rep.Values, value{Name: "image " + im.Name + ": size (du -sb)", Value: size / (1 << 20), Unit: "MiB"})
	if b, err := os.ReadFile(filepath.Join(filepath.Dir(im.RootFS), "build-seconds")); err == nil {
		if secs, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64); err == nil {
			rep.Values = append(rep.Values, value{Name: "image " + im.Name + ": build time", Value: secs, Unit: "s"})
		}
	}
	var base, imports []time.Duration
	for i := 0; i < n; i++ {
		settle()
		id, err := c.create(benchConfig)
		if err != nil {
			return err
		}
		d, err := c.runCode(id, "print(1)", "1\n")
		if err == nil {
			base = append(base, d)
			d, err = c.runCode(id, "import pandas", "")
			imports = append(imports, d)
		}
		if derr := c.delete(id); err == nil {
			err = derr
		}
		if err != nil && i == 0 && strings.Contains(err.Error(), "ModuleNotFoundError") {
			return nil // an image without pandas
		}
		if err != nil {
			return err
		}
	}
	b := figure{Name: "baseline: print(1), fresh sandbox", Samples: base}
	rep.add(b, nil, "")
	rep.add(figure{Name: "sync run import pandas, same sandbox", Samples: imports}, &b, "")
	return nil
}

// benchConfig is the default config with the egress allow list on.
var benchConfig = map[string]any{"network": map[string]any{"allow": []string{"api.company.com"}, "block_outbound": true}}

// throughput runs print(1) synchronously in sandboxes sandboxes from clients concurrent clients
// for d, and returns the completed runs per second; inContexts: each run in its sandbox's one code
// context.
func throughput(c *benchClient, sandboxes, clients int, d time.Duration, settle func(), inContexts bool) (float64, error) {
	ids := make([]string, sandboxes)
	ctxs := make([]string, sandboxes)
	for i := range ids {
		id, err := c.create(benchConfig)
		if err != nil {
			return 0, err
		}
		ids[i] = id
		defer c.delete(id)
		if inContexts {
			if ctxs[i], err = c.createContext(id); err != nil {
				return 0, err
			}
		}
	}
	var done atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	settle()
	deadline := time.Now().Add(d)
	start := time.Now()
	for k := 0; k < clients; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := k; time.Now().Before(deadline); i += clients {
				if _, err := c.runIn(ids[i%len(ids)], ctxs[i%len(ids)]); err != nil {
					mu.Lock()
					firstErr = errors.Join(firstErr, err)
					mu.Unlock()
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// scale creates n idle sandboxes, measures what each costs in memory (the host's MemAvailable
// drop per sandbox: everything it owns, kernel included; and the PSS of its processes) and the
// create latency with them live against create1 (with one live), then deletes them.
func scale(c *benchClient, rep *report, dataDir string, n int, create1 []time.Duration, settle func(), released func(id string)) error {
	runtime.GC()
	before := memAvailable()
	ids := make([]string, 0, n)
	defer func() {
		for _, id := range ids {
			c.delete(id)
		}
	}()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		id, err := c.create(benchConfig)
		if err != nil {
			return fmt.Errorf("idle sandbox %d: %w", i+1, err)
		}
		ids = append(ids, id)
	}
	fill := time.Since(t0)
	time.Sleep(2 * time.Second) // let the sandboxes settle (agents idle, page cache)
	perSandbox := float64(before-memAvailable()) / float64(n)
	pss := sandboxPSS()
	diskBytes, ranges := isolationFigures(dataDir)
	var createN []time.Duration
	for i := 0; i < min(len(create1), 100); i++ {
		settle()
		t := time.Now()
		id, err := c.create(benchConfig)
		if err != nil {
			return err
		}
		createN = append(createN, time.Since(t))
		if err := c.delete(id); err != nil {
			return err
		}
		// Creates 300 ms apart, each after the last delete's release: with 1,000 namespaces and
		// cgroups around, the kernel goes on destroying a deleted sandbox's (workqueues: netns
		// cleanup, cgroup offlining) for >100 ms after its veth is gone, and a create that lands
		// in that work pays it in its tail (RATIONALE.md has the figure at 100 ms).
		t0 := time.Now()
		released(id)
		time.Sleep(300*time.Millisecond - time.Since(t0))
	}
	t0 = time.Now()
	for len(ids) > 0 {
		if err := c.delete(ids[len(ids)-1]); err != nil {
			return err
		}
		ids = ids[:len(ids)-1]
	}
	drain := time.Since(t0)
	base := figure{Name: "create -> ready, 1 live", Samples: create1}
	rep.add(figure{Name: fmt.Sprintf("create -> ready, %d live (300 ms apart)", n), Samples: createN}, &base, "p99 ≤ 2× with 1 live")
	rep.Values = append(rep.Values,
		value{Name: fmt.Sprintf("live idle container sandboxes (created in %.1fs, deleted in %.1fs)", fill.Seconds(), drain.Seconds()), Value: float64(n), Unit: "sandboxes", Target: "1,000"},
		value{Name: "memory per idle sandbox (host MemAvailable drop)", Value: perSandbox / (1 << 20), Unit: "MiB", Target: "≤ 10 MiB"},
		value{Name: "memory per idle sandbox (PSS of its processes)", Value: pss / (1 << 20) / float64(n), Unit: "MiB", Target: "≤ 10 MiB"},
		value{Name: "host disk allocated per idle sandbox (of its 1 GiB disk)", Value: diskBytes / (1 << 10), Unit: "KiB", Target: ""},
		value{Name: fmt.Sprintf("host uid ranges (65,536 ids each) of %d container sandboxes", ranges.sandboxes), Value: float64(ranges.distinct), Unit: "distinct", Target: "one each"})
	return nil
}

// newDiskCost returns a function that times what a sandbox's disk costs a cold create: a disk
// of the default size made (template copy, loop device, mount) and removed (not timed).
func newDiskCost(tmp string) (func() (time.Duration, error), error) {
	m, err := disk.NewManager(filepath.Join(tmp, "disk-cost"))
	if err != nil {
		return nil, err
	}
	mnt, err := mountns.Dir(filepath.Join(tmp, "disk-cost"))
	if err != nil {
		return nil, err
	}
	return func() (time.Duration, error) {
		img, at := filepath.Join(tmp, "disk-cost", "d.img"), filepath.Join(mnt, "d")
		t0 := time.Now()
		err := m.Create(img, at, sandbox.DefaultDiskBytes)
		took := time.Since(t0)
		if err == nil {
			err = disk.Remove(img, at)
		}
		return took, err
	}, nil
}

// isolationFigures reads what the live sandboxes of dataDir (warm ones too) hold of the host: the
// bytes their disk images take on the host's disk, each on average, and how many distinct host uid
// ranges the agents of how many container sandboxes run in.
func isolationFigures(dataDir string) (diskBytes float64, ranges struct{ distinct, sandboxes int }) {
	imgs, _ := filepath.Glob(filepath.Join(dataDir, "sandboxes", "*", "disk.img"))
	for _, img := range imgs {
		var st syscall.Stat_t
		if syscall.Stat(img, &st) == nil {
			diskBytes += float64(st.Blocks) * 512 / float64(len(imgs))
		}
	}
	seen := map[string]bool{}
	metas, _ := filepath.Glob(filepath.Join(dataDir, "container", "sandboxes", "*", "meta.json"))
	for _, mp := range metas {
		var m struct{ Pid int }
		if b, err := os.ReadFile(mp); err == nil && json.Unmarshal(b, &m) == nil && m.Pid > 0 {
			if um, err := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", m.Pid)); err == nil {
				if f := strings.Fields(string(um)); len(f) == 3 {
					seen[f[1]] = true
					ranges.sandboxes++
				}
			}
		}
	}
	ranges.distinct = len(seen)
	return diskBytes, ranges
}

// memAvailable is the host's MemAvailable in bytes.
func memAvailable() int64 {
	v, _ := procstatus.Bytes("/proc/meminfo", "MemAvailable")
	return v
}

// sandboxPSS sums the proportional set size of every process in a sandbox cgroup, in bytes.
func sandboxPSS() float64 {
	dirs, _ := os.ReadDir("/proc")
	var total float64
	for _, e := range dirs {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cg, err := os.ReadFile("/proc/" + e.Name() + "/cgroup")
		if err != nil || !strings.Contains(string(cg), "/sandboxd/sbx_") {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/smaps_rollup")
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "Pss:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				total += kb * 1024
			}
		}
	}
	return total
}

// figure is a latency sample set.
type figure struct {
	Name    string
	Samples []time.Duration
}

// report is everything bench prints.
type report struct {
	Date    string  `json:"date"`
	CPUs    int     `json:"cpus"`
	Kernel  string  `json:"kernel"`
	Runtime string  `json:"runtime"`
	Samples int     `json:"samples"`
	Rows    []row   `json:"latencies"`
	Values  []value `json:"values"`
}

type row struct {
	Name     string  `json:"name"`
	N        int     `json:"n"`
	P50MS    float64 `json:"p50_ms"`
	P90MS    float64 `json:"p90_ms"`
	P99MS    float64 `json:"p99_ms"`
	Baseline string  `json:"baseline,omitempty"`
	RatioP50 float64 `json:"ratio_p50,omitempty"` // p50 / the baseline's p50
	RatioP99 float64 `json:"ratio_p99,omitempty"`
	Target   string  `json:"target,omitempty"`
}

type value struct {
	Name     string  `json:"name"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	Target   string  `json:"target,omitempty"`
	Baseline string  `json:"baseline,omitempty"`
	Ratio    float64 `json:"ratio,omitempty"` // Value / the baseline's
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (r *report) add(f figure, base *figure, target string) {
	rw := row{Name: f.Name, N: len(f.Samples), P50MS: msOf(pct(f.Samples, 50)), P90MS: msOf(pct(f.Samples, 90)),
		P99MS: msOf(pct(f.Samples, 99)), Target: target}
	if base != nil {
		rw.Baseline = base.Name
		rw.RatioP50 = float64(pct(f.Samples, 50)) / float64(pct(base.Samples, 50))
		rw.RatioP99 = float64(pct(f.Samples, 99)) / float64(pct(base.Samples, 99))
	}
	r.Rows = append(r.Rows, rw)
}

func (r *report) print() {
	fmt.Printf("sandboxd bench %s: %d CPUs, kernel %s, runtime %s, %d samples per figure\n", r.Date, r.CPUs, r.Kernel, r.Runtime, r.Samples)
	fmt.Printf("%-46s %9s %9s %9s %8s %8s  %s\n", "latency", "p50", "p90", "p99", "p50/base", "p99/base", "target")
	for _, rw := range r.Rows {
		ratio := func(v float64) string {
			if rw.Baseline == "" {
				return "-"
			}
			return fmt.Sprintf("%.2fx", v)
		}
		fmt.Printf("%-46s %9s %9s %9s %8s %8s  %s\n", rw.Name, msText(rw.P50MS), msText(rw.P90MS), msText(rw.P99MS), ratio(rw.RatioP50), ratio(rw.RatioP99), rw.Target)
	}
	for _, v := range r.Values {
		ratio := ""
		if v.Baseline != "" {
			ratio = fmt.Sprintf(" %.2fx base", v.Ratio)
		}
		fmt.Printf("%-46s %9.1f %s%s  %s\n", v.Name, v.Value, v.Unit, ratio, v.Target)
	}
}

// msText prints a latency in ms, or in µs (as "us") below a millisecond (pinning an answer takes
// tens of them).
func msText(ms float64) string {
	if ms < 1 {
		return fmt.Sprintf("%.1fus", ms*1000)
	}
	return fmt.Sprintf("%.1fms", ms)
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}

// benchClient makes the bench's API calls: the timed ones with do (nothing but the request), the
// others with cl, the API's Go client.
type benchClient struct {
	url, key string
	cl       *client.Client
}

func newBenchClient(url, key string) *benchClient {
	return &benchClient{url: url, key: key, cl: &client.Client{BaseURL: url, APIKey: key, HTTPClient: benchHTTP, UserAgent: "sandboxd-bench"}}
}

// benchHTTP keeps a connection per concurrent client (the default keeps 2 idle per host).
var benchHTTP = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}

func (c *benchClient) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("X-AgentCop-Key", c.key)
	resp, err := benchHTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (c *benchClient) create(cfg map[string]any) (string, error) {
	var r api.CreateSandboxResponse
	body := map[string]any{"agent_id": "bench"}
	if cfg != nil {
		body["config"] = cfg
	}
	err := c.do("POST", "/api/sandbox/create", body, &r)
	if err == nil && r.Status != "ready" {
		err = fmt.Errorf("create: status %s", r.Status)
	}
	return r.SandboxID, err
}

func (c *benchClient) run(id string) (time.Duration, error) { return c.runIn(id, "") }

// runIn times print(1) in code context ctx of sandbox id ("": a fresh run).
func (c *benchClient) runIn(id, ctx string) (time.Duration, error) {
	return c.runCodeIn(id, ctx, "print(1)", "1\n")
}

// createContext makes a code context in sandbox id.
func (c *benchClient) createContext(id string) (string, error) {
	cc, err := c.cl.CreateContext(context.Background(), id)
	if err != nil {
		return "", err
	}
	return cc.ContextID, nil
}

// runCode runs code synchronously in sandbox id and times the request; the run must complete and
// print stdout.
func (c *benchClient) runCode(id, code, stdout string) (time.Duration, error) {
	return c.runCodeIn(id, "", code, stdout)
}

// runCodeIn is runCode in code context ctx ("": a fresh run).
func (c *benchClient) runCodeIn(id, ctx, code, stdout string) (time.Duration, error) {
	var r api.Run
	body := map[string]any{"code": code}
	if ctx != "" {
		body["context"] = ctx
	}
	t0 := time.Now()
	err := c.do("POST", "/api/sandbox/"+id+"/run", body, &r)
	d := time.Since(t0)
	if err == nil && (r.Status != "completed" || r.Stdout != stdout) {
		err = fmt.Errorf("run %q: %s %q %s", code, r.Status, r.Stdout, r.Stderr)
	}
	return d, err
}

func (c *benchClient) delete(id string) error { return c.do("DELETE", "/api/sandbox/"+id, nil, nil) }
