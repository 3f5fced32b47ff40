package worker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/sys"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// hostFS is one WASI mount: a host directory served to the guest through file descriptors the
// kernel resolves beneath it (openat2 RESOLVE_BENEATH), never through host path strings. It is
// wazero's sys.FS, replacing sysfs.DirFS, which joins guest paths onto the host path and lets the
// host follow any symlink (trap 1 of the package doc).
//
// The rules it enforces, whatever the guest does:
//   - Nothing outside the directory is reachable: ".." never leaves it, absolute and escaping
//     symlinks fail (EACCES), magic links (/proc/…) are never followed.
//   - The guest cannot make links: Symlink and Link fail with EPERM.
//   - readOnly: every operation that would change something fails with EROFS (files open
//     read-only).
//   - blocked paths (relative to the directory) are absent: lookups fail with ENOENT, creating
//     one fails with EACCES, directory listings leave them out, and neither they nor a directory
//     holding one can be renamed or removed (EACCES), so no other name can ever lead to them.
//   - nested mounts (another mount's path inside this one) are served by that mount's hostFS,
//     also when reached through a directory descriptor of this one; renames across them fail.
//   - When a mount holds blocked paths or nested mounts, symlinks are not followed at all
//     (RESOLVE_NO_SYMLINKS: ELOOP), so a link cannot route around the name-based rules above.
//     Elsewhere symlinks that stay inside the directory work (the guest cannot create any; they
//     can only come from the host side).
type hostFS struct {
	experimentalsys.UnimplementedFS
	dir      string // host directory (for messages only: every access goes through root)
	root     int    // O_PATH descriptor of dir
	readOnly bool
	blocked  []string   // clean relative paths, never ""
	nested   []nestedFS // longest path first
	resolve  hostfs.Resolve
}

type nestedFS struct {
	at string // clean relative path of the mount point in the parent
	fs *hostFS
}

// newHostFS makes a mount of the directory open as descriptor root (O_PATH is enough), named dir
// in messages. The mount owns the descriptor (close releases it).
func newHostFS(root int, dir string, readOnly bool) *hostFS {
	return &hostFS{dir: dir, root: root, readOnly: readOnly,
		resolve: hostfs.Beneath}
}

// block makes rel (clean, relative, not "") absent.
func (h *hostFS) block(rel string) {
	h.blocked = append(h.blocked, rel)
	h.resolve |= hostfs.NoSymlinks
}

// nest serves rel (clean, relative, not "") from child.
func (h *hostFS) nest(rel string, child *hostFS) {
	h.nested = append(h.nested, nestedFS{at: rel, fs: child})
	sort.SliceStable(h.nested, func(i, j int) bool { return len(h.nested[i].at) > len(h.nested[j].at) })
	h.resolve |= hostfs.NoSymlinks
}

func (h *hostFS) close() { unix.Close(h.root) }

// String implements fmt.Stringer (wazero prints mounts in errors).
func (h *hostFS) String() string { return h.dir }

// within reports whether rel is base or below it (both clean, relative; "" is the root).
func within(rel, base string) bool {
	return base == "" || rel == base || strings.HasPrefix(rel, base+"/")
}

// cleanRel turns a path wazero passes (relative to the mount, maybe "." or "/" for the root, maybe
// with a trailing slash) into a clean relative path ("" for the root). Lexical ".." that would
// leave the mount is refused (wazero refuses it before us; this is a second lock).
func cleanRel(p string) (string, experimentalsys.Errno) {
	c := path.Clean(p)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", experimentalsys.EPERM
	}
	// An absolute form ("/x", as wazero joins a directory named "" with a path) is clamped at
	// the mount's root by Clean.
	c = strings.TrimLeft(c, "/")
	if c == "." {
		c = ""
	}
	return c, 0
}

// route finds the mount serving p and p's clean path in it. Blocked paths are ENOENT.
func (h *hostFS) route(p string) (*hostFS, string, experimentalsys.Errno) {
	rel, errno := cleanRel(p)
	if errno != 0 {
		return nil, "", errno
	}
	return h.routeClean(rel)
}

func (h *hostFS) routeClean(rel string) (*hostFS, string, experimentalsys.Errno) {
	for _, n := range h.nested {
		if within(rel, n.at) {
			return n.fs.routeClean(strings.TrimPrefix(strings.TrimPrefix(rel, n.at), "/"))
		}
	}
	for _, b := range h.blocked {
		if within(rel, b) {
			return nil, "", experimentalsys.ENOENT
		}
	}
	return h, rel, 0
}

