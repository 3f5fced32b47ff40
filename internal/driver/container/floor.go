package container

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
)

// Floor measures what a sandbox's run is compared against: the wall time of one plain foreground
// `<runtime> run` of `python3 -c 'print(1)'` on rootfs (used directly as a read-only root: no
// overlay, no agent), with the same namespaces, user, seccomp profile and cgroup limits as a
// sandbox. The container and its bundle are removed afterwards; only the run itself is timed.
func (d *Driver) Floor(ctx context.Context, rootfs string) (time.Duration, error) {
	if err := checkRootFS(rootfs); err != nil {
		return 0, fmt.Errorf("floor: %w", err)
	}
	id := floorPrefix + randomHex(6)
	dir := filepath.Join(d.stateDir, "floor", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	defer func() {
		cctx := context.WithoutCancel(ctx)
		_ = d.rt.delete(cctx, id)
		_ = d.cg.removeCgroups(id)
		_ = os.RemoveAll(dir)
	}()
	cs := containerSpec{
		id: id, rootfs: rootfs, cwd: "/tmp",
		args: []string{"/usr/bin/python3", "-c", "print(1)"},
		res:  driver.Spec{CPU: 1, MemoryBytes: 512 << 20, PidsLimit: 64, TmpBytes: 64 << 20},
	}
	if err := writeJSON(filepath.Join(dir, "config.json"), makeSpec(cs, d.seccomp)); err != nil {
		return 0, err
	}
	cmd := d.rt.command(ctx, "run", "--bundle", dir, id)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("floor: %s run: %w: %s", d.rt.name, err, strings.TrimSpace(stderr.String()))
	}
	if got := strings.TrimSpace(stdout.String()); got != "1" {
		return 0, fmt.Errorf("floor: python printed %q, want \"1\" (stderr: %s)", got, strings.TrimSpace(stderr.String()))
	}
	return took, nil
}

// NetworkCost measures what a sandbox's network adds to its creation: the wall time of the
// network setup Create performs (namespace, veth pair, addresses and routes, nftables rules on
// both sides, the egress gateway's listeners) for a throwaway sandbox allowing one host. The
// network is torn down afterwards; only the setup is timed.
func (d *Driver) NetworkCost(ctx context.Context) (time.Duration, error) {
	id := floorPrefix + "net-" + randomHex(6)
	b := &box{meta: meta{ID: id}, dir: filepath.Join(d.stateDir, "floor", id)}
	if err := os.MkdirAll(b.dir, 0o700); err != nil {
		return 0, err
	}
	p, err := egress.ParsePolicy(true, []string{"api.company.com"})
	if err != nil {
		return 0, err
	}
	start := time.Now()
	_, err = d.setupNetwork(ctx, b, p)
	took := time.Since(start)
	d.gw.Detach(id)
	err = errors.Join(err, d.net.Teardown(id), os.RemoveAll(b.dir))
	if err != nil {
		return 0, fmt.Errorf("network cost: %w", err)
	}
	return took, nil
}
