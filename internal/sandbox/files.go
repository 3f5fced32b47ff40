package sandbox

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/hostfs"
	"github.com/sandboxd/sandboxd/internal/store"
)

// DefaultMaxUploadBytes is the per-file upload limit unless Config.MaxUploadBytes says otherwise.
const DefaultMaxUploadBytes = 100 << 20

// fileTarget is a user path resolved to the mount that holds it: a host directory, or a path of a
// driver that keeps the sandbox's files (driver.Filer).
type fileTarget struct {
	ctx   context.Context // the request's
	lv    *live
	path  string      // the clean absolute path in the sandbox
	mount string      // the declared path that holds it ("" for the runs' outputs)
	rel   string      // relative to the mount ("" for the mount itself)
	dir   *hostfs.Dir // the mount's host directory (nil with filer); close closes it
	filer driver.Filer
	// readOnly: the files API only reads here, whatever the sandbox may do (the runs' outputs).
	readOnly bool
}

func (t *fileTarget) close() {
	if t.dir != nil {
		t.dir.Close()
	}
}

func (t *fileTarget) write(r io.Reader, limit int64) (int64, string, error) {
	if t.filer != nil {
		return t.filer.WriteFile(t.ctx, t.lv.id, t.mount, t.rel, r, limit)
	}
	return t.dir.Write(t.rel, r, limit)
}

func (t *fileTarget) open() (driver.File, hostfs.Info, error) {
	if t.filer != nil {
		return t.filer.OpenFile(t.ctx, t.lv.id, t.mount, t.rel)
	}
	f, err := t.dir.OpenFile(t.rel)
	if err != nil {
		return nil, hostfs.Info{}, err
	}
	return f, f.Info, nil
}

func (t *fileTarget) remove() error {
	if t.filer != nil {
		return t.filer.RemoveFile(t.ctx, t.lv.id, t.mount, t.rel)
	}
	return t.dir.Remove(t.rel)
}

// resolveFile finds the declared read_only or read_write path that holds p in a live sandbox.
// p must be absolute without "." or ".." parts; a trailing "/" is allowed. Outside every
// declared path or inside a blocked one → path_not_allowed.
func (s *Service) resolveFile(ctx context.Context, acct store.Account, sandboxID, p string) (*fileTarget, error) {
	lv, err := s.liveSandbox(ctx, acct, sandboxID)
	if err != nil {
		return nil, err
	}
	if p == "" {
		return nil, errorf(KindInvalid, "path is required: ?path=/workspace/data/file.csv")
	}
	if !strings.HasPrefix(p, "/") {
		return nil, errorf(KindPathNotAllowed, "path %q must be absolute", p)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return nil, errorf(KindPathNotAllowed, "path %q must not contain \"..\"", p)
		}
	}
	if strings.ContainsRune(p, 0) {
		return nil, errorf(KindPathNotAllowed, "path %q contains a NUL byte", p)
	}
	clean := path.Clean(p)
	if within(clean, OutputsPath) {
		return s.resolveOutput(ctx, lv, clean)
	}
	fsys := lv.sp.config.Filesystem
	for _, b := range fsys.Blocked {
		if within(clean, b) {
			return nil, errorf(KindPathNotAllowed, "path %s is inside the blocked path %s", clean, b)
		}
	}
	mount := ""
	for _, m := range append(append([]string{}, fsys.ReadOnly...), fsys.ReadWrite...) {
		if within(clean, m) && len(m) > len(mount) {
			mount = m
		}
	}
	if mount == "" {
		return nil, errorf(KindPathNotAllowed, "path %s is outside the sandbox's read_only and read_write paths (%s)",
			clean, strings.Join(append(append([]string{}, fsys.ReadOnly...), fsys.ReadWrite...), ", "))
	}
	t := &fileTarget{ctx: ctx, lv: lv, path: clean, mount: mount, rel: strings.TrimPrefix(strings.TrimPrefix(clean, mount), "/")}
	if f, ok := s.drivers[lv.rec.Mode].(driver.Filer); ok {
		t.filer = f
		return t, nil
	}
	h := s.hostOf(lv.id)
	if h == nil {
		return nil, errorf(KindSandboxDestroyed, "sandbox %s was destroyed meanwhile", lv.id)
	}
	dir, err := hostfs.Open(MountDir(h.root, mount), filepath.Join(h.root, ".staging"))
	if err != nil {
		return nil, s.fileGone(lv, err)
	}
	t.dir = dir
	return t, nil
}