// guards reports whether rel is an ancestor of (or is) a blocked path or a nested mount point:
// such directories must keep their names.
func (h *hostFS) guards(rel string) bool {
	for _, b := range h.blocked {
		if within(b, rel) {
			return true
		}
	}
	for _, n := range h.nested {
		if within(n.at, rel) {
			return true
		}
	}
	return false
}

// hidden reports whether the entry name of directory dir (clean relative) is blocked.
func (h *hostFS) hidden(dir, name string) bool {
	if len(h.blocked) == 0 {
		return false
	}
	rel := name
	if dir != "" {
		rel = dir + "/" + name
	}
	for _, b := range h.blocked {
		if rel == b {
			return true
		}
	}
	return false
}

// openat2 opens rel (relative to root, "" = root) with the mount's resolve rules (hostfs.OpenAt).
// Errors are the bare unix.Errno; an escape is EACCES.
func (h *hostFS) openat2(rel string, flags uint64, mode uint32) (int, error) {
	fd, err := hostfs.OpenAt(h.root, rel, flags, mode, h.resolve)
	var errno unix.Errno
	if errors.As(err, &errno) {
		return -1, errno
	}
	return fd, err
}

// parent opens rel's parent directory (O_PATH) and returns it with rel's last element.
func (h *hostFS) parent(rel string) (int, string, error) {
	if rel == "" {
		return -1, "", unix.EBUSY
	}
	fd, err := h.openat2(path.Dir(rel), unix.O_PATH|unix.O_DIRECTORY, 0)
	return fd, path.Base(rel), err
}

func errnoOf(err error) experimentalsys.Errno {
	switch err {
	case nil:
		return 0
	case unix.EBUSY, unix.EXDEV:
		return experimentalsys.EACCES
	case unix.ENOSPC, unix.EDQUOT:
		return experimentalsys.EIO
	}
	return experimentalsys.UnwrapOSError(err)
}

// writeFlags are the open flags that change a file.
const writeFlags = experimentalsys.O_RDWR | experimentalsys.O_WRONLY | experimentalsys.O_CREAT |
	experimentalsys.O_TRUNC | experimentalsys.O_APPEND

// OpenFile implements sys.FS.
func (h *hostFS) OpenFile(p string, flag experimentalsys.Oflag, perm fs.FileMode) (experimentalsys.File, experimentalsys.Errno) {
	m, rel, errno := h.route(p)
	if errno != 0 {
		if errno == experimentalsys.ENOENT && flag&experimentalsys.O_CREAT != 0 {
			errno = experimentalsys.EACCES
		}
		return nil, errno
	}
	if m.readOnly && flag&writeFlags != 0 {
		return nil, experimentalsys.EROFS
	}
	if flag&experimentalsys.O_DIRECTORY != 0 && flag&(experimentalsys.O_RDWR|experimentalsys.O_WRONLY) != 0 {
		return nil, experimentalsys.EISDIR
	}
	if strings.HasSuffix(p, "/") && rel != "" {
		rel += "/" // keep "must be a directory"
	}
	fd, err := m.openat2(rel, openFlags(flag), uint32(perm.Perm()))
	if err == unix.EACCES && rel == "" && flag&writeFlags == 0 {
		// A mount's root the worker may not read: wazero opens every mount's root when the
		// instance starts and cannot start it without. Hand it a copy of the root's O_PATH
		// descriptor instead: the instance starts, and using the directory fails as it should.
		fd, err = unix.FcntlInt(uintptr(m.root), unix.F_DUPFD_CLOEXEC, 0)
		if err == nil {
			return &hostFile{fs: m, fd: fd, flag: flag, denied: true}, 0
		}
	}
	if err != nil {
		return nil, errnoOf(err)
	}
	return &hostFile{fs: m, rel: strings.TrimSuffix(rel, "/"), fd: fd, flag: flag}, 0
}

