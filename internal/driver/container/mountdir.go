package container

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The driver's mount directory (mountns.Dir of its state dir: a tmpfs that every user can
// traverse, private to sandboxd's mount namespace) holds what a container's user namespace must
// reach, under names that tell nothing of the host — a container's mountinfo shows a bind's
// source as its path inside the file system it comes from, and an overlay's directories as the
// strings it was mounted with:
//
//	sandbox-agent    a copy of the agent binary, bound read-only at /.sandbox/bin/sandbox-agent
//	blocked-dir      an empty, root-owned, mode-000 directory, and
//	blocked-file     file, bound read-only over blocked paths
//	<h>/root         a sandbox's root: an overlay whose directories are given as /proc/self/fd/N
//	<h>/resolv.conf  its resolver (h: a hash of the sandbox's id, so that no id shows)
//	<helper id>/root the root of a probe or floor container

// openMountDir fills the mount directory (again, when a driver on the same state dir opens twice).
func (d *Driver) openMountDir() error {
	agent := filepath.Join(d.mnt, "sandbox-agent")
	if err := copyFile(d.agentBin, agent, 0o755); err != nil {
		return fmt.Errorf("copy the agent binary: %w", err)
	}
	d.agentBin = agent
	for _, file := range []bool{false, true} {
		if _, err := blockedSource(d.mnt, file); err != nil {
			return fmt.Errorf("blocked source: %w", err)
		}
	}
	return nil
}

// sandboxMountDir is sandbox id's directory in the mount directory.
func (d *Driver) sandboxMountDir(id string) string {
	sum := sha256.Sum256([]byte(id))
	return filepath.Join(d.mnt, hex.EncodeToString(sum[:8]))
}

// copyFile copies src to dst (replaced atomically) with mode.
func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	os.Remove(tmp)
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, mode)
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// mountOverlay mounts an overlay of lower (read-only), upper and work on target, naming the
// directories by descriptor (/proc/self/fd/N), so that the mount's options, which every process
// that sees it can read in mountinfo, hold no host path.
func mountOverlay(lower, upper, work, target string) error {
	var fds [3]int
	for i, p := range []string{lower, upper, work} {
		fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			for _, f := range fds[:i] {
				unix.Close(f)
			}
			return fmt.Errorf("overlay: open %s: %w", p, err)
		}
		fds[i] = fd
	}
	defer func() {
		for _, f := range fds {
			unix.Close(f)
		}
	}()
	opts := fmt.Sprintf("lowerdir=/proc/self/fd/%d,upperdir=/proc/self/fd/%d,workdir=/proc/self/fd/%d", fds[0], fds[1], fds[2])
	if err := unix.Mount("overlay", target, "overlay", unix.MS_NODEV, opts); err != nil {
		var st unix.Statfs_t
		if unix.Fstatfs(fds[1], &st) == nil && st.Type == unix.OVERLAYFS_SUPER_MAGIC {
			return fmt.Errorf("mount overlay root: %w: the data dir is on overlayfs, which cannot be an upper layer (put --data-dir on ext4, xfs, btrfs or tmpfs; sandboxd doctor checks it)", err)
		}
		return fmt.Errorf("mount overlay root: %w", err)
	}
	return nil
}
