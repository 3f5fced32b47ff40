package imagestore

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

// wheels writes a directory of two pure-Python wheels: thepkg (a package) and other (a module
// in its .data/purelib, and a script in .data/scripts that is not importable).
func wheels(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	imagetest.Wheel(t, dir, "thepkg-1.0-py3-none-any.whl", "thepkg", "1.0",
		imagetest.WheelFile{Name: "thepkg/__init__.py", Body: "VALUE = 42\n"},
		imagetest.WheelFile{Name: "thepkg/sub/"},
		imagetest.WheelFile{Name: "thepkg/sub/mod.py", Body: "def f():\n    return 'sub'\n"})
	imagetest.Wheel(t, dir, "other-2.0-py2.py3-none-any.whl", "other", "2.0",
		imagetest.WheelFile{Name: "other-2.0.data/purelib/othermod.py", Body: "X = 1\n"},
		imagetest.WheelFile{Name: "other-2.0.data/scripts/other-tool", Body: "#!python\n"})
	return dir
}

// TestWASMImport imports pure-Python packages as a WASM image, from wheels and from a tree, and
// checks what the store recorded and unpacked.
func TestWASMImport(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	src := wheels(t)
	im, err := s.Import(ctx, src, "team/wasm:1", Options{Mode: ModeWASM})
	if err != nil {
		t.Fatal(err)
	}
	wantPkgs := []Package{{Name: "other", Version: "2.0"}, {Name: "thepkg", Version: "1.0"}}
	if im.Mode != ModeWASM || im.Base != DefaultWASMBase || im.Python != "3.11" || !strings.HasPrefix(im.Digest, "sha256:") ||
		im.Runtime != "" || im.Size == 0 || !reflect.DeepEqual(im.Packages, wantPkgs) || im.Unpacked.IsZero() {
		t.Fatalf("imported: %+v", im)
	}
	root := s.RootFS(im.Digest)
	for rel, want := range map[string]string{
		"thepkg/__init__.py":                "VALUE = 42\n",
		"thepkg/sub/mod.py":                 "def f():\n    return 'sub'\n",
		"othermod.py":                       "X = 1\n",
		"thepkg-1.0.dist-info/METADATA":     "",
		"other-2.0.dist-info/WHEEL":         "",
		"other-2.0.data/scripts/other-tool": "<absent>",
		"other-tool":                        "<absent>",
	} {
		b, err := os.ReadFile(filepath.Join(root, rel))
		switch {
		case want == "<absent>":
			if err == nil {
				t.Errorf("%s was unpacked", rel)
			}
		case err != nil:
			t.Errorf("%s: %v", rel, err)
		case want != "" && string(b) != want:
			t.Errorf("%s: %q, want %q", rel, b, want)
		}
	}
	// Readable by the sandbox's user, owned by no one it could be.
	for rel, mode := range map[string]os.FileMode{"": 0o755 | os.ModeDir, "thepkg": 0o755 | os.ModeDir, "thepkg/__init__.py": 0o644} {
		st, err := os.Lstat(filepath.Join(root, rel))
		if err != nil || st.Mode() != mode {
			t.Errorf("%q: mode %v, %v; want %v", rel, st.Mode(), err, mode)
		}
	}
	got, err := s.Get("team/wasm:1")
	if err != nil || !reflect.DeepEqual(got.Packages, wantPkgs) || got.Base != DefaultWASMBase || got.Mode != ModeWASM {
		t.Fatalf("Get: %+v, %v", got, err)
	}

	// The same wheels under another name and base: the same digest, one root.
	im2, err := s.Import(ctx, src, "team/wasm:2", Options{Mode: ModeWASM, Base: "python:3.12-wasi"})
	if err != nil || im2.Digest != im.Digest || im2.Python != "3.12" || im2.Base != "python:3.12-wasi" || !im2.Unpacked.Equal(im.Unpacked) {
		t.Fatalf("second import: %+v, %v", im2, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.Dir(), "rootfs")); len(ents) != 1 {
		t.Errorf("rootfs: %v", ents)
	}

	// An importable tree.
	tree := t.TempDir()
	os.MkdirAll(filepath.Join(tree, "mypkg", "__pycache__"), 0o700)
	os.WriteFile(filepath.Join(tree, "mypkg", "__init__.py"), []byte("from .core import answer\n"), 0o600)
	os.WriteFile(filepath.Join(tree, "mypkg", "core.py"), []byte("def answer():\n    return 42\n"), 0o600)
	os.WriteFile(filepath.Join(tree, "single.py"), []byte("S = 's'\n"), 0o600)
	im3, err := s.Import(ctx, tree, "team/tree:1", Options{Mode: ModeWASM})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(s.RootFS(im3.Digest), "mypkg", "core.py")); err != nil || !strings.Contains(string(b), "return 42") {
		t.Errorf("tree: %q, %v", b, err)
	}
	if st, err := os.Stat(filepath.Join(s.RootFS(im3.Digest), "single.py")); err != nil || st.Mode() != 0o644 {
		t.Errorf("single.py: %v, %v", st, err)
	}
	if len(im3.Packages) != 0 || im3.Packages == nil {
		t.Errorf("a tree without metadata lists %#v", im3.Packages)
	}
	if tmp, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp")); len(tmp) != 0 {
		t.Errorf("tmp keeps %v", tmp)
	}
}

