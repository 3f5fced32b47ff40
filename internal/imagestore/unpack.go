package imagestore

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// The unpack policy (RATIONALE.md, "OCI images"):
//
//   - Every name is resolved by the kernel inside the new root (hostfs.OpenAt and MkdirAllAt with
//     InRoot): ".." stops at the root, an absolute symlink starts from it, so no entry — "../x",
//     "/etc/x", a file written through a symlink to / or to /etc — lands outside. An entry is
//     made by a *at call on its parent's descriptor with a one-component name, never following a
//     symlink in that last component, and never over what exists (O_EXCL, mkdirat): the first
//     entry of a name wins (mutate.Extract already hands each name once, upper layers first).
//     Names with a ".." component are refused outright.
//   - Regular files, directories and symlinks are kept with their mode (setuid, setgid and sticky
//     bits included: sandboxes run with no_new_privs and no capabilities in a user namespace where
//     the image's owners are unmapped, so a set-id bit grants nothing; the store itself is 0700 to
//     the host's other users), owner (the tar's numeric ids, as host ids: the convention of the
//     Debian roots the project builds, owned by host root and seen as nobody inside a sandbox;
//     only when sandboxd runs as root), and modification time (Python checks its .pyc files
//     against their sources' mtimes).
//   - Symlink targets are kept as written: only the sandbox (inside its root) and this package
//     (InRoot) ever follow them.
//   - Hard links are made last, to a regular file the kernel resolves inside the root; one to a
//     directory, a symlink's target outside or a missing file is skipped.
//   - Device nodes, FIFOs and sockets are skipped (a sandbox has /dev of its own); so are an
//     entry whose parent is not a directory and an entry that would replace another.
//   - Extended attributes: only user.* from PAX records (SCHILY.xattr.user.*), on files and
//     directories; security.* (file capabilities, SELinux labels), trusted.* (overlayfs's own
//     whiteout and redirect marks) and the rest are dropped.
//   - Limits against a tar bomb: the sum of file sizes (maxBytes) and the number of entries
//     (maxEntries); over either, the unpack fails with ErrTooLarge.

// limits bound one unpack.
type limits struct {
	maxBytes   int64
	maxEntries int
}

// unpackStats says what an unpack made.
type unpackStats struct {
	bytes   int64 // file contents written
	entries int
	skipped int // entries left out by the policy
}

// unpack writes the tar stream r into root, an empty directory.
func unpack(ctx context.Context, r io.Reader, root string, lim limits) (unpackStats, error) {
	var st unpackStats
	rootfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return st, fmt.Errorf("open %s: %w", root, err)
	}
	defer unix.Close(rootfd)
	u := &unpacker{root: rootfd, chown: os.Geteuid() == 0, parent: -1}
	defer u.closeParent()
	tr := tar.NewReader(r)
	var links []*tar.Header
	var dirs []*tar.Header
	for {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return st, fmt.Errorf("read the image's tar: %w", err)
		}
		st.entries++
		if st.entries > lim.maxEntries {
			return st, fmt.Errorf("%w: more than %d entries", ErrTooLarge, lim.maxEntries)
		}
		name, ok := entryName(hdr.Name)
		if !ok {
			st.skipped++
			continue
		}
		var made bool
		switch hdr.Typeflag {
		case tar.TypeDir:
			made, err = u.dir(name, hdr)
			if made {
				dirs = append(dirs, hdr)
			}
		case tar.TypeReg, tar.TypeRegA:
			if hdr.Size > lim.maxBytes-st.bytes {
				return st, fmt.Errorf("%w: more than %d bytes unpacked (at %s)", ErrTooLarge, lim.maxBytes, name)
			}
			made, err = u.file(name, hdr, tr)
			if made {
				st.bytes += hdr.Size
			}
		case tar.TypeSymlink:
			made, err = u.symlink(name, hdr)
		case tar.TypeLink:
			links, made = append(links, hdr), true
		default: // devices, FIFOs, PAX/GNU leftovers
		}
		if err != nil {
			return st, fmt.Errorf("unpack %s: %w", name, err)
		}
		if !made {
			st.skipped++
		}
	}
	for _, hdr := range links {
		name, _ := entryName(hdr.Name)
		made, err := u.link(name, hdr)
		if err != nil {
			return st, fmt.Errorf("unpack %s: %w", name, err)
		}
		if !made {
			st.skipped++
		}
	}
	// Directories' times last: what was made in them changed them.
	for i := len(dirs) - 1; i >= 0; i-- {
		name, _ := entryName(dirs[i].Name)
		if err := u.times(name, dirs[i]); err != nil {
			return st, fmt.Errorf("unpack %s: %w", name, err)
		}
	}
	return st, nil
}

// entryName cleans a tar name to a path relative to the root ("" is the root itself); a name
// with a ".." component is refused.
func entryName(n string) (string, bool) {
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", false
		}
	}
	c := path.Clean("/" + n)[1:]
	return c, !strings.ContainsRune(c, 0)
}

