// Package hostfs is host-side file access confined to one directory: every path is resolved by
// the kernel beneath the directory (openat2 with RESOLVE_BENEATH), so neither ".." nor a symlink
// — whoever planted it, whenever — can lead outside, and the check cannot race with a change of
// the tree. Symlinks that stay inside are followed. Only regular files and directories are
// opened: FIFOs, devices and sockets are refused without blocking.
//
// OpenAt and MkdirAllAt are the one place the host opens or creates a path beneath a directory
// it does not trust: Dir here, the WASM driver's guest file system and the container driver's
// work in an image's root file system all go through them.
//
// Writes are atomic: a new file is written in a staging directory outside the tree (on the same
// file system), synced, then renamed into place, so an interrupted write never leaves a partial
// file visible. New files and directories take the owner of the root directory, so that a
// sandbox user owning its mount can change what the host put there.
package hostfs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Errors callers classify. Others are I/O errors.
var (
	ErrEscapes    = errors.New("path leads outside its directory")          // "..", absolute or symlink out
	ErrNotRegular = errors.New("not a regular file or directory")           // FIFO, device, socket
	ErrTooLarge   = errors.New("file is larger than the limit")             // Write's limit
	ErrIsDir      = errors.New("is a directory")                            // Write onto a directory
	ErrNotDir     = errors.New("a parent of the path is not a directory")   // Write under a file
	ErrNotEmpty   = errors.New("directory is not empty")                    // Remove of a full directory
	ErrRoot       = errors.New("the directory itself cannot be the target") // Write/Remove of ""
)

// Dir is an open directory all paths are resolved beneath.
type Dir struct {
	fd       int
	uid, gid int
	staging  string // directory for Write's temporary files
}

// Open opens root. staging is a directory on the same file system for Write's temporary files
// (created if missing); it must not lie inside root.
func Open(root, staging string) (*Dir, error) {
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", root, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("stat %s: %w", root, err)
	}
	return &Dir{fd: fd, uid: int(st.Uid), gid: int(st.Gid), staging: staging}, nil
}

// Close releases the directory.
func (d *Dir) Close() error { return unix.Close(d.fd) }

// clean checks rel (slash-separated, relative to the directory; "" is the directory itself).
func clean(rel string) (string, error) {
	if strings.HasPrefix(rel, "/") {
		return "", ErrEscapes
	}
	for _, part := range strings.Split(rel, "/") {
		if part == ".." {
			return "", ErrEscapes
		}
	}
	c := path.Clean("/" + rel)[1:]
	return c, nil
}

// openat opens rel (clean) beneath d.
func (d *Dir) openat(rel string, flags uint64) (int, error) {
	return OpenAt(d.fd, rel, flags, 0, Beneath)
}

// Info describes a file or directory.
type Info struct {
	Name    string
	Size    int64
	Type    string // "file", "dir", "symlink", "other"
	ModTime time.Time
}

func typeOf(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	}
	return "other"
}

// File is an open regular file or directory.
type File struct {
	*os.File
	Info Info
}

// OpenFile opens rel for reading: a regular file or a directory (following symlinks that stay
// inside). Anything else is ErrNotRegular.
func (d *Dir) OpenFile(rel string) (*File, error) {
	rel, err := clean(rel)
	if err != nil {
		return nil, err
	}
	// O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
	fd, err := d.openat(rel, unix.O_RDONLY|unix.O_NOCTTY|unix.O_NONBLOCK)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, err
	}
	t := typeOf(st.Mode)
	if t != "file" && t != "dir" {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: %w", rel, ErrNotRegular)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &File{File: os.NewFile(uintptr(fd), rel), Info: Info{Name: path.Base("/" + rel), Size: st.Size, Type: t,
		ModTime: time.Unix(st.Mtim.Unix()).UTC()}}, nil
}

// ReadDir lists an open directory, sorted by name; entries are not followed (a symlink is a
// "symlink").
func (f *File) ReadDir() ([]Info, error) {
	ents, err := f.File.ReadDir(-1)
	if err != nil {
		return nil, err
	}
	out := make([]Info, 0, len(ents))
	for _, e := range ents {
		var st unix.Stat_t
		if err := unix.Fstatat(int(f.Fd()), e.Name(), &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue // removed meanwhile
		}
		out = append(out, Info{Name: e.Name(), Size: st.Size, Type: typeOf(st.Mode), ModTime: time.Unix(st.Mtim.Unix()).UTC()})
	}
	return out, nil
}