// TestWASMRefused: what a WASM image may not hold is refused with an error that names the wheel
// and the entry, and leaves nothing behind.
func TestWASMRefused(t *testing.T) {
	ctx := context.Background()
	wheel := func(file string, files ...imagetest.WheelFile) func(t *testing.T) string {
		return func(t *testing.T) string {
			dir := t.TempDir()
			imagetest.Wheel(t, dir, file, "bad", "1.0", files...)
			return dir
		}
	}
	ok := imagetest.WheelFile{Name: "bad/__init__.py", Body: "x = 1\n"}
	for _, tc := range []struct {
		name   string
		src    func(t *testing.T) string
		opts   Options
		want   error
		inText []string
	}{
		{"a native extension in a pure-looking wheel", wheel("bad-1.0-py3-none-any.whl", ok,
			imagetest.WheelFile{Name: "bad/_speedups.cpython-311-x86_64-linux-gnu.so", Body: "\x7fELF"}),
			Options{}, ErrInvalid, []string{"bad-1.0-py3-none-any.whl", "_speedups.cpython-311-x86_64-linux-gnu.so", "native code"}},
		{"a .pyd", wheel("bad-1.0-py3-none-any.whl", imagetest.WheelFile{Name: "bad/x.pyd", Body: "MZ"}),
			Options{}, ErrInvalid, []string{"bad/x.pyd"}},
		{"a platform wheel", wheel("bad-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", ok),
			Options{}, ErrInvalid, []string{"bad-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", "not a pure-Python wheel"}},
		{"a Python 2 wheel", wheel("bad-1.0-py2-none-any.whl", ok), Options{}, ErrInvalid, []string{"py2-none-any"}},
		{"not a wheel's name", wheel("bad.whl", ok), Options{}, ErrInvalid, []string{"bad.whl"}},
		{"an entry going up", wheel("bad-1.0-py3-none-any.whl", ok, imagetest.WheelFile{Name: "../x", Body: "escape"}),
			Options{}, ErrInvalid, []string{"bad-1.0-py3-none-any.whl", `"../x"`, "leaves the package directory"}},
		{"an entry going up midway", wheel("bad-1.0-py3-none-any.whl", imagetest.WheelFile{Name: "bad/../../x", Body: "escape"}),
			Options{}, ErrInvalid, []string{`"bad/../../x"`}},
		{"an absolute entry", wheel("bad-1.0-py3-none-any.whl", imagetest.WheelFile{Name: "/etc/x", Body: "escape"}),
			Options{}, ErrInvalid, []string{`"/etc/x"`, "leaves the package directory"}},
		{"a symlink entry", wheel("bad-1.0-py3-none-any.whl", imagetest.WheelFile{Name: "bad/link", Body: "/etc/passwd", Symlink: true}),
			Options{}, ErrInvalid, []string{"bad/link", "symbolic link"}},
		{"two wheels with one file", func(t *testing.T) string {
			dir := t.TempDir()
			imagetest.Wheel(t, dir, "a-1.0-py3-none-any.whl", "a", "1.0", imagetest.WheelFile{Name: "common.py"})
			imagetest.Wheel(t, dir, "b-1.0-py3-none-any.whl", "b", "1.0", imagetest.WheelFile{Name: "common.py"})
			return dir
		}, Options{}, ErrInvalid, []string{"a-1.0-py3-none-any.whl and b-1.0-py3-none-any.whl both hold common.py"}},
		{"a broken zip", func(t *testing.T) string {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "bad-1.0-py3-none-any.whl"), []byte("not a zip"), 0o644)
			return dir
		}, Options{}, ErrInvalid, []string{"bad-1.0-py3-none-any.whl", "zip"}},
		{"wheels and a tree", func(t *testing.T) string {
			dir := wheel("bad-1.0-py3-none-any.whl", ok)(t)
			os.WriteFile(filepath.Join(dir, "mod.py"), nil, 0o644)
			return dir
		}, Options{}, ErrInvalid, []string{"wheels (bad-1.0-py3-none-any.whl) and other entries (mod.py)"}},
		{"a tree with native code", func(t *testing.T) string {
			dir := t.TempDir()
			os.MkdirAll(filepath.Join(dir, "pkg"), 0o755)
			os.WriteFile(filepath.Join(dir, "pkg", "lib.so.1"), nil, 0o644)
			return dir
		}, Options{}, ErrInvalid, []string{"pkg/lib.so.1", "native code"}},
		{"a tree with a symlink", func(t *testing.T) string {
			dir := t.TempDir()
			os.Symlink("/etc/passwd", filepath.Join(dir, "passwd.py"))
			return dir
		}, Options{}, ErrInvalid, []string{"passwd.py is a symbolic link"}},
		{"an empty directory", func(t *testing.T) string { return t.TempDir() }, Options{}, ErrInvalid, []string{"empty"}},
		{"a file", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "x.whl")
			os.WriteFile(p, nil, 0o644)
			return p
		}, Options{}, ErrInvalid, []string{"a directory of pure-Python wheels"}},
		{"a runtime", wheels, Options{Runtime: "runsc"}, ErrInvalid, []string{"container images"}},
		{"a bad base", wheels, Options{Base: "../base"}, ErrInvalid, []string{"base"}},
		{"too large", wheels, Options{MaxBytes: 8}, ErrTooLarge, []string{"more than 8 bytes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			tc.opts.Mode = ModeWASM
			_, err := s.Import(ctx, tc.src(t), "app", tc.opts)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Import: %v; want %v", err, tc.want)
			}
			for _, w := range tc.inText {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the error %q does not say %q", err, w)
				}
			}
			assertNothingLeft(t, s)
		})
	}
	t.Run("a base for a container image", func(t *testing.T) {
		s := newStore(t)
		if _, err := s.Import(ctx, imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t))), "app", Options{Base: "python:3.11-wasi"}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Import: %v", err)
		}
	})
}