// unpacker holds the root and the last parent directory opened (entries come grouped by
// directory; a directory made stays one, so its descriptor stays valid).
type unpacker struct {
	root       int
	chown      bool
	parent     int
	parentName string
}

func (u *unpacker) closeParent() {
	if u.parent >= 0 {
		unix.Close(u.parent)
		u.parent = -1
	}
}

// parentOf returns a descriptor of name's parent directory (made when missing, root-owned 0755,
// as a later entry of the directory itself sets) and name's last component; ok false when the
// parent is not a directory (a file or symlink to a file stands there).
func (u *unpacker) parentOf(name string) (fd int, base string, ok bool, err error) {
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if u.parent >= 0 && dir == u.parentName {
		return u.parent, base, true, nil
	}
	u.closeParent()
	if dir != "" {
		if err := hostfs.MkdirAllAt(u.root, dir, 0o755, -1, -1, hostfs.InRoot); err != nil {
			if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) {
				return -1, "", false, nil
			}
			return -1, "", false, err
		}
	}
	fd, err = hostfs.OpenAt(u.root, dir, unix.O_PATH|unix.O_DIRECTORY, 0, hostfs.InRoot)
	if err != nil {
		return -1, "", false, err
	}
	u.parent, u.parentName = fd, dir
	return fd, base, true, nil
}

func (u *unpacker) dir(name string, hdr *tar.Header) (bool, error) {
	var fd int
	if name == "" {
		d, err := unix.Open("/proc/self/fd/"+fmt.Sprint(u.root), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return false, err
		}
		fd = d
	} else {
		pfd, base, ok, err := u.parentOf(name)
		if err != nil || !ok {
			return false, err
		}
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return false, err
		}
		// Open what stands there without following a symlink: a directory (made now, or
		// implicitly for an earlier entry below it) takes the entry's metadata; anything else
		// is left as it is.
		fd, err = unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
	}
	defer unix.Close(fd)
	return true, u.meta(fd, hdr)
}

func (u *unpacker) file(name string, hdr *tar.Header, r io.Reader) (bool, error) {
	pfd, base, ok, err := u.parentOf(name)
	if err != nil || !ok || base == "" {
		return false, err
	}
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	if _, err := io.CopyN(f, r, hdr.Size); err != nil {
		return false, err
	}
	if err := u.meta(fd, hdr); err != nil {
		return false, err
	}
	return true, u.timesAt(pfd, base, hdr)
}

func (u *unpacker) symlink(name string, hdr *tar.Header) (bool, error) {
	pfd, base, ok, err := u.parentOf(name)
	if err != nil || !ok || base == "" || hdr.Linkname == "" {
		return false, err
	}
	if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return false, nil
		}
		return false, err
	}
	if u.chown {
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return false, err
		}
	}
	return true, u.timesAt(pfd, base, hdr)
}

// link makes a hard link to a regular file inside the root (resolved InRoot, its last
// component not followed).
func (u *unpacker) link(name string, hdr *tar.Header) (bool, error) {
	target, ok := entryName(hdr.Linkname)
	if !ok || target == "" {
		return false, nil
	}
	tfd, err := hostfs.OpenAt(u.root, target, unix.O_PATH|unix.O_NOFOLLOW, 0, hostfs.InRoot)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) || errors.Is(err, hostfs.ErrEscapes) {
			return false, nil
		}
		return false, err
	}
	defer unix.Close(tfd)
	var st unix.Stat_t
	if err := unix.Fstat(tfd, &st); err != nil {
		return false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, nil
	}
	pfd, base, ok, err := u.parentOf(name)
	if err != nil || !ok || base == "" {
		return false, err
	}
	// Through the descriptor's /proc link (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
	if err := unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", tfd), pfd, base, unix.AT_SYMLINK_FOLLOW); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// meta sets an open file's or directory's owner, mode and user.* extended attributes.
func (u *unpacker) meta(fd int, hdr *tar.Header) error {
	if u.chown {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	// After the chown, which clears set-id bits.
	if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	for k, v := range hdr.PAXRecords {
		attr, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || !strings.HasPrefix(attr, "user.") {
			continue
		}
		if err := unix.Fsetxattr(fd, attr, []byte(v), 0); err != nil && !errors.Is(err, unix.ENOTSUP) {
			return fmt.Errorf("set %s: %w", attr, err)
		}
	}
	return nil
}

// times sets name's modification (and access) time; name was made by this unpack.
func (u *unpacker) times(name string, hdr *tar.Header) error {
	if name == "" {
		return u.timesAt(u.root, "", hdr)
	}
	pfd, base, ok, err := u.parentOf(name)
	if err != nil || !ok {
		return err
	}
	return u.timesAt(pfd, base, hdr)
}

func (u *unpacker) timesAt(dirfd int, base string, hdr *tar.Header) error {
	if hdr.ModTime.IsZero() {
		return nil
	}
	ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if base == "" {
		// The root itself: through its descriptor's /proc link, resolved by the kernel.
		return unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", dirfd), ts, 0)
	}
	if err := unix.UtimesNanoAt(dirfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}
