package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/driver"
)

// A sandbox's host side is what the service provisions for it on this machine before its driver
// does its part, and releases after: its host ids (IDRange), its runs' outputs (outputs.go) and —
// unless its driver keeps its files itself (driver.Filer: the kubernetes driver's pods) — its
// disk (package disk), a file system of the sandbox's resources.disk on which everything it can
// write lives:
//
//	<disk>/mounts/<path, escaped>   the host directory of each read_only and read_write path
//	<disk>/tmp                      its /tmp
//	<disk>/work                     the working directory of its runs (pyrunner.WorkDir)
//	<disk>/.staging                 the files API's uploads before they are renamed into place
//
// The disk's image is DataDir/sandboxes/<id>/disk.img; it is mounted at Config.MountDir/<hash of
// the id>, a directory of sandboxd's mount namespace that containers' user namespaces traverse.
// Without Config.Disks (the tests of the layers above) the same tree is a plain directory,
// DataDir/sandboxes/<id>, and nothing bounds it.
type host struct {
	ids  uint32        // the first of its host ids
	dir  string        // DataDir/sandboxes/<id>
	root string        // the disk's root (or dir without disks)
	size int64         // the disk's size (0 without disks)
	base int64         // bytes the empty disk uses (its own metadata)
	made chan struct{} // closed once its disk and directories are made, or err says why not
	err  error
	// filer: the sandbox's driver keeps its files (driver.Filer): no disk, no directory but dir
	// and its outputs.
	filer bool

	outputs outputsKept // its runs' outputs (outputs.go)
}

// mountsDir is where the host directories of a sandbox's paths are, below its root.
const mountsDir = "mounts"

// MountDir is the host directory that backs sandbox path p, below the sandbox's disk root.
func MountDir(root, p string) string {
	return filepath.Join(root, mountsDir, url.PathEscape(strings.TrimPrefix(p, "/"))) // "/" → %2F: one name per path
}

// newHost provisions sandbox id's host side and describes the sandbox for its driver drv. Its disk
// and directories are made in the background, meanwhile the driver sets up the rest: the spec's
// HostReady waits for them. A driver that keeps the sandbox's files itself (driver.Filer) gets
// neither: no disk, and the spec's host directories are empty. On error nothing of it is left;
// once it returns, releaseHost releases it (also when making the disk fails).
func (s *Service) newHost(drv driver.Driver, id string, sp spec) (driver.Spec, error) {
	ids, err := s.ids.take()
	if err != nil {
		return driver.Spec{}, err
	}
	h := &host{ids: ids, dir: filepath.Join(s.sandboxesDir(), id), made: make(chan struct{})}
	if err := os.Mkdir(h.dir, 0o700); err != nil {
		s.ids.give(ids)
		return driver.Spec{}, fmt.Errorf("sandbox dir: %w", err)
	}
	if err := os.Mkdir(s.outputsDir(id), 0o700); err != nil {
		os.RemoveAll(h.dir)
		s.ids.give(ids)
		return driver.Spec{}, fmt.Errorf("sandbox outputs dir: %w", err)
	}
	h.root = h.dir
	_, h.filer = drv.(driver.Filer)
	if s.cfg.Disks != nil && !h.filer {
		sum := sha256.Sum256([]byte(id))
		h.root, h.size = filepath.Join(s.cfg.MountDir, hex.EncodeToString(sum[:8])), sp.diskBytes
	}
	ds := driver.Spec{
		RootFS: sp.image.RootFS, SitePackages: sp.image.SitePackages, Runtime: sp.image.Runtime, Blocked: sp.config.Filesystem.Blocked, CPU: sp.cpu, MemoryBytes: sp.memoryBytes, DiskBytes: sp.diskBytes,
		PidsLimit: s.cfg.PidsLimit, AllowSpawn: sp.allowSpawn, Network: sp.network,
		HostIDs: ids, HostReady: h.ready,
	}
	if !h.filer {
		ds.TmpDir, ds.WorkDir = filepath.Join(h.root, "tmp"), filepath.Join(h.root, "work")
	}
	fs := sp.config.Filesystem
	for _, l := range []struct {
		paths []string
		ro    bool
	}{{fs.ReadOnly, true}, {fs.ReadWrite, false}} {
		for _, p := range l.paths {
			m := driver.Mount{Path: p, ReadOnly: l.ro}
			if !h.filer {
				m.HostDir = MountDir(h.root, p)
			}
			ds.Mounts = append(ds.Mounts, m)
		}
	}
	s.mu.Lock()
	s.hosts[id] = h
	s.mu.Unlock()
	go func() {
		defer close(h.made)
		h.err = s.makeHost(h, ds)
	}()
	return ds, nil
}