// openFlags converts wazero's flags to open(2)'s.
func openFlags(f experimentalsys.Oflag) uint64 {
	var o uint64
	switch f & (experimentalsys.O_RDONLY | experimentalsys.O_RDWR | experimentalsys.O_WRONLY) {
	case experimentalsys.O_RDWR:
		o |= unix.O_RDWR
	case experimentalsys.O_WRONLY:
		o |= unix.O_WRONLY
	}
	for _, p := range []struct {
		w experimentalsys.Oflag
		o uint64
	}{
		{experimentalsys.O_APPEND, unix.O_APPEND}, {experimentalsys.O_CREAT, unix.O_CREAT},
		{experimentalsys.O_DIRECTORY, unix.O_DIRECTORY}, {experimentalsys.O_DSYNC, unix.O_DSYNC},
		{experimentalsys.O_EXCL, unix.O_EXCL}, {experimentalsys.O_NOFOLLOW, unix.O_NOFOLLOW},
		{experimentalsys.O_RSYNC, unix.O_RSYNC}, {experimentalsys.O_SYNC, unix.O_SYNC},
		{experimentalsys.O_TRUNC, unix.O_TRUNC},
	} {
		if f&p.w != 0 {
			o |= p.o
		}
	}
	// O_NONBLOCK is not passed: regular files ignore it, and a FIFO the host side left in a mount
	// would otherwise hand the guest an EAGAIN loop instead of an ordinary blocking read.
	return o
}

// statPath stats rel, following a final symlink unless nofollow.
func (h *hostFS) statPath(p string, nofollow bool) (sys.Stat_t, experimentalsys.Errno) {
	m, rel, errno := h.route(p)
	if errno != 0 {
		return sys.Stat_t{}, errno
	}
	flags := uint64(unix.O_PATH)
	if nofollow {
		flags |= unix.O_NOFOLLOW
	}
	fd, err := m.openat2(rel, flags, 0)
	if err != nil {
		return sys.Stat_t{}, errnoOf(err)
	}
	defer unix.Close(fd)
	return fstat(fd)
}

// Lstat implements sys.FS.
func (h *hostFS) Lstat(p string) (sys.Stat_t, experimentalsys.Errno) { return h.statPath(p, true) }

// Stat implements sys.FS.
func (h *hostFS) Stat(p string) (sys.Stat_t, experimentalsys.Errno) { return h.statPath(p, false) }

// mutable routes p for an operation that changes the directory entry itself: blocked paths are
// EACCES, read-only mounts EROFS, and the names guarding blocked paths and nested mounts EACCES.
func (h *hostFS) mutable(p string) (*hostFS, string, experimentalsys.Errno) {
	m, rel, errno := h.route(p)
	switch {
	case errno == experimentalsys.ENOENT:
		return nil, "", experimentalsys.EACCES
	case errno != 0:
		return nil, "", errno
	case m.readOnly:
		return nil, "", experimentalsys.EROFS
	case rel == "" || m.guards(rel):
		return nil, "", experimentalsys.EACCES
	}
	return m, rel, 0
}

// Mkdir implements sys.FS.
func (h *hostFS) Mkdir(p string, perm fs.FileMode) experimentalsys.Errno {
	m, rel, errno := h.route(p)
	switch {
	case errno == experimentalsys.ENOENT:
		return experimentalsys.EACCES
	case errno != 0:
		return errno
	case rel == "":
		return experimentalsys.EEXIST
	case m.readOnly:
		return experimentalsys.EROFS
	}
	pfd, base, err := m.parent(rel)
	if err != nil {
		if err == unix.ENOTDIR {
			return experimentalsys.ENOENT
		}
		return errnoOf(err)
	}
	defer unix.Close(pfd)
	if err := unix.Mkdirat(pfd, base, uint32(perm.Perm())); err != nil {
		if err == unix.ENOTDIR {
			return experimentalsys.ENOENT
		}
		return errnoOf(err)
	}
	return 0
}

// Chmod implements sys.FS.
func (h *hostFS) Chmod(p string, perm fs.FileMode) experimentalsys.Errno {
	m, rel, errno := h.route(p)
	if errno != 0 {
		return errno
	}
	if m.readOnly {
		return experimentalsys.EROFS
	}
	fd, err := m.openat2(rel, unix.O_PATH, 0)
	if err != nil {
		return errnoOf(err)
	}
	defer unix.Close(fd)
	// chmod through the descriptor's /proc entry: the inode the kernel resolved, not a path.
	return errnoOf(unix.Fchmodat(unix.AT_FDCWD, procFD(fd), uint32(perm.Perm()), 0))
}

