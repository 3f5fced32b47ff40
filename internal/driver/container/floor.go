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

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/netsetup"
)

// Floor measures what a sandbox's run is compared against: the wall time of one plain foreground
// `<runtime> run` of `python3 -c 'print(1)'` on rootfs (used directly as a read-only root: no
// overlay, no agent), with the same namespaces, user, seccomp profile and cgroup limits as a
// sandbox. The container and its bundle are removed afterwards; only the run itself is timed.
func (d *Driver) Floor(ctx context.Context, rootfs string) (time.Duration, error) {
	return d.floor(ctx, rootfs, false)
}

// FloorDetached measures what a sandbox's creation is compared against: the wall time of a
// detached `<runtime> run -d` of the same kind of bundle as Floor's (its init a python3 that
// waits) followed by `<runtime> delete --force`.
func (d *Driver) FloorDetached(ctx context.Context, rootfs string) (time.Duration, error) {
	return d.floor(ctx, rootfs, true)
}

func (d *Driver) floor(ctx context.Context, rootfs string, detached bool) (time.Duration, error) {
	if err := checkRootFS(rootfs); err != nil {
		return 0, fmt.Errorf("floor: %w", err)
	}
	id := floorPrefix + statedir.RandomHex(6)
	dir := filepath.Join(d.stateDir, "floor", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	// The image bound read-only where the container's user namespace can reach it.
	root := filepath.Join(d.mnt, id, "root")
	defer func() {
		cctx := context.WithoutCancel(ctx)
		_ = d.rt.delete(cctx, id)
		_ = d.cg.removeCgroups(id)
		_ = unix.Unmount(root, unix.MNT_DETACH)
		_ = os.RemoveAll(filepath.Join(d.mnt, id))
		_ = os.RemoveAll(dir)
	}()
	if err := os.MkdirAll(root, 0o755); err != nil {
		return 0, err
	}
	if err := unix.Mount(rootfs, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return 0, fmt.Errorf("floor: bind the image: %w", err)
	}
	args := []string{"/usr/bin/python3", "-c", "print(1)"}
	if detached {
		args = []string{"/usr/bin/python3", "-c", "import time; time.sleep(60)"}
	}
	cs := containerSpec{
		id: id, rootfs: root, cwd: "/tmp", args: args,
		res: driver.Spec{CPU: 1, MemoryBytes: 512 << 20, PidsLimit: 64, HostIDs: driver.HelperIDs},
	}
	if err := statedir.WriteJSON(filepath.Join(dir, "config.json"), makeSpec(cs, d.seccomp)); err != nil {
		return 0, err
	}
	var stdout, stderr bytes.Buffer
	start := time.Now()
	if detached {
		// No pipes: the container's init would hold them open and the command never "ends".
		cmd := d.rt.command(ctx, "run", "-d", "--bundle", dir, id)
		if err := cmd.Run(); err != nil {
			return 0, fmt.Errorf("floor: %s run -d: %w", d.rt.name, err)
		}
		if err := d.rt.delete(ctx, id); err != nil {
			return 0, fmt.Errorf("floor: %s delete: %w", d.rt.name, err)
		}
		return time.Since(start), nil
	}
	cmd := d.rt.command(ctx, "run", "--bundle", dir, id)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
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
	id := floorPrefix + "net-" + statedir.RandomHex(6)
	b := &box{meta: meta{ID: id}, dir: filepath.Join(d.stateDir, "floor", id)}
	if err := os.MkdirAll(b.dir, 0o700); err != nil {
		return 0, err
	}
	mdir := d.sandboxMountDir(id) // where setupNetwork writes resolv.conf
	if err := os.Mkdir(mdir, 0o711); err != nil {
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
	err = errors.Join(err, d.net.Teardown(id), os.RemoveAll(b.dir), os.RemoveAll(mdir))
	if err != nil {
		return 0, fmt.Errorf("network cost: %w", err)
	}
	return took, nil
}

// PinCost measures what pinning the egress gateway's DNS answers costs, n answers (see
// netsetup.Manager.MeasurePins), on a network set up for the measurement alone and removed after.
func (d *Driver) PinCost(ctx context.Context, n int) (netsetup.PinCosts, error) {
	pc, err := d.net.MeasurePins(ctx, floorPrefix+"pin-"+statedir.RandomHex(6), n)
	if err != nil {
		return pc, fmt.Errorf("pin cost: %w", err)
	}
	return pc, nil
}