// SHA256 returns the hex SHA-256 of an open regular file's content. It is remembered in an
// extended attribute together with the file's size and modification time, so a file is hashed
// once until it changes (where the file system has no user xattrs, every call hashes).
func (f *File) SHA256() (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "", err
	}
	stamp := strconv.FormatInt(st.Size, 10) + ":" + strconv.FormatInt(st.Mtim.Nano(), 10) + ":"
	buf := make([]byte, 160)
	if n, err := unix.Fgetxattr(int(f.Fd()), xattrSHA, buf); err == nil {
		if v := string(buf[:n]); strings.HasPrefix(v, stamp) {
			return strings.TrimPrefix(v, stamp), nil
		}
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f.File, 0, st.Size)); err != nil {
		return "", err
	}
	sum := hex.EncodeToString(h.Sum(nil))
	_ = unix.Fsetxattr(int(f.Fd()), xattrSHA, []byte(stamp+sum), 0) // best effort
	return sum, nil
}

const xattrSHA = "user.sandboxd.sha256"

// mkdirAll creates the directories of rel (slash-separated, clean) beneath d, owned like the root.
func (d *Dir) mkdirAll(rel string) error {
	err := MkdirAllAt(d.fd, rel, 0o755, d.uid, d.gid, Beneath)
	if errors.Is(err, unix.ENOTDIR) {
		return fmt.Errorf("%s: %w", rel, ErrNotDir)
	}
	return err
}

// Write stores r as the file rel (creating its parent directories), atomically: readers see the
// old file or the whole new one. It fails with ErrTooLarge, writing nothing, when r holds more
// than limit bytes. It returns the size and the hex SHA-256 of what it stored.
func (d *Dir) Write(rel string, r io.Reader, limit int64) (size int64, sum string, err error) {
	rel, err = clean(rel)
	if err != nil {
		return 0, "", err
	}
	if rel == "" {
		return 0, "", ErrRoot
	}
	if err := os.MkdirAll(d.staging, 0o700); err != nil {
		return 0, "", err
	}
	tmp, err := os.CreateTemp(d.staging, "upload-*")
	if err != nil {
		return 0, "", err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	size, err = io.Copy(io.MultiWriter(tmp, h), io.LimitReader(r, limit+1))
	if err != nil {
		return 0, "", err
	}
	if size > limit {
		return 0, "", ErrTooLarge
	}
	if err := tmp.Chmod(0o644); err != nil {
		return 0, "", err
	}
	if err := tmp.Chown(d.uid, d.gid); err != nil {
		return 0, "", err
	}
	if err := tmp.Sync(); err != nil {
		return 0, "", err
	}
	sum = hex.EncodeToString(h.Sum(nil))
	if err := rememberSum(tmp, sum, size); err != nil {
		return 0, "", err
	}
	dir, name := path.Split("/" + rel)
	dir = strings.Trim(dir, "/")
	if err := d.mkdirAll(dir); err != nil {
		return 0, "", err
	}
	parent, err := d.openat(dir, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return 0, "", err
	}
	defer unix.Close(parent)
	var st unix.Stat_t
	if err := unix.Fstatat(parent, name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && typeOf(st.Mode) == "dir" {
		return 0, "", fmt.Errorf("%s: %w", rel, ErrIsDir)
	}
	if err := unix.Renameat(unix.AT_FDCWD, tmp.Name(), parent, name); err != nil {
		return 0, "", &fs.PathError{Op: "rename", Path: rel, Err: err}
	}
	tmp.Close()
	_ = unix.Fsync(parent)
	return size, sum, nil
}

// rememberSum stores the SHA-256 of a file just written, as SHA256 would.
func rememberSum(f *os.File, sum string, size int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	v := strconv.FormatInt(size, 10) + ":" + strconv.FormatInt(st.Mtim.Nano(), 10) + ":" + sum
	_ = unix.Fsetxattr(int(f.Fd()), xattrSHA, []byte(v), 0) // best effort
	return nil
}

// Remove deletes the file rel, or the directory rel if it is empty (ErrNotEmpty otherwise). A
// symlink is removed itself, never what it points to.
func (d *Dir) Remove(rel string) error {
	rel, err := clean(rel)
	if err != nil {
		return err
	}
	if rel == "" {
		return ErrRoot
	}
	dir, name := path.Split("/" + rel)
	parent, err := d.openat(strings.Trim(dir, "/"), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	var st unix.Stat_t
	if err := unix.Fstatat(parent, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return &fs.PathError{Op: "remove", Path: rel, Err: err}
	}
	flags := 0
	if typeOf(st.Mode) == "dir" {
		flags = unix.AT_REMOVEDIR
	}
	if err := unix.Unlinkat(parent, name, flags); err != nil {
		if errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%s: %w", rel, ErrNotEmpty)
		}
		return &fs.PathError{Op: "remove", Path: rel, Err: err}
	}
	return nil
}