func procFD(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// Rename implements sys.FS.
func (h *hostFS) Rename(from, to string) experimentalsys.Errno {
	fm, frel, errno := h.mutable(from)
	if errno != 0 {
		return errno
	}
	tm, trel, errno := h.mutable(to)
	if errno != 0 {
		return errno
	}
	if fm != tm {
		return experimentalsys.EACCES // across mounts (WASI would say EXDEV; wazero cannot)
	}
	fpfd, fbase, err := fm.parent(frel)
	if err != nil {
		return errnoOf(err)
	}
	defer unix.Close(fpfd)
	tpfd, tbase, err := fm.parent(trel)
	if err != nil {
		return errnoOf(err)
	}
	defer unix.Close(tpfd)
	return errnoOf(unix.Renameat(fpfd, fbase, tpfd, tbase))
}

// Rmdir implements sys.FS.
func (h *hostFS) Rmdir(p string) experimentalsys.Errno { return h.unlink(p, unix.AT_REMOVEDIR) }

// Unlink implements sys.FS.
func (h *hostFS) Unlink(p string) experimentalsys.Errno { return h.unlink(p, 0) }

func (h *hostFS) unlink(p string, flags int) experimentalsys.Errno {
	m, rel, errno := h.mutable(p)
	if errno != 0 {
		if errno == experimentalsys.EACCES {
			if _, _, e := h.route(p); e == experimentalsys.ENOENT {
				return experimentalsys.ENOENT // a blocked path is absent
			}
		}
		return errno
	}
	pfd, base, err := m.parent(rel)
	if err != nil {
		return errnoOf(err)
	}
	defer unix.Close(pfd)
	return errnoOf(unix.Unlinkat(pfd, base, flags))
}

// Link implements sys.FS: refused, so no second name can lead to a file.
func (h *hostFS) Link(_, _ string) experimentalsys.Errno { return experimentalsys.EPERM }

// Symlink implements sys.FS: refused (trap 1: a guest-made relative symlink would let a host-side
// path walk escape the mount).
func (h *hostFS) Symlink(_, _ string) experimentalsys.Errno { return experimentalsys.EPERM }

// Readlink implements sys.FS.
func (h *hostFS) Readlink(p string) (string, experimentalsys.Errno) {
	m, rel, errno := h.route(p)
	if errno != 0 {
		return "", errno
	}
	pfd, base, err := m.parent(rel)
	if err != nil {
		if err == unix.EBUSY {
			return "", experimentalsys.EINVAL
		}
		return "", errnoOf(err)
	}
	defer unix.Close(pfd)
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(pfd, base, buf)
	if err != nil {
		return "", errnoOf(err)
	}
	return string(buf[:n]), 0
}

// Utimens implements sys.FS.
func (h *hostFS) Utimens(p string, atim, mtim int64) experimentalsys.Errno {
	m, rel, errno := h.route(p)
	if errno != 0 {
		return errno
	}
	if m.readOnly {
		return experimentalsys.EROFS
	}
	fd, err := m.openat2(rel, unix.O_PATH, 0)
	if err != nil {
		return errnoOf(err)
	}
	defer unix.Close(fd)
	ts := utimes(atim, mtim)
	return errnoOf(unix.UtimesNanoAt(unix.AT_FDCWD, procFD(fd), ts[:], 0))
}

func utimes(atim, mtim int64) [2]unix.Timespec {
	conv := func(t int64) unix.Timespec {
		if t == experimentalsys.UTIME_OMIT {
			return unix.Timespec{Nsec: unix.UTIME_OMIT}
		}
		return unix.NsecToTimespec(t)
	}
	return [2]unix.Timespec{conv(atim), conv(mtim)}
}

func fstat(fd int) (sys.Stat_t, experimentalsys.Errno) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return sys.Stat_t{}, errnoOf(err)
	}
	return statOf(&st), 0
}

func statOf(st *unix.Stat_t) sys.Stat_t {
	mode := fs.FileMode(st.Mode & 0o777)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		mode |= fs.ModeDir
	case unix.S_IFLNK:
		mode |= fs.ModeSymlink
	case unix.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		mode |= fs.ModeSocket
	case unix.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		mode |= fs.ModeDevice
	}
	if st.Mode&unix.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if st.Mode&unix.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if st.Mode&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	return sys.Stat_t{
		Dev: st.Dev, Ino: st.Ino, Mode: mode, Nlink: uint64(st.Nlink), Size: st.Size,
		Atim: st.Atim.Nano(), Mtim: st.Mtim.Nano(), Ctim: st.Ctim.Nano(),
	}
}