// resolveOutput is resolveFile for a path below OutputsPath: the sandbox's run outputs, read-only.
func (s *Service) resolveOutput(ctx context.Context, lv *live, clean string) (*fileTarget, error) {
	h := s.hostOf(lv.id)
	if h == nil {
		return nil, errorf(KindSandboxDestroyed, "sandbox %s was destroyed meanwhile", lv.id)
	}
	// Only read (errReadOnly): no staging directory (its Write fails).
	dir, err := hostfs.Open(s.outputsDir(lv.id), "")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errorf(KindNotFound, "no file %s in sandbox %s: its runs have no outputs", clean, lv.id)
	} else if err != nil {
		return nil, s.fileGone(lv, err)
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(clean, OutputsPath), "/")
	return &fileTarget{ctx: ctx, lv: lv, path: clean, rel: rel, dir: dir, readOnly: true}, nil
}

// errReadOnly refuses a write or delete of t when it is read-only.
func errReadOnly(t *fileTarget) error {
	if !t.readOnly {
		return nil
	}
	return errorf(KindPathNotAllowed, "path %s is read-only: %s holds the runs' outputs, which the files API only reads", t.path, OutputsPath)
}

// within reports whether p is dir or below it (both clean and absolute).
func within(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// liveSandbox returns sandbox id of acct if it is live and provisioned.
func (s *Service) liveSandbox(ctx context.Context, acct store.Account, id string) (*live, error) {
	rec, err := s.st.GetSandbox(ctx, acct.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errorf(KindNotFound, "no sandbox %q", id)
	} else if err != nil {
		return nil, internal("get sandbox", err)
	}
	s.mu.Lock()
	lv := s.live[id]
	s.mu.Unlock()
	if lv == nil {
		return nil, errorf(KindSandboxDestroyed, "sandbox %s is %s: its files are gone with it", id, rec.Status)
	}
	lv.mu.Lock()
	status, closing := lv.rec.Status, lv.closing
	lv.mu.Unlock()
	switch {
	case closing:
		return nil, errorf(KindSandboxDestroyed, "sandbox %s is being destroyed", id)
	case status == store.SandboxProvisioning:
		return nil, errorf(KindSandboxNotReady, "sandbox %s is still provisioning: poll GET /api/sandbox/%s until it is ready", id, id)
	}
	return lv, nil
}

// fileGone classifies a failure of the host directory: the sandbox went away meanwhile, or an
// internal error.
func (s *Service) fileGone(lv *live, err error) error {
	if lv.ctx.Err() != nil || errors.Is(err, driver.ErrNotFound) {
		return errorf(KindSandboxDestroyed, "sandbox %s was destroyed meanwhile", lv.id)
	}
	return internal("sandbox files", err)
}

// fileError maps hostfs's errors to the API's.
func (s *Service) fileError(t *fileTarget, err error) error {
	switch {
	case errors.Is(err, hostfs.ErrEscapes):
		return errorf(KindPathNotAllowed, "path %s leads outside its mount through a symlink (the files API follows only relative symlinks that stay inside the mount)", t.path)
	case errors.Is(err, hostfs.ErrNotRegular):
		return errorf(KindPathNotAllowed, "path %s is a special file (FIFO, device or socket)", t.path)
	case errors.Is(err, hostfs.ErrTooLarge):
		return errorf(KindPayloadTooLarge, "the file is larger than the upload limit of %d bytes", s.maxUpload())
	case errors.Is(err, hostfs.ErrIsDir):
		return errorf(KindConflict, "path %s is a directory", t.path)
	case errors.Is(err, hostfs.ErrNotDir):
		return errorf(KindConflict, "a parent of %s is a file, not a directory", t.path)
	case errors.Is(err, hostfs.ErrNotEmpty):
		return errorf(KindConflict, "directory %s is not empty", t.path)
	case errors.Is(err, hostfs.ErrRoot):
		return errorf(KindPathNotAllowed, "path %s is a declared mount itself: name a file inside it", t.path)
	case errors.Is(err, fs.ErrNotExist):
		return errorf(KindNotFound, "no file %s in sandbox %s", t.path, t.lv.id)
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		size, used := int64(0), int64(0)
		if t.filer != nil {
			size = t.lv.sp.diskBytes
			used, _ = t.filer.DiskUsage(t.ctx, t.lv.id) // 0 if it cannot tell
		} else {
			h := s.hostOf(t.lv.id)
			size, used = h.size, h.diskUsed()
		}
		return errorf(KindInsufficientStorage, "the file does not fit on the sandbox's disk of %s (config.resources.disk), of which its files use %s: delete files or create the sandbox with a larger disk",
			formatBytes(size), formatBytes(used))
	}
	return s.fileGone(t.lv, err)
}

func (s *Service) maxUpload() int64 {
	if s.cfg.MaxUploadBytes > 0 {
		return s.cfg.MaxUploadBytes
	}
	return DefaultMaxUploadBytes
}

// MaxUploadBytes is the per-file upload limit.
func (s *Service) MaxUploadBytes() int64 { return s.maxUpload() }

// WriteFile stores body as the file p of a sandbox (creating parent directories), atomically,
// and records a file.written event. A body over the upload limit is payload_too_large and
// stores nothing.
func (s *Service) WriteFile(ctx context.Context, acct store.Account, sandboxID, p string, body io.Reader) (api.FileWritten, error) {
	t, err := s.resolveFile(ctx, acct, sandboxID, p)
	if err != nil {
		return api.FileWritten{}, err
	}
	defer t.close()
	if err := errReadOnly(t); err != nil {
		return api.FileWritten{}, err
	}
	if strings.HasSuffix(p, "/") {
		return api.FileWritten{}, errorf(KindInvalid, "path %s names a directory: name the file to write", p)
	}
	size, sum, err := t.write(body, s.maxUpload())
	if err != nil {
		var mbe interface{ MaxBytesLimit() int64 }
		if errors.As(err, &mbe) {
			err = hostfs.ErrTooLarge
		}
		return api.FileWritten{}, s.fileError(t, err)
	}
	s.audit(ctx, store.Event{AccountID: acct.ID, Type: "file.written", SandboxID: sandboxID, AgentID: t.lv.rec.AgentID,
		Detail: obj("path", t.path, "size", size, "sha256", sum)})
	return api.FileWritten{Path: t.path, Size: size, SHA256: sum}, nil
}

// OpenedFile is a file or directory of a sandbox opened for reading. Close it.
type OpenedFile struct {
	driver.File
	Info hostfs.Info
	Path string
	t    *fileTarget
	s    *Service
	acct store.Account
}

// OpenFile opens the file or directory p of a sandbox for reading.
func (s *Service) OpenFile(ctx context.Context, acct store.Account, sandboxID, p string) (*OpenedFile, error) {
	t, err := s.resolveFile(ctx, acct, sandboxID, p)
	if err != nil {
		return nil, err
	}
	defer t.close()
	f, info, err := t.open()
	if err != nil {
		return nil, s.fileError(t, err)
	}
	if strings.HasSuffix(p, "/") && info.Type != "dir" {
		f.Close()
		return nil, errorf(KindConflict, "path %s ends with \"/\" but %s is a file, not a directory", p, t.path)
	}
	return &OpenedFile{File: f, Info: info, Path: t.path, t: t, s: s, acct: acct}, nil
}

// List returns the entries of an opened directory.
func (f *OpenedFile) List() (api.FileList, error) {
	infos, err := f.ReadDir()
	if err != nil {
		return api.FileList{}, f.s.fileError(f.t, err)
	}
	out := api.FileList{Path: f.Path, Entries: make([]api.FileEntry, 0, len(infos))}
	for _, i := range infos {
		out.Entries = append(out.Entries, api.FileEntry{Name: i.Name, Size: i.Size, Type: i.Type, ModifiedAt: i.ModTime})
	}
	return out, nil
}

// Audited records that n bytes of the opened file were served (file.read).
func (f *OpenedFile) Audited(ctx context.Context, n int64) {
	f.s.audit(ctx, store.Event{AccountID: f.acct.ID, Type: "file.read", SandboxID: f.t.lv.id, AgentID: f.t.lv.rec.AgentID,
		Detail: obj("path", f.Path, "size", f.Info.Size, "bytes", n)})
}

// DeleteFile removes the file (or empty directory) p of a sandbox and records file.deleted.
func (s *Service) DeleteFile(ctx context.Context, acct store.Account, sandboxID, p string) error {
	t, err := s.resolveFile(ctx, acct, sandboxID, p)
	if err != nil {
		return err
	}
	defer t.close()
	if err := errReadOnly(t); err != nil {
		return err
	}
	if err := t.remove(); err != nil {
		return s.fileError(t, err)
	}
	s.audit(ctx, store.Event{AccountID: acct.ID, Type: "file.deleted", SandboxID: sandboxID, AgentID: t.lv.rec.AgentID,
		Detail: obj("path", t.path)})
	return nil
}