// TestPackages: the distributions of an OCI image (Debian's egg-info files and directories,
// dist-info directories in site-packages) are recorded at import; an image recorded without
// them gets them at its first listing, written to the index.
func TestPackages(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	img := imagetest.Image(t, imagetest.Python(t,
		imagetest.Entry{Name: "usr/lib/python3/dist-packages/numpy-1.24.2.egg-info", Body: "Metadata-Version: 1.2\nName: numpy\nVersion: 1.24.2\n"},
		imagetest.Entry{Name: "usr/lib/python3/dist-packages/pandas-1.5.3.egg-info/PKG-INFO", Body: "Metadata-Version: 2.1\nName: pandas\nVersion: 1.5.3\n"},
		imagetest.Entry{Name: "usr/lib/python3/dist-packages/requests-2.28.1.dist-info/METADATA", Body: "Metadata-Version: 2.1\nName: requests\nVersion: 2.28.1\n\nName: not-this\n"},
		imagetest.Entry{Name: "usr/local/lib/python3.11/site-packages/Foo_Bar-0.3.dist-info/RECORD", Body: ""},
		imagetest.Entry{Name: "usr/local/lib/python3.11/site-packages/evil-1.0.dist-info/METADATA", Typ: tar.TypeSymlink, Link: "/etc/passwd"},
		imagetest.Entry{Name: "lib", Typ: tar.TypeSymlink, Link: "usr/lib"},
	))
	im, err := s.Import(ctx, imagetest.WriteLayout(t, img), "app", Options{})
	if err != nil {
		t.Fatal(err)
	}
	// evil's METADATA is the image's /etc/passwd (resolved inside the root): no Name header, so
	// it is named from its directory.
	want := []Package{{Name: "evil", Version: "1.0"}, {Name: "Foo_Bar", Version: "0.3"}, {Name: "numpy", Version: "1.24.2"}, {Name: "pandas", Version: "1.5.3"}, {Name: "requests", Version: "2.28.1"}}
	if !reflect.DeepEqual(im.Packages, want) {
		t.Fatalf("packages: %+v, want %+v", im.Packages, want)
	}

	// An index written before packages were gathered: the first listing fills it in, once.
	ix, err := s.readIndex()
	if err != nil {
		t.Fatal(err)
	}
	e := ix.Images["app"]
	e.Packages = nil
	ix.Images["app"] = e
	if err := s.writeIndex(ix); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Get("app"); got.Packages != nil {
		t.Fatalf("the index still has packages: %+v", got.Packages)
	}
	ims, err := s.Images()
	if err != nil || len(ims) != 1 || !reflect.DeepEqual(ims[0].Packages, want) {
		t.Fatalf("Images: %+v, %v", ims, err)
	}
	if got, _ := s.Get("app"); !reflect.DeepEqual(got.Packages, want) {
		t.Fatalf("not written to the index: %+v", got.Packages)
	}
}