// hostFile is a file or directory of a hostFS, used through its descriptor only.
type hostFile struct {
	fs     *hostFS
	rel    string // clean path in fs, for hiding blocked entries in listings
	fd     int
	flag   experimentalsys.Oflag
	closed bool
	denied bool        // an unreadable mount root, open for nothing (see OpenFile)
	st     *sys.Stat_t // cached on first use: dev, ino and type do not change

	// directory reading
	dbuf    []byte
	dpos    int
	dend    int
	deof    bool
	dfilled bool
}

func (f *hostFile) stat0() (*sys.Stat_t, experimentalsys.Errno) {
	if f.closed {
		return nil, experimentalsys.EBADF
	}
	if f.st == nil {
		st, errno := fstat(f.fd)
		if errno != 0 {
			return nil, errno
		}
		f.st = &st
	}
	return f.st, 0
}

func (f *hostFile) Dev() (uint64, experimentalsys.Errno) {
	st, errno := f.stat0()
	if errno != 0 {
		return 0, errno
	}
	return st.Dev, 0
}

func (f *hostFile) Ino() (sys.Inode, experimentalsys.Errno) {
	st, errno := f.stat0()
	if errno != 0 {
		return 0, errno
	}
	return st.Ino, 0
}

func (f *hostFile) IsDir() (bool, experimentalsys.Errno) {
	st, errno := f.stat0()
	if errno != 0 {
		return false, errno
	}
	return st.Mode.IsDir(), 0
}

func (f *hostFile) IsAppend() bool { return f.flag&experimentalsys.O_APPEND != 0 }

func (f *hostFile) SetAppend(enable bool) experimentalsys.Errno {
	if f.closed {
		return experimentalsys.EBADF
	}
	fl, err := unix.FcntlInt(uintptr(f.fd), unix.F_GETFL, 0)
	if err != nil {
		return errnoOf(err)
	}
	if enable {
		if f.fs.readOnly {
			return experimentalsys.EROFS
		}
		fl |= unix.O_APPEND
		f.flag |= experimentalsys.O_APPEND
	} else {
		fl &^= unix.O_APPEND
		f.flag &^= experimentalsys.O_APPEND
	}
	_, err = unix.FcntlInt(uintptr(f.fd), unix.F_SETFL, fl)
	return errnoOf(err)
}

func (f *hostFile) Stat() (sys.Stat_t, experimentalsys.Errno) {
	if f.closed {
		return sys.Stat_t{}, experimentalsys.EBADF
	}
	st, errno := fstat(f.fd)
	if errno == 0 {
		f.st = &st
	}
	return st, errno
}

// transfer is Read, Pread, Write and Pwrite: op once, again on EINTR, with a closed file's EBADF,
// nothing to do for an empty buf, and a positioned call on a pipe's ESPIPE as ENOTSUP.
func (f *hostFile) transfer(buf []byte, positioned bool, op func([]byte) (int, error)) (int, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	if len(buf) == 0 {
		return 0, 0
	}
	for {
		n, err := op(buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.ESPIPE && positioned:
			return 0, experimentalsys.ENOTSUP
		case err != nil:
			return 0, errnoOf(err)
		}
		return n, 0
	}
}

func (f *hostFile) Read(buf []byte) (int, experimentalsys.Errno) {
	return f.transfer(buf, false, func(b []byte) (int, error) { return unix.Read(f.fd, b) })
}

func (f *hostFile) Pread(buf []byte, off int64) (int, experimentalsys.Errno) {
	return f.transfer(buf, true, func(b []byte) (int, error) { return unix.Pread(f.fd, b, off) })
}

func (f *hostFile) Seek(off offset, whence int) (int64, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	if isDir, _ := f.IsDir(); isDir {
		if off != 0 || whence != io.SeekStart {
			return 0, experimentalsys.EISDIR
		}
		f.dpos, f.dend, f.deof, f.dfilled = 0, 0, false, false
	}
	n, err := unix.Seek(f.fd, off, whence)
	if err != nil {
		return 0, errnoOf(err)
	}
	return n, 0
}

