package hostfs

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// Resolve is how OpenAt and MkdirAllAt resolve a path relative to a directory descriptor: one
// of the two policies, Beneath or InRoot, optionally with NoSymlinks. In both, the kernel
// resolves the whole path (openat2), so no check can race with a change of the tree, and magic
// links (/proc/<pid>/fd/…, /proc/<pid>/root, …) are never followed.
type Resolve uint64

const (
	// Beneath: the path must stay beneath the directory. An absolute path, a ".." above it or a
	// symlink leading out (absolute, or relative through "..") fails as an escape (see OpenAt).
	// Symlinks that stay inside are followed. For directories a sandbox can write.
	Beneath Resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS
	// InRoot: the directory is "/" while the path resolves: ".." stops at it, and an absolute
	// path or symlink starts from it, as inside a container whose root file system it is (an
	// image's absolute symlinks keep working). Nothing outside is reachable. Crossing a mount
	// point beneath the directory fails as an escape.
	InRoot Resolve = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV
	// NoSymlinks, added to either policy, refuses every symlink on the way (ELOOP), for callers
	// whose name-based rules a link could route around.
	NoSymlinks Resolve = unix.RESOLVE_NO_SYMLINKS
)

// escapeError is the error of a path that leads outside its directory: ErrEscapes, and EACCES
// ("access denied") for callers that speak errno.
type escapeError struct{}

func (escapeError) Error() string   { return ErrEscapes.Error() }
func (escapeError) Unwrap() []error { return []error{ErrEscapes, unix.EACCES} }

// OpenAt opens rel relative to the directory open as dirfd ("" or "." is the directory itself),
// resolving it by policy how. O_CLOEXEC is always added; mode is used only with O_CREAT or
// O_TMPFILE. Interrupted and raced lookups (EINTR, EAGAIN) are retried. A path leading outside
// (EXDEV) fails with a *fs.PathError that is errors.Is both ErrEscapes and unix.EACCES; any
// other failure is a *fs.PathError holding the unix.Errno. Open FIFOs with O_PATH or O_NONBLOCK,
// or opening one blocks until a writer comes.
func OpenAt(dirfd int, rel string, flags uint64, mode uint32, how Resolve) (int, error) {
	if rel == "" {
		rel = "."
	}
	if p := how &^ NoSymlinks; p != Beneath && p != InRoot {
		return -1, &fs.PathError{Op: "open", Path: rel, Err: fmt.Errorf("resolve %#x is neither Beneath nor InRoot: %w", uint64(how), unix.EINVAL)}
	}
	oh := unix.OpenHow{Flags: flags | unix.O_CLOEXEC, Resolve: uint64(how)}
	if flags&unix.O_CREAT != 0 || flags&unix.O_TMPFILE == unix.O_TMPFILE {
		oh.Mode = uint64(mode) // openat2 refuses a mode otherwise
	}
	for {
		fd, err := unix.Openat2(dirfd, rel, &oh)
		switch {
		case err == nil:
			return fd, nil
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN): // EAGAIN: a concurrent rename raced the lookup
			continue
		case errors.Is(err, unix.EXDEV):
			return -1, &fs.PathError{Op: "open", Path: rel, Err: escapeError{}}
		default:
			return -1, &fs.PathError{Op: "open", Path: rel, Err: err}
		}
	}
}

// MkdirAllAt creates directory rel and its missing parents relative to the directory open as
// dirfd, every existing component resolved by policy how (as OpenAt does, from dirfd each time,
// so a component swapped for a symlink meanwhile is resolved by the same rules). New directories
// get mode (less the umask) and, unless uid and gid are both -1, that owner (-1 keeps either).
// What stands at rel or at a parent must be a directory in the end: a file or a dangling symlink
// fails (ENOTDIR, ENOENT). Errors are OpenAt's, or a *fs.PathError of mkdir or chown.
func MkdirAllAt(dirfd int, rel string, mode uint32, uid, gid int, how Resolve) error {
	rel = path.Clean(rel) // lexically: "a/../b" makes no "a"; what is left, the kernel resolves
	cur := ""
	if strings.HasPrefix(rel, "/") {
		cur = "/" // Beneath refuses it as an escape, InRoot starts from the directory
	}
	for _, part := range strings.Split(rel, "/") {
		if part == "" || part == "." {
			continue
		}
		parent := cur
		switch cur {
		case "":
			cur = part
		case "/":
			cur += part
		default:
			cur += "/" + part
		}
		if err := isDirAt(dirfd, cur, how); !errors.Is(err, unix.ENOENT) {
			if err != nil {
				return err
			}
			continue
		}
		pfd, err := OpenAt(dirfd, parent, unix.O_PATH|unix.O_DIRECTORY, 0, how)
		if err != nil {
			return err
		}
		err = unix.Mkdirat(pfd, part, mode)
		op := "mkdir"
		if err == nil && (uid != -1 || gid != -1) {
			err, op = unix.Fchownat(pfd, part, uid, gid, unix.AT_SYMLINK_NOFOLLOW), "chown"
		}
		unix.Close(pfd)
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return &fs.PathError{Op: op, Path: cur, Err: err}
		}
		// Resolve again: what stands there now (made by us or by a racing creator) must be a
		// directory, not a file or a dangling link.
		if err := isDirAt(dirfd, cur, how); err != nil {
			return err
		}
	}
	return nil
}

// isDirAt reports, as OpenAt's error, whether rel resolves to a directory (nil) or not.
func isDirAt(dirfd int, rel string, how Resolve) error {
	fd, err := OpenAt(dirfd, rel, unix.O_PATH|unix.O_DIRECTORY, 0, how)
	if err == nil {
		unix.Close(fd)
	}
	return err
}