// createOn provisions sandbox id from sp on drv: its host side (newHost), then the driver's part,
// which its disk is made beside. The caller releases what is left on error (releaseHost after
// drv.Destroy).
func (s *Service) createOn(ctx context.Context, drv driver.Driver, id string, sp spec) error {
	ds, err := s.newHost(drv, id, sp)
	if err == nil {
		err = drv.Create(ctx, id, ds)
	}
	if err == nil {
		err = ds.HostReady() // made before a driver uses it; also when a driver needs none of it
	}
	return err
}

// makeHost makes sandbox h's disk and the directories of ds on it (nothing for a Filer driver's).
func (s *Service) makeHost(h *host, ds driver.Spec) error {
	if h.filer {
		return nil
	}
	if s.cfg.Disks != nil {
		if err := s.cfg.Disks.Create(filepath.Join(h.dir, "disk.img"), h.root, h.size); err != nil {
			return err
		}
	}
	for _, d := range []string{ds.TmpDir, ds.WorkDir, filepath.Join(h.root, mountsDir), filepath.Join(h.root, ".staging")} {
		if err := os.Mkdir(d, 0o711); err != nil {
			return fmt.Errorf("sandbox dirs: %w", err)
		}
	}
	for _, m := range ds.Mounts {
		if err := os.Mkdir(m.HostDir, 0o755); err != nil {
			return fmt.Errorf("create host dir for %s: %w", m.Path, err)
		}
	}
	if s.cfg.Disks != nil {
		h.base, _, _ = disk.Usage(h.root)
	}
	return nil
}

// ready waits until h's disk and directories are made (driver.Spec.HostReady).
func (h *host) ready() error {
	<-h.made
	return h.err
}

// hostOf returns sandbox id's host side (nil: none).
func (s *Service) hostOf(id string) *host {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hosts[id]
}

// diskUsed returns the bytes a sandbox wrote on its disk (0 without one).
func (h *host) diskUsed() int64 {
	if h == nil || h.size == 0 {
		return 0
	}
	select {
	case <-h.made: // not waited for: a disk still being made holds nothing of the sandbox's
	default:
		return 0
	}
	if h.err != nil {
		return 0
	}
	used, _, err := disk.Usage(h.root)
	if err != nil {
		return 0
	}
	return max(used-h.base, 0)
}

// releaseHost releases sandbox id's host side once its driver has destroyed it: its disk, its
// directory and — if destroyed, that is when nothing of the sandbox runs any more — its ids.
func (s *Service) releaseHost(id string, destroyed bool) {
	s.mu.Lock()
	h := s.hosts[id]
	delete(s.hosts, id)
	s.mu.Unlock()
	if h == nil { // provisioned by no one in this process: what a crash left
		h = &host{dir: filepath.Join(s.sandboxesDir(), id)}
		destroyed = false
	} else {
		<-h.made
	}
	s.dropHost(h, destroyed)
}

func (s *Service) dropHost(h *host, giveIDs bool) {
	var errs []error
	if h.root != h.dir && h.root != "" {
		errs = append(errs, disk.Remove(filepath.Join(h.dir, "disk.img"), h.root))
	}
	errs = append(errs, os.RemoveAll(h.dir))
	if err := errors.Join(errs...); err != nil {
		s.log.Error("release a sandbox's host side", "dir", h.dir, "err", err)
	} else if giveIDs && h.ids != 0 {
		s.ids.give(h.ids)
	}
}

// checkFreeSpace refuses a create when the data directory's file system has less free space than
// Config.DiskFreeFloor: sandboxes' disks are sparse, so the host's free space is what they write.
func (s *Service) checkFreeSpace() error {
	var st unix.Statfs_t
	if err := unix.Statfs(s.cfg.DataDir, &st); err != nil {
		return internal("free space of the data directory", err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < s.cfg.DiskFreeFloor {
		return errorf(KindCapacityExhausted, "this host's data directory has %s free, below its floor of %s: no new sandbox until space is freed",
			formatBytes(free), formatBytes(s.cfg.DiskFreeFloor))
	}
	return nil
}

// formatBytes writes n for people: "1.5 GiB", "300 MiB", "12 KiB", "512 B".
func formatBytes(n int64) string {
	for _, u := range []struct {
		shift uint
		name  string
	}{{30, "GiB"}, {20, "MiB"}, {10, "KiB"}} {
		if n >= 1<<u.shift {
			return strings.TrimSuffix(strings.TrimSuffix(fmt.Sprintf("%.1f", float64(n)/float64(int64(1)<<u.shift)), "0"), ".") + " " + u.name
		}
	}
	return fmt.Sprintf("%d B", n)
}

// FormatBytes writes n for people, as the service's messages do: "1.5 GiB", "300 MiB".
func FormatBytes(n int64) string { return formatBytes(n) }
