// Package imagestore is the content-addressed store of OCI images the operator approved: an
// index of names, each naming the manifest digest of an image, and one unpacked root file system
// per digest that the container driver mounts read-only (as the lower layer of each sandbox's
// overlay) like the images the project builds.
//
// Layout under the store's directory (<data-dir>/images):
//
//	index.json               name → {digest, size, python, mode, runtime, base, packages, created};
//	                         replaced atomically
//	lock                     flock(2) held by every change of the index or of rootfs/
//	rootfs/sha256-<hex>/     one unpacked root per digest, made once, never changed: an OCI
//	                         image's root file system, or a WASM image's site-packages (wasm.go)
//	tmp/                     unpacks in progress (each flock(2)ed by its import while it runs)
//	                         and roots being deleted; what no live import holds is removed by
//	                         the next Open or import (a killed import's leftovers)
//
// Import and Pull verify what they read — the manifest against its digest, the config against
// the manifest, every layer's compressed bytes against the manifest's digest and its
// uncompressed tar against the config's diff ID, hashing while the bytes stream — and refuse a
// mismatch with ErrDigest. The layers are flattened by go-containerregistry (mutate.Extract:
// whiteouts, opaque directories, names and relative links that leave the image) and the one
// flattened stream is unpacked by unpack (unpack.go), which resolves every name in the kernel
// beneath the new root so that nothing in the archive can write outside it. An image must have
// a python3 (python.go). The root is unpacked into tmp/ and renamed into place: a root in
// rootfs/ is always complete.
//
// Changes take the lock, so `sandboxd images import|rm` work with the server running or not;
// readers (List, Get, Images) read the index without it (it is replaced by rename, never
// written in place). The server rereads the index when its modification time changes.
package imagestore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Errors callers classify.
var (
	ErrNotFound = errors.New("no image of that name in the store")
	ErrInUse    = errors.New("image is in use by a live sandbox")
	ErrDigest   = errors.New("image content does not match its digest")
	ErrNoPython = errors.New("image has no python3")
	ErrTooLarge = errors.New("image is larger than the limit")
	ErrInvalid  = errors.New("invalid image")
)

// Defaults of Options.
const (
	DefaultMaxBytes   = 8 << 30   // unpacked bytes of one image
	DefaultMaxEntries = 1_000_000 // entries of the flattened archive
	ModeContainer     = "container"
)

// Runtimes an image may name: the OCI runtime its sandboxes run under ("" or none: the server's
// --runtime).
var Runtimes = []string{"crun", "runc", "runsc"}

// Image is one approved name in the store.
type Image struct {
	Name    string `json:"name"`
	Digest  string `json:"digest"`         // the manifest's, "sha256:<hex>"
	Size    int64  `json:"size"`           // bytes of the unpacked root (file contents)
	Python  string `json:"python"`         // "3.11"
	Mode    string `json:"mode"`           // "container" or "wasm"
	Runtime string `json:"runtime"`        // container: crun, runc, runsc or "" (the server's)
	Base    string `json:"base,omitempty"` // wasm: the WASM image (python.wasm) the packages are added to
	// Packages are the Python distributions the image holds (Packages), gathered when it was
	// imported, or at the first listing for an image imported before they were; nil: not yet.
	Packages []Package `json:"packages"`
	Created  time.Time `json:"created"`
	// Unpacked is when the digest's root was unpacked: with the digest, it tells a root from an
	// earlier one of the same digest that an rm deleted (the server's warm sandboxes of that one
	// must not serve the new one).
	Unpacked time.Time `json:"unpacked,omitzero"`
}

// Options tunes Import and Pull; the zero value takes the defaults.
type Options struct {
	// Mode is what Import reads: ModeContainer ("" too), an OCI image; or ModeWASM, pure-Python
	// packages (a directory of wheels or an importable tree) added to the WASM image Base.
	Mode       string
	Base       string // ModeWASM: the WASM image the packages are added to (default DefaultWASMBase)
	Runtime    string // ModeContainer: one of Runtimes; "": the server's
	MaxBytes   int64  // default DefaultMaxBytes
	MaxEntries int    // default DefaultMaxEntries
	// InUse, when set, says whether a live sandbox runs a digest: a root the import leaves
	// unnamed (the name's former digest) is deleted unless it is in use.
	InUse func(digest string) (bool, error)
}