// TestStaleTmp: what a killed import left in tmp/ goes at the next Open and the next import;
// the directory of an import in progress (held) stays.
func TestStaleTmp(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	tmp := filepath.Join(s.Dir(), "tmp")
	leave := func() string {
		dir, err := os.MkdirTemp(tmp, "unpack-killed-")
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(dir, "root", "usr", "lib"), 0o755)
		os.WriteFile(filepath.Join(dir, "root", "usr", "lib", "half"), []byte("half an image"), 0o644)
		return dir
	}
	stale := leave()
	os.WriteFile(filepath.Join(tmp, ".stray"), nil, 0o600)
	live, release, err := s.newWork(ctx, "unpack-live-")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(s.Dir()); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(tmp)
	if len(ents) != 1 || ents[0].Name() != filepath.Base(live) {
		t.Fatalf("tmp after Open: %v; want only %s (held)", ents, filepath.Base(live))
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stale directory is still there: %v", err)
	}
	release()

	// Left behind while the store was open (a killed `images import` beside the server).
	stale = leave()
	if _, err := s.Import(ctx, wheels(t), "w", Options{Mode: ModeWASM}); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("tmp after an import: %v", ents)
	}
}

// TestWASMImportUmask: a WASM image's directories are readable by the sandbox's user whatever
// the umask of the process that imports it (its wheels hold no directory entries of their own).
func TestWASMImportUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	s := newStore(t)
	im, err := s.Import(context.Background(), wheels(t), "team/umask:1", Options{Mode: ModeWASM})
	if err != nil {
		t.Fatal(err)
	}
	root := s.RootFS(im.Digest)
	for _, rel := range []string{"thepkg", "thepkg/sub", "thepkg-1.0.dist-info", "other-2.0.dist-info"} {
		if st, err := os.Lstat(filepath.Join(root, rel)); err != nil || st.Mode() != 0o755|os.ModeDir {
			t.Errorf("%s: %v, %v; want drwxr-xr-x", rel, st.Mode(), err)
		}
	}
}
