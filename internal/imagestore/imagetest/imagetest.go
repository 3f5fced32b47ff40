// Package imagetest builds OCI images in tests with go-containerregistry's writers: layers from
// tar entries written here (hostile ones included), images of those layers for this host's
// platform, and OCI image layouts of them.
package imagetest

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Entry is one tar entry of a layer. Typ 0 is a regular file; Mode 0 is 0644 (0755 for a
// directory).
type Entry struct {
	Name, Body, Link string
	Typ              byte
	Mode             int64
	UID, GID         int
	PAX              map[string]string
}

// MTime is every entry's modification time.
var MTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// Tar writes entries as a tar stream.
func Tar(t testing.TB, ents ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.Name, Linkname: e.Link, Typeflag: e.Typ, Mode: e.Mode, Uid: e.UID, Gid: e.GID,
			ModTime: MTime, PAXRecords: e.PAX, Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.Body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// LayerOf makes a gzip layer of a tar stream opened by open (go-containerregistry compresses it).
func LayerOf(t testing.TB, open tarball.Opener) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(open)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Layer makes a gzip layer of the entries.
func Layer(t testing.TB, ents ...Entry) v1.Layer {
	t.Helper()
	b := Tar(t, ents...)
	return LayerOf(t, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// Image stacks layers (the first lowest) into an image for this host's platform.
func Image(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// Python is a minimal root with a python3 (a symlink to python3.11, as Debian has it) and an
// /etc/passwd, plus extra.
func Python(t testing.TB, extra ...Entry) v1.Layer {
	return Layer(t, append([]Entry{
		{Name: "usr/", Typ: tar.TypeDir},
		{Name: "usr/bin/", Typ: tar.TypeDir},
		{Name: "usr/bin/python3.11", Body: "#!python\n", Mode: 0o755},
		{Name: "usr/bin/python3", Typ: tar.TypeSymlink, Link: "python3.11"},
		{Name: "etc/", Typ: tar.TypeDir},
		{Name: "etc/passwd", Body: "root:x:0:0::/root:/bin/sh\n"},
	}, extra...)...)
}

// WriteLayout writes img as an OCI image layout in a new directory of t's and returns it.
func WriteLayout(t testing.TB, img v1.Image) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Digest is img's manifest digest.
func Digest(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// DirLayer makes one gzip layer (fastest compression) of the tree at dir (DirTar).
func DirLayer(t testing.TB, dir string) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromFile(DirTar(t, dir), tarball.WithCompressionLevel(gzip.BestSpeed), tarball.WithCompressedCaching)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// DirTar writes the tree at dir, as it is — files, directories, symlinks, hard links (by inode),
// devices; modes, owners and modification times (not access or change times: the same tree
// makes the same tar) — as a tar file of t's and returns its path.
func DirTar(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "layer.tar")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	seen := map[uint64]string{} // inode → first name, for hard links
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if rel == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			return nil
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		h.Name, h.Uname, h.Gname, h.Format = filepath.ToSlash(rel), "", "", tar.FormatPAX
		h.AccessTime, h.ChangeTime = time.Time{}, time.Time{}
		if fi.IsDir() {
			h.Name += "/"
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			if first, ok := seen[st.Ino]; ok {
				h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
			} else {
				seen[st.Ino] = h.Name
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg && h.Size > 0 {
			src, err := os.Open(path)
			if err != nil {
				return err
			}
			defer src.Close()
			if _, err := io.CopyN(tw, src, h.Size); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("tar of %s: %v", dir, err)
	}
	return p
}

// WheelFile is one entry of a wheel (Wheel): its name as stored (hostile ones included), its
// content, and whether it is a symbolic link.
type WheelFile struct {
	Name    string
	Body    string
	Symlink bool
}

// Wheel writes the wheel file (a zip: the files, then NAME-VERSION.dist-info/{METADATA,WHEEL,
// RECORD}) into dir as file, e.g. "thepkg-1.0-py3-none-any.whl", and returns its path. Files
// named in files are written before the dist-info. No pip: a wheel is a zip with a dist-info.
func Wheel(t testing.TB, dir, file, name, version string, files ...WheelFile) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	info := name + "-" + version + ".dist-info/"
	files = append(files,
		WheelFile{Name: info + "METADATA", Body: "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\nSummary: a test package\n\nLong description.\nName: not-this\n"},
		WheelFile{Name: info + "WHEEL", Body: "Wheel-Version: 1.0\nGenerator: imagetest\nRoot-Is-Purelib: true\nTag: py3-none-any\n"},
		WheelFile{Name: info + "RECORD", Body: ""})
	for _, f := range files {
		h := &zip.FileHeader{Name: f.Name, Method: zip.Deflate, Modified: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
		h.SetMode(0o644)
		if f.Symlink {
			h.SetMode(fs.ModeSymlink | 0o777)
		}
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, f.Body); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, file)
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