func (o Options) withDefaults() (Options, error) {
	switch o.Mode {
	case "", ModeContainer:
		o.Mode = ModeContainer
		if o.Base != "" {
			return o, fmt.Errorf("%w: a base image is for WASM images (--mode wasm); a container image is whole", ErrInvalid)
		}
	case ModeWASM:
		if o.Runtime != "" {
			return o, fmt.Errorf("%w: a runtime is for container images: WASM sandboxes run under wazero", ErrInvalid)
		}
		if o.Base == "" {
			o.Base = DefaultWASMBase
		}
		if err := CheckName(o.Base); err != nil {
			return o, fmt.Errorf("base: %w", err)
		}
	default:
		return o, fmt.Errorf("%w: mode %q: want %s or %s", ErrInvalid, o.Mode, ModeContainer, ModeWASM)
	}
	if o.Runtime != "" && !slices.Contains(Runtimes, o.Runtime) {
		return o, fmt.Errorf("%w: runtime %q is not one of %s", ErrInvalid, o.Runtime, strings.Join(Runtimes, ", "))
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	return o, nil
}

// nameRe is what an image name may be: a reference as docker writes it (registry/repo:tag) or
// any short name; no spaces, no leading '-', '.' or '/'.
var nameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,199}$`)

// CheckName says whether name can name an image.
func CheckName(name string) error {
	if !nameRe.MatchString(name) || strings.Contains(name, "..") || strings.Contains(name, "//") {
		return fmt.Errorf("%w: name %q: use 1-200 characters of A-Z a-z 0-9 . _ / : @ + -, starting with a letter or digit (e.g. myorg/python:3.12)", ErrInvalid, name)
	}
	return nil
}

// Store is an image store in one directory. Its methods are safe for concurrent use, and for
// use by several processes at once (the lock).
type Store struct {
	dir string

	mu     sync.Mutex // guards the cache below
	cached []Image
	stamp  indexStamp
}

// indexStamp tells one version of the index file from another: each write is a new file
// (renamed into place), so a new inode even within one tick of the clock.
type indexStamp struct {
	ino   uint64
	mtime time.Time
	size  int64
}

// Open opens (creating it if needed) the store in dir, normally <data-dir>/images, and removes
// what a killed import or rm left in tmp/.
func Open(dir string) (*Store, error) {
	for _, d := range []string{dir, filepath.Join(dir, "rootfs"), filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("image store: %w", err)
		}
	}
	s := &Store{dir: dir}
	if err := s.cleanTmp(context.Background()); err != nil {
		return nil, err
	}
	return s, nil
}

// newWork makes a directory in tmp/ for one import and holds a flock(2) on it until release
// (which removes it): cleanTmp leaves it alone meanwhile. It is made under the store's lock, so
// cleanTmp never sees it before it is held.
func (s *Store) newWork(ctx context.Context, prefix string) (dir string, release func(), err error) {
	unlock, err := s.lock(ctx)
	if err != nil {
		return "", nil, err
	}
	defer unlock()
	dir, err = os.MkdirTemp(filepath.Join(s.dir, "tmp"), prefix)
	if err != nil {
		return "", nil, fmt.Errorf("image store: %w", err)
	}
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err == nil {
		if err = syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			syscall.Close(fd)
		}
	}
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("image store: hold %s: %w", dir, err)
	}
	return dir, func() {
		os.RemoveAll(dir)
		syscall.Close(fd)
	}, nil
}

// cleanTmp removes, under the store's lock, every entry of tmp/ that no live import holds (see
// newWork): what an import or rm killed midway left. Roots being deleted (collect) are only in
// tmp/ while the lock is held, so none is in use here.
func (s *Store) cleanTmp(ctx context.Context) error {
	unlock, err := s.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	tmp := filepath.Join(s.dir, "tmp")
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return fmt.Errorf("image store: %w", err)
	}
	var errs []error
	for _, e := range ents {
		p := filepath.Join(tmp, e.Name())
		if e.IsDir() {
			fd, err := syscall.Open(p, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			err = syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB)
			if errors.Is(err, syscall.EWOULDBLOCK) { // an import in progress holds it
				syscall.Close(fd)
				continue
			}
			if err != nil {
				syscall.Close(fd)
				errs = append(errs, err)
				continue
			}
			err = os.RemoveAll(p)
			syscall.Close(fd)
			if err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("image store: remove what killed imports left in %s: %w", tmp, err)
	}
	return nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// RootFS is the host path of the unpacked root of digest ("sha256:<hex>").
func (s *Store) RootFS(digest string) string {
	return filepath.Join(s.dir, "rootfs", strings.Replace(digest, ":", "-", 1))
}

func (s *Store) indexPath() string { return filepath.Join(s.dir, "index.json") }

// index is the file's content.
type index struct {
	Images map[string]Image `json:"images"`
}

// readIndex reads the index file; a missing file is an empty index.
func (s *Store) readIndex() (index, error) {
	ix := index{Images: map[string]Image{}}
	b, err := os.ReadFile(s.indexPath())
	if errors.Is(err, fs.ErrNotExist) {
		return ix, nil
	}
	if err != nil {
		return ix, fmt.Errorf("image store: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ix); err != nil {
		return ix, fmt.Errorf("image store: %s: %w", s.indexPath(), err)
	}
	if ix.Images == nil {
		ix.Images = map[string]Image{}
	}
	return ix, nil
}

// writeIndex replaces the index file atomically (a synced temporary file renamed over it).
func (s *Store) writeIndex(ix index) error {
	b, err := json.MarshalIndent(ix, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(s.dir, ".index-*.json")
	if err != nil {
		return fmt.Errorf("image store: %w", err)
	}
	defer os.Remove(f.Name()) // after the rename: nothing
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("image store: write index: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("image store: write index: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("image store: write index: %w", err)
	}
	if err := os.Chmod(f.Name(), 0o600); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), s.indexPath()); err != nil {
		return fmt.Errorf("image store: write index: %w", err)
	}
	return syncDir(s.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// lock takes the store's lock (blocking; ctx ends the wait) and returns its release.
func (s *Store) lock(ctx context.Context) (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_CREATE|os.O_RDWR|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("image store: lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("image store: lock: %w", err)
		}
		// Another import or rm holds it for the few milliseconds of its index change.
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("image store: waiting for the lock: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// lockIndex takes the store's lock and reads the index; unlock releases the lock.
func (s *Store) lockIndex(ctx context.Context) (ix index, unlock func(), err error) {
	if unlock, err = s.lock(ctx); err != nil {
		return ix, nil, err
	}
	if ix, err = s.readIndex(); err != nil {
		unlock()
		return ix, nil, err
	}
	return ix, unlock, nil
}

// List returns the store's images sorted by name.
func (s *Store) List() ([]Image, error) {
	ix, err := s.readIndex()
	if err != nil {
		return nil, err
	}
	out := make([]Image, 0, len(ix.Images))
	for _, im := range ix.Images {
		out = append(out, im)
	}
	slices.SortFunc(out, func(a, b Image) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Get returns the image called name, or ErrNotFound.
func (s *Store) Get(name string) (Image, error) {
	ix, err := s.readIndex()
	if err != nil {
		return Image{}, err
	}
	im, ok := ix.Images[name]
	if !ok {
		return Image{}, fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	return im, nil
}

// Images is List for a reader that asks often (the server, at every create): the index is
// read again only when it changed (another inode, modification time or size) since the last call.
// Images imported before the store gathered their packages get them now, once (written to the
// index).
func (s *Store) Images() ([]Image, error) {
	ims, err := s.images()
	if err != nil || !slices.ContainsFunc(ims, func(im Image) bool { return im.Packages == nil }) {
		return ims, err
	}
	if err := s.fillPackages(); err != nil {
		return ims, nil // listed without them; tried again at the next change
	}
	return s.images()
}

// fillPackages gathers the packages of the images that have none recorded, under the lock.
func (s *Store) fillPackages() error {
	ix, unlock, err := s.lockIndex(context.Background())
	if err != nil {
		return err
	}
	defer unlock()
	changed := false
	for name, im := range ix.Images {
		if im.Packages != nil {
			continue
		}
		if im.Packages, err = Packages(s.RootFS(im.Digest)); err != nil {
			im.Packages = []Package{} // no root to read: nothing to list
		}
		ix.Images[name], changed = im, true
	}
	if !changed {
		return nil
	}
	return s.writeIndex(ix)
}

func (s *Store) images() ([]Image, error) {
	var stamp indexStamp
	if st, err := os.Stat(s.indexPath()); err == nil {
		stamp = indexStamp{mtime: st.ModTime(), size: st.Size()}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			stamp.ino = sys.Ino
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image store: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cached != nil && stamp == s.stamp {
		return s.cached, nil
	}
	ims, err := s.List()
	if err != nil {
		return nil, err
	}
	s.cached, s.stamp = ims, stamp
	return ims, nil
}

// Remove deletes the name, and the root of its digest when no other name uses it and inUse
// (may be nil) does not say a live sandbox runs it; an image a live sandbox runs is refused
// with ErrInUse and nothing changes. Unnamed roots left by earlier imports go as well.
func (s *Store) Remove(ctx context.Context, name string, inUse func(digest string) (bool, error)) error {
	ix, unlock, err := s.lockIndex(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	im, ok := ix.Images[name]
	if !ok {
		return fmt.Errorf("image %q: %w", name, ErrNotFound)
	}
	if inUse != nil {
		used, err := inUse(im.Digest)
		if err != nil {
			return fmt.Errorf("image %q: is it in use: %w", name, err)
		}
		if used {
			return fmt.Errorf("image %q (%s): %w", name, im.Digest, ErrInUse)
		}
	}
	delete(ix.Images, name)
	if err := s.writeIndex(ix); err != nil {
		return err
	}
	return s.collect(ix, inUse)
}

// collect deletes every root no name of ix uses and no live sandbox runs (the lock is held).
// A root is first renamed into tmp/, so a root in rootfs/ is never half deleted.
func (s *Store) collect(ix index, inUse func(string) (bool, error)) error {
	named := map[string]bool{}
	for _, im := range ix.Images {
		named[strings.Replace(im.Digest, ":", "-", 1)] = true
	}
	ents, err := os.ReadDir(filepath.Join(s.dir, "rootfs"))
	if err != nil {
		return fmt.Errorf("image store: %w", err)
	}
	var errs []error
	for _, e := range ents {
		if named[e.Name()] {
			continue
		}
		if inUse != nil {
			used, err := inUse(strings.Replace(e.Name(), "-", ":", 1))
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if used {
				continue
			}
		}
		trash, err := os.MkdirTemp(filepath.Join(s.dir, "tmp"), "trash-")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.Rename(filepath.Join(s.dir, "rootfs", e.Name()), filepath.Join(trash, "root")); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(trash); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("image store: delete unused roots: %w", err)
	}
	return nil
}

// commit moves a verified, unpacked root into place (unless its digest has one already: then
// the new one is dropped) and names it, under the lock.
func (s *Store) commit(ctx context.Context, im Image, tmpRoot string, opts Options) (Image, error) {
	ix, unlock, err := s.lockIndex(ctx)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	final := s.RootFS(im.Digest)
	if tmpRoot != "" {
		if _, err := os.Lstat(final); err == nil {
			os.RemoveAll(filepath.Dir(tmpRoot))
			im.Unpacked = unpackedAt(ix, im.Digest, final)
		} else if err := os.Rename(tmpRoot, final); err != nil {
			return Image{}, fmt.Errorf("image store: %w", err)
		} else {
			im.Unpacked = time.Now().UTC()
			os.RemoveAll(filepath.Dir(tmpRoot))
			if err := syncDir(filepath.Dir(final)); err != nil {
				return Image{}, err
			}
		}
	} else if _, err := os.Lstat(final); err != nil {
		// Reused, but removed meanwhile by an rm: the caller unpacks again.
		return Image{}, errRootGone
	} else {
		im.Unpacked = unpackedAt(ix, im.Digest, final)
	}
	ix.Images[im.Name] = im
	if err := s.writeIndex(ix); err != nil {
		return Image{}, err
	}
	if opts.InUse != nil {
		if err := s.collect(ix, opts.InUse); err != nil {
			return im, err
		}
	}
	return im, nil
}

var errRootGone = errors.New("root removed meanwhile")

// unpackedAt is when the root of digest at final was unpacked: as an image of ix records it, or
// else (a root no name uses) when it was renamed into place (its change time).
func unpackedAt(ix index, digest, final string) time.Time {
	for _, im := range ix.Images {
		if im.Digest == digest && !im.Unpacked.IsZero() {
			return im.Unpacked
		}
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(final, &st); err == nil {
		return time.Unix(st.Ctim.Sec, st.Ctim.Nsec).UTC()
	}
	return time.Now().UTC()
}

// known returns what the index says of a digest's root (size, Python), when some name uses it
// and the root is there: a second import of the same digest reuses it.
func (s *Store) known(digest string) (Image, bool) {
	ix, err := s.readIndex()
	if err != nil {
		return Image{}, false
	}
	for _, im := range ix.Images {
		if im.Digest == digest {
			if _, err := os.Lstat(s.RootFS(digest)); err == nil {
				return im, true
			}
		}
	}
	return Image{}, false
}

// hostPlatform is the platform images must be for.
func hostPlatform() v1.Platform { return v1.Platform{OS: "linux", Architecture: runtime.GOARCH} }