// Readdir implements sys.File: up to n entries (all when n <= 0), without "." and "..", and
// without the blocked ones.
func (f *hostFile) Readdir(n int) ([]experimentalsys.Dirent, experimentalsys.Errno) {
	if f.closed {
		return nil, experimentalsys.EBADF
	}
	if f.denied {
		return nil, experimentalsys.EACCES
	}
	if isDir, errno := f.IsDir(); errno != 0 || !isDir {
		return nil, experimentalsys.EBADF
	}
	if f.dbuf == nil {
		f.dbuf = make([]byte, 32<<10)
	}
	var out []experimentalsys.Dirent
	for n <= 0 || len(out) < n {
		if f.dpos >= f.dend {
			if f.deof {
				break
			}
			m, err := unix.Getdents(f.fd, f.dbuf)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return nil, errnoOf(err)
			}
			f.dpos, f.dend = 0, m
			if m == 0 {
				f.deof = true
				break
			}
		}
		// struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
		rec := f.dbuf[f.dpos:f.dend]
		if len(rec) < 19 {
			return nil, experimentalsys.EIO
		}
		reclen := int(binary.NativeEndian.Uint16(rec[16:18]))
		if reclen < 19 || reclen > len(rec) {
			return nil, experimentalsys.EIO
		}
		ino := binary.NativeEndian.Uint64(rec[0:8])
		typ := rec[18]
		name := rec[19:reclen]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		f.dpos += reclen
		nm := string(name)
		if nm == "." || nm == ".." || f.fs.hidden(f.rel, nm) {
			continue
		}
		out = append(out, experimentalsys.Dirent{Name: nm, Ino: ino, Type: direntType(typ)})
	}
	return out, 0
}

func direntType(t byte) fs.FileMode {
	switch t {
	case unix.DT_DIR:
		return fs.ModeDir
	case unix.DT_LNK:
		return fs.ModeSymlink
	case unix.DT_FIFO:
		return fs.ModeNamedPipe
	case unix.DT_SOCK:
		return fs.ModeSocket
	case unix.DT_CHR:
		return fs.ModeDevice | fs.ModeCharDevice
	case unix.DT_BLK:
		return fs.ModeDevice
	case unix.DT_REG:
		return 0
	}
	return fs.ModeIrregular
}

func (f *hostFile) Write(buf []byte) (int, experimentalsys.Errno) {
	return f.transfer(buf, false, func(b []byte) (int, error) { return unix.Write(f.fd, b) })
}

func (f *hostFile) Pwrite(buf []byte, off int64) (int, experimentalsys.Errno) {
	return f.transfer(buf, true, func(b []byte) (int, error) { return unix.Pwrite(f.fd, b, off) })
}

func (f *hostFile) Truncate(size int64) experimentalsys.Errno {
	if f.closed {
		return experimentalsys.EBADF
	}
	if size < 0 {
		return experimentalsys.EINVAL
	}
	if f.fs.readOnly {
		return experimentalsys.EROFS
	}
	return errnoOf(unix.Ftruncate(f.fd, size))
}

func (f *hostFile) Sync() experimentalsys.Errno {
	if f.closed {
		return experimentalsys.EBADF
	}
	return errnoOf(unix.Fsync(f.fd))
}

func (f *hostFile) Datasync() experimentalsys.Errno {
	if f.closed {
		return experimentalsys.EBADF
	}
	return errnoOf(unix.Fdatasync(f.fd))
}

func (f *hostFile) Utimens(atim, mtim int64) experimentalsys.Errno {
	if f.closed {
		return experimentalsys.EBADF
	}
	if f.fs.readOnly {
		return experimentalsys.EROFS
	}
	ts := utimes(atim, mtim)
	return errnoOf(unix.UtimesNanoAt(unix.AT_FDCWD, procFD(f.fd), ts[:], 0))
}

func (f *hostFile) Close() experimentalsys.Errno {
	if f.closed {
		return 0
	}
	f.closed = true
	return errnoOf(unix.Close(f.fd))
}

// offset is a file offset. wazero's File.Seek returns a sys.Errno, not an error, so it cannot be
// io.Seeker's Seek; go vet's stdmethods check holds every method named Seek whose first parameter
// is spelled int64 to io.Seeker's signature, and the alias keeps it from misreading these.
type offset = int64
