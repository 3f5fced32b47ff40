package imagestore

import (
	"archive/tar"
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

// WASM images: pure-Python packages added to a WASM base image (python.wasm and its standard
// library, which the server serves under the base's name). The store holds the packages only —
// one root per digest, a site-packages directory the WASM driver mounts read-only at the guest's
// /usr/local/lib/python3.11/dist-packages (on sys.path) — and records the base's name; the server puts the two
// together when a sandbox asks for the image (sandbox.Image.Base).
//
// The source is a directory of wheels (*.whl; pure Python only: tags py3-none-any or
// py2.py3-none-any, no native extension files) or an importable tree (packages and modules, as
// a site-packages directory holds them). Either is turned into one tar stream in a fixed order —
// what is refused is refused while the stream is written, naming the wheel and entry — and that
// stream is unpacked by unpack (unpack.go) like an OCI image's layers, with the same limits and
// the same resolution beneath the new root. The image's digest is the stream's sha256: the same
// wheels or the same tree make the same digest, and share a root.

// WASM image defaults.
const (
	ModeWASM        = "wasm"
	DefaultWASMBase = "python:3.11-wasi" // the WASM image sandboxd builds (scripts/build-python-wasm.sh)
	// wasmPython is the Python of a base whose name says no version: the only one the WASM
	// driver runs.
	wasmPython = "3.11"
)

// nativeExts are the suffixes of files a WASI Python cannot load (native extension modules and
// libraries); a WASM image holding one is refused.
var nativeExts = []string{".so", ".pyd", ".dylib", ".dll"}

// basePythonRe finds the Python version in a base image's name (python:3.11-wasi → 3.11).
var basePythonRe = regexp.MustCompile(`python:?(3\.[0-9]+)`)

// importWASM adds the packages at src (a directory of wheels, or an importable tree) as a WASM
// image on opts.Base.
func (s *Store) importWASM(ctx context.Context, src, name string, opts Options) (Image, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return Image{}, err
	}
	st, err := os.Stat(src)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	if !st.IsDir() {
		return Image{}, fmt.Errorf("import %s: %w: a WASM image is a directory of pure-Python wheels (*.whl) or an importable tree of packages and modules", src, ErrInvalid)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	var wheels, others []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".whl") && e.Type().IsRegular() {
			wheels = append(wheels, e.Name())
		} else {
			others = append(others, e.Name())
		}
	}
	var write func(*tar.Writer) error
	switch {
	case len(wheels) == 0 && len(others) == 0:
		return Image{}, fmt.Errorf("import %s: %w: the directory is empty (want pure-Python wheels, or packages and modules)", src, ErrInvalid)
	case len(wheels) > 0 && len(others) > 0:
		return Image{}, fmt.Errorf("import %s: %w: it holds wheels (%s) and other entries (%s): give a directory of wheels only, or an importable tree without wheels",
			src, ErrInvalid, wheels[0], others[0])
	case len(wheels) > 0:
		write = func(tw *tar.Writer) error { return wheelsTar(ctx, tw, src, wheels) }
	default:
		write = func(tw *tar.Writer) error { return treeTar(ctx, tw, src) }
	}
	if err := s.cleanTmp(ctx); err != nil {
		return Image{}, err
	}
	work, release, err := s.newWork(ctx, "wasm-")
	if err != nil {
		return Image{}, err
	}
	defer release()
	root := filepath.Join(work, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		return Image{}, fmt.Errorf("image store: %w", err)
	}
	if err := os.Chmod(root, 0o755); err != nil { // whatever the umask: the sandbox's user reads it
		return Image{}, fmt.Errorf("image store: %w", err)
	}
	size, digest, err := unpackStream(ctx, write, root, limits{maxBytes: opts.MaxBytes, maxEntries: opts.MaxEntries})
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	pkgs, err := Packages(root)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	python := wasmPython
	if m := basePythonRe.FindStringSubmatch(opts.Base); m != nil {
		python = m[1]
	}
	im := Image{Name: name, Digest: digest, Size: size, Python: python, Mode: ModeWASM, Base: opts.Base,
		Packages: pkgs, Created: time.Now().UTC()}
	im, err = s.commit(ctx, im, root, opts)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	return im, nil
}

