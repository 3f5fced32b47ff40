package wasm

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
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
