package wasm

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/procstatus"
)

// Baseline measures what a wasm sandbox's run is compared against (as the container driver's
// Floor is for containers): the time one fresh instance of image's python.wasm takes to run
// `python -I -u -B -c print(1)` from the already compiled module, in a worker (the same path as
// runs, without the runner), measured by the worker from instantiation to exit. The worker comes
// from the image's pool (started if needed; its compile is not timed) and is killed afterwards.
func (d *Driver) Baseline(ctx context.Context, image string) (time.Duration, error) {
	if err := checkImage(image); err != nil {
		return 0, fmt.Errorf("baseline: %w", err)
	}
	p, err := d.poolFor(image)
	if err != nil {
		return 0, err
	}
	tmp, err := os.MkdirTemp(d.stateDir, "baseline-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	ids := int(driver.HelperIDs + driver.SandboxUser)
	if err := os.Chown(tmp, ids, ids); err != nil {
		return 0, err
	}
	w, err := p.get(ctx)
	if err != nil {
		return 0, fmt.Errorf("baseline: %w", err)
	}
	defer d.discard(w)
	spec := driver.Spec{RootFS: image, MemoryBytes: 512 << 20}
	cfg, err := planConfig(spec, tmp)
	if err != nil {
		return 0, err
	}
	cfg.UID, cfg.GID = ids, ids
	b := &box{id: "baseline", image: image, group: w.group, w: w, cfg: cfg}
	if err := w.configure(ctx, b.cfg); err != nil {
		return 0, fmt.Errorf("baseline: %w", err)
	}
	env, _ := buildEnv(nil)
	res, err := d.exec(ctx, b, protocol.Run{Env: env, Args: []string{"python", "-I", "-u", "-B", "-c", "print(1)"}},
		driver.ExecRequest{Timeout: time.Minute})
	if err != nil {
		return 0, fmt.Errorf("baseline: %w", err)
	}
	if res.Status != driver.StatusCompleted || strings.TrimSpace(string(res.Stdout)) != "1" {
		return 0, fmt.Errorf("baseline: python printed %q (%s, exit %d; stderr: %s)", res.Stdout, res.Status, res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return res.Duration, nil
}

// WorkerCosts is what a worker costs before a sandbox claims it (MeasureWorkers, for sandboxd
// bench), one sample of each per worker.
type WorkerCosts struct {
	CompileCold   []time.Duration // python.wasm compiled with an empty compilation cache (the worker's own measure)
	CompileCached []time.Duration // the same module loaded from the driver's compilation cache
	IdleRSS       []int64         // a ready worker's resident memory, waiting for its sandbox (bytes)
}

// MeasureWorkers starts n workers of image with an empty compilation cache of their own and n
// with the driver's (filled first, if need be), interleaved, at the CPU weight of a sandbox's
// worker; it takes each one's compile time (Ready.CompileNS) and, from the second kind, each ready
// worker's RSS, and kills them. Nothing of them is left when it returns.
func (d *Driver) MeasureWorkers(ctx context.Context, image string, n int) (WorkerCosts, error) {
	if err := checkImage(image); err != nil {
		return WorkerCosts{}, fmt.Errorf("measure workers: %w", err)
	}
	start := func(cache string) (*proc, error) {
		w, err := d.startProcCache(ctx, image, false, cache)
		if err != nil {
			return nil, fmt.Errorf("measure workers: %w", err)
		}
		return w, nil
	}
	w, err := start(d.cacheDir()) // the driver's cache filled
	if err != nil {
		return WorkerCosts{}, err
	}
	d.discard(w)
	var wc WorkerCosts
	for range n {
		cold, err := os.MkdirTemp(d.stateDir, "cold-cache-")
		if err != nil {
			return WorkerCosts{}, err
		}
		w, err = start(cold)
		if err == nil {
			wc.CompileCold = append(wc.CompileCold, time.Duration(w.ready.CompileNS))
			d.discard(w)
		}
		if rerr := os.RemoveAll(cold); err == nil {
			err = rerr
		}
		if err != nil {
			return WorkerCosts{}, err
		}
		if w, err = start(d.cacheDir()); err != nil {
			return WorkerCosts{}, err
		}
		rss, err := procstatus.RSS(w.pid)
		d.discard(w)
		if err != nil {
			return WorkerCosts{}, fmt.Errorf("measure workers: %w", err)
		}
		wc.CompileCached = append(wc.CompileCached, time.Duration(w.ready.CompileNS))
		wc.IdleRSS = append(wc.IdleRSS, rss)
	}
	return wc, nil
}
