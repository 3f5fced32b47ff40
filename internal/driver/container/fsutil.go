package container

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// Path resolution inside a directory treated as a root (the sandbox's overlay root, a mount's host
// directory): symlinks, ".." and absolute links are resolved as if root were "/", by the kernel
// (hostfs.InRoot), so a crafted image or host directory can never make the driver touch a path
// outside root.

// kind of a path inside a root.
type pathKind int

const (
	kindMissing pathKind = iota
	kindDir
	kindOther // a regular file or anything else that is not a directory
)

// openRoot opens directory root for resolving paths in it (O_PATH).
func openRoot(root string) (int, error) {
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", root, err)
	}
	return fd, nil
}

// statInRoot reports what rel (a path relative to root, "/" separated) is, following symlinks
// inside root.
func statInRoot(root, rel string) (pathKind, error) {
	rootFD, err := openRoot(root)
	if err != nil {
		return 0, err
	}
	defer unix.Close(rootFD)
	fd, err := hostfs.OpenAt(rootFD, rel, unix.O_PATH, 0, hostfs.InRoot)
	if errors.Is(err, unix.ENOENT) {
		return kindMissing, nil
	}
	if err != nil {
		return 0, fmt.Errorf("in %s: %w", root, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return kindDir, nil
	}
	return kindOther, nil
}

// mkdirAllInRoot creates directory rel and its missing parents inside root (mode 0755, owned by
// the caller), resolving every existing component inside root.
func mkdirAllInRoot(root, rel string) error {
	rootFD, err := openRoot(root)
	if err != nil {
		return err
	}
	defer unix.Close(rootFD)
	if err := hostfs.MkdirAllAt(rootFD, rel, 0o755, -1, -1, hostfs.InRoot); err != nil {
		return fmt.Errorf("in %s: %w", root, err)
	}
	return nil
}

// isMountPoint reports whether dir is a mount point in our namespace (its device differs from its
// parent's, or it is the root of an overlay/tmpfs mounted on the same device).
func isMountPoint(dir string) (bool, error) {
	var st, pst unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	if err := unix.Lstat(path.Dir(dir), &pst); err != nil {
		return false, err
	}
	if st.Dev != pst.Dev {
		return true, nil
	}
	// Same device: check mountinfo to be sure (bind mounts of the same filesystem).
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && cgroup.UnescapeMountinfo(f[4]) == dir {
			return true, nil
		}
	}
	return false, nil
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// regularFileInRoot makes rel (e.g. "etc/resolv.conf") a regular file inside root, to bind a file
// over: its parent directories are created if missing, a symlink or other non-directory there
// is replaced by an empty file (in the overlay's upper layer, never in the image), a missing one
// created. It reports false, without error, when rel is a directory.
func regularFileInRoot(root, rel string) (bool, error) {
	dir, name := path.Split(path.Clean("/" + rel))
	if err := mkdirAllInRoot(root, dir); err != nil {
		return false, err
	}
	rootFD, err := openRoot(root)
	if err != nil {
		return false, err
	}
	defer unix.Close(rootFD)
	dirFD, err := hostfs.OpenAt(rootFD, dir, unix.O_PATH|unix.O_DIRECTORY, 0, hostfs.InRoot)
	if err != nil {
		return false, fmt.Errorf("in %s: %w", root, err)
	}
	defer unix.Close(dirFD)
	var st unix.Stat_t
	err = unix.Fstatat(dirFD, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG:
		return true, nil
	case err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return false, nil
	case err == nil:
		if err := unix.Unlinkat(dirFD, name, 0); err != nil {
			return false, fmt.Errorf("replace %s: %w", rel, err)
		}
	case !errors.Is(err, unix.ENOENT):
		return false, fmt.Errorf("stat %s: %w", rel, err)
	}
	fd, err := unix.Openat(dirFD, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return false, fmt.Errorf("create %s: %w", rel, err)
	}
	unix.Close(fd)
	return true, nil
}

// chownDir gives directory dir (not a link to one) to uid:gid with mode.
func chownDir(dir string, uid, gid int, mode uint32) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, uid, gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	if err := unix.Fchmod(fd, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}