// unpackStream unpacks the tar stream write produces into root and returns the bytes unpacked
// and the stream's digest. An error of write (the source refused) is returned as it is.
func unpackStream(ctx context.Context, write func(*tar.Writer) error, root string, lim limits) (int64, string, error) {
	pr, pw := io.Pipe()
	h := sha256.New()
	done := make(chan error, 1)
	go func() {
		tw := tar.NewWriter(io.MultiWriter(pw, h))
		err := write(tw)
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
		done <- err
	}()
	st, err := unpack(ctx, pr, root, lim)
	if err == nil {
		_, err = io.Copy(io.Discard, pr) // nothing after the end marker; the writer's error, if any
	}
	pr.CloseWithError(errUnpackEnded) // stops a writer still writing
	if werr := <-done; werr != nil && !errors.Is(werr, errUnpackEnded) {
		return 0, "", werr
	}
	if err != nil {
		return 0, "", fmt.Errorf("unpack: %w", err)
	}
	return st.bytes, "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

var errUnpackEnded = errors.New("the unpack ended")

// wheelNameRe is a wheel's file name: {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl.
var wheelNameRe = regexp.MustCompile(`^([^-]+)-([^-]+)(?:-[0-9][^-]*)?-([^-]+)-([^-]+)-([^-]+)\.whl$`)

// checkWheelName refuses a wheel whose tags say it is not pure Python 3.
func checkWheelName(w string) error {
	m := wheelNameRe.FindStringSubmatch(w)
	if m == nil {
		return fmt.Errorf("%w: wheel %s: not a wheel's file name (NAME-VERSION-PYTHON-ABI-PLATFORM.whl)", ErrInvalid, w)
	}
	py3 := slices.ContainsFunc(strings.Split(m[3], "."), func(t string) bool { return strings.HasPrefix(t, "py3") })
	if !py3 || m[4] != "none" || m[5] != "any" {
		return fmt.Errorf("%w: wheel %s is not a pure-Python wheel (tags %s-%s-%s): WASM sandboxes load pure Python only (py3-none-any); build one for %s without native code, or use container mode",
			ErrInvalid, w, m[3], m[4], m[5], m[1])
	}
	return nil
}

// dataDirRe is a wheel's .data directory ({distribution}-{version}.data).
var dataDirRe = regexp.MustCompile(`^[^/]+\.data$`)

// wheelEntry returns where a wheel's entry goes in the site-packages root ("" : left out — a
// directory, or a .data part that is not importable: scripts, headers, data), or why it is
// refused.
func wheelEntry(wheel string, f *zip.File) (string, error) {
	n := f.Name
	if n == "" || strings.HasPrefix(n, "/") || strings.ContainsAny(n, "\\\x00") || (len(n) > 1 && n[1] == ':') ||
		slices.Contains(strings.Split(n, "/"), "..") {
		return "", fmt.Errorf("%w: wheel %s: entry %q leaves the package directory (an absolute name or a \"..\")", ErrInvalid, wheel, n)
	}
	mode := f.Mode()
	if mode&fs.ModeSymlink != 0 {
		return "", fmt.Errorf("%w: wheel %s: entry %s is a symbolic link (WASM sandboxes follow none)", ErrInvalid, wheel, n)
	}
	if mode.IsDir() || strings.HasSuffix(n, "/") {
		return "", nil
	}
	if !mode.IsRegular() {
		return "", fmt.Errorf("%w: wheel %s: entry %s is not a regular file", ErrInvalid, wheel, n)
	}
	c := path.Clean(n)
	if first, rest, ok := strings.Cut(c, "/"); ok && dataDirRe.MatchString(first) {
		kind, inner, ok := strings.Cut(rest, "/")
		if !ok || (kind != "purelib" && kind != "platlib") {
			return "", nil
		}
		c = inner
	}
	if err := nativeFile(c); err != nil {
		return "", fmt.Errorf("%w: wheel %s: %v", ErrInvalid, wheel, err)
	}
	return c, nil
}

// nativeFile refuses a native extension module or library.
func nativeFile(name string) error {
	base := path.Base(name)
	for _, ext := range nativeExts {
		if strings.HasSuffix(base, ext) || strings.Contains(base, ext+".") { // libx.so.1
			return fmt.Errorf("%s is native code (%s), which WASI Python cannot load: WASM images hold pure Python only", name, ext)
		}
	}
	return nil
}

// wheelsTar writes the importable files of the wheels in dir (sorted) as one tar stream. Two
// wheels holding the same file are refused.
func wheelsTar(ctx context.Context, tw *tar.Writer, dir string, wheels []string) error {
	slices.Sort(wheels)
	from := map[string]string{}
	for _, w := range wheels {
		if err := checkWheelName(w); err != nil {
			return err
		}
		zr, err := zip.OpenReader(filepath.Join(dir, w))
		if err != nil {
			return fmt.Errorf("%w: wheel %s: not a readable zip archive: %v", ErrInvalid, w, err)
		}
		err = func() error {
			defer zr.Close()
			for _, f := range zr.File {
				if err := ctx.Err(); err != nil {
					return err
				}
				name, err := wheelEntry(w, f)
				if err != nil {
					return err
				}
				if name == "" {
					continue
				}
				if other, ok := from[name]; ok {
					if other == "" {
						return fmt.Errorf("%w: %s is a directory and a file in wheel %s", ErrInvalid, name, w)
					}
					return fmt.Errorf("%w: wheels %s and %s both hold %s", ErrInvalid, other, w, name)
				}
				from[name] = w
				if err := parentHeaders(tw, name, from, w); err != nil {
					return err
				}
				rc, err := f.Open()
				if err != nil {
					return fmt.Errorf("%w: wheel %s: %s: %v", ErrInvalid, w, f.Name, err)
				}
				err = writeFile(tw, name, int64(f.UncompressedSize64), f.Modified, rc)
				rc.Close()
				if err != nil {
					return fmt.Errorf("wheel %s: %s: %w", w, f.Name, err)
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// treeTar writes the tree at dir as one tar stream: directories and regular files (symlinks,
// devices and native code refused, naming the path).
func treeTar(ctx context.Context, tw *tar.Writer, dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		switch t := d.Type(); {
		case t.IsDir():
			return dirHeader(tw, rel)
		case t&fs.ModeSymlink != 0:
			return fmt.Errorf("%w: %s is a symbolic link: WASM sandboxes follow none; copy what it points to into the tree", ErrInvalid, rel)
		case !t.IsRegular():
			return fmt.Errorf("%w: %s is not a regular file or a directory", ErrInvalid, rel)
		}
		if err := nativeFile(rel); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("%w: %s is not a regular file", ErrInvalid, rel)
		}
		return writeFile(tw, rel, st.Size(), st.ModTime(), f)
	})
}

// parentHeaders writes the directory entries of name's parents that from (what the wheels hold so
// far: a file's wheel, or "" for a directory) does not hold yet, outermost first, and records
// them there. Without them unpack would make the directories itself, under its process's umask.
func parentHeaders(tw *tar.Writer, name string, from map[string]string, wheel string) error {
	dir := path.Dir(name)
	if dir == "." {
		return nil
	}
	if other, ok := from[dir]; ok {
		if other != "" {
			return fmt.Errorf("%w: %s is a file in wheel %s and a directory in %s", ErrInvalid, dir, other, wheel)
		}
		return nil
	}
	if err := parentHeaders(tw, dir, from, wheel); err != nil {
		return err
	}
	from[dir] = ""
	return dirHeader(tw, dir)
}

// dirHeader writes one directory, readable by everyone.
func dirHeader(tw *tar.Writer, name string) error {
	return tw.WriteHeader(&tar.Header{Name: name + "/", Typeflag: tar.TypeDir, Mode: 0o755, Format: tar.FormatPAX})
}

// writeFile writes one regular file, readable by everyone (the sandbox's user reads it), of
// exactly size bytes.
func writeFile(tw *tar.Writer, name string, size int64, mtime time.Time, r io.Reader) error {
	hdr := &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: mtime.UTC(), Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	n, err := io.Copy(tw, io.LimitReader(r, size))
	if err == nil && n != size {
		err = fmt.Errorf("%w: %d bytes, %d announced", ErrInvalid, n, size)
	}
	return err
}
