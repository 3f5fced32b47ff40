package imagestore

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "images"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSources imports one image from each kind of source and checks what the store recorded and
// unpacked.
func TestSources(t *testing.T) {
	img := imagetest.Image(t, imagetest.Python(t,
		imagetest.Entry{Name: "usr/bin/su", Body: "x", Mode: 0o4755, UID: 0},
		imagetest.Entry{Name: "home/", Typ: tar.TypeDir},
		imagetest.Entry{Name: "home/app/", Typ: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000},
		imagetest.Entry{Name: "home/app/data", Body: "hello", UID: 1000, GID: 1000,
			PAX: map[string]string{"SCHILY.xattr.user.origin": "test", "SCHILY.xattr.security.capability": "x", "SCHILY.xattr.trusted.overlay.opaque": "y"}},
		imagetest.Entry{Name: "home/app/data-link", Typ: tar.TypeLink, Link: "home/app/data"},
	))
	want := imagetest.Digest(t, img)
	ctx := context.Background()
	saved := filepath.Join(t.TempDir(), "image.tar")
	if err := tarball.WriteToFile(saved, name.MustParseReference("example.com/app:1"), img); err != nil {
		t.Fatal(err)
	}
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer reg.Close()
	u, _ := url.Parse(reg.URL)
	ref := u.Host + "/team/app:1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		add  func(*Store) (Image, error)
	}{
		{"oci layout", func(s *Store) (Image, error) {
			return s.Import(ctx, imagetest.WriteLayout(t, img), "team/app:1", Options{Runtime: "runsc"})
		}},
		{"oci layout, a nested index of two platforms", func(s *Store) (Image, error) {
			other := imagetest.Image(t, imagetest.Python(t, imagetest.Entry{Name: "other", Body: "arm"}))
			idx := mutate.AppendManifests(empty.Index,
				mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "riscv64"}}},
				mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}})
			dir := filepath.Join(t.TempDir(), "layout")
			p, err := layout.Write(dir, empty.Index)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.AppendIndex(idx); err != nil {
				t.Fatal(err)
			}
			return s.Import(ctx, dir, "team/app:1", Options{Runtime: "runsc"})
		}},
		{"docker save", func(s *Store) (Image, error) { return s.Import(ctx, saved, "team/app:1", Options{Runtime: "runsc"}) }},
		{"registry", func(s *Store) (Image, error) { return s.Pull(ctx, ref, "team/app:1", Options{Runtime: "runsc"}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			im, err := tc.add(s)
			if err != nil {
				t.Fatal(err)
			}
			if im.Digest != want || im.Python != "3.11" || im.Mode != "container" || im.Runtime != "runsc" || im.Name != "team/app:1" {
				t.Fatalf("image %+v, want digest %s, python 3.11, container, runsc", im, want)
			}
			if got, err := s.Get("team/app:1"); err != nil || got.Digest != want {
				t.Fatalf("Get: %+v, %v", got, err)
			}
			root := s.RootFS(im.Digest)
			checkFile(t, root, "usr/bin/su", 0o4755, 0, "x")
			checkFile(t, root, "home/app/data", 0o644, 1000, "hello")
			if st := lstat(t, filepath.Join(root, "home/app")); st.Mode&0o7777 != 0o750 || st.Uid != 1000 {
				t.Errorf("home/app: mode %o uid %d, want 0750 and 1000", st.Mode&0o7777, st.Uid)
			}
			if a, b := lstat(t, filepath.Join(root, "home/app/data")), lstat(t, filepath.Join(root, "home/app/data-link")); a.Ino != b.Ino {
				t.Errorf("the hard link is not one: inodes %d, %d", a.Ino, b.Ino)
			}
			if l, err := os.Readlink(filepath.Join(root, "usr/bin/python3")); err != nil || l != "python3.11" {
				t.Errorf("usr/bin/python3 -> %q, %v", l, err)
			}
			if st := lstat(t, filepath.Join(root, "etc/passwd")); time.Unix(st.Mtim.Unix()).UTC() != imagetest.MTime {
				t.Errorf("etc/passwd mtime %v, want %v", time.Unix(st.Mtim.Unix()).UTC(), imagetest.MTime)
			}
			checkXattrs(t, filepath.Join(root, "home/app/data"))
			if ents, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp")); len(ents) != 0 {
				t.Errorf("tmp/ keeps %d entries", len(ents))
			}
		})
	}
}

func lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func checkFile(t *testing.T, root, rel string, mode uint32, uid int, body string) {
	t.Helper()
	p := filepath.Join(root, rel)
	b, err := os.ReadFile(p)
	if err != nil || string(b) != body {
		t.Errorf("%s: %q, %v; want %q", rel, b, err, body)
		return
	}
	st := lstat(t, p)
	if st.Mode&0o7777 != mode {
		t.Errorf("%s: mode %o, want %o", rel, st.Mode&0o7777, mode)
	}
	if os.Geteuid() == 0 && int(st.Uid) != uid {
		t.Errorf("%s: uid %d, want %d", rel, st.Uid, uid)
	}
}

func checkXattrs(t *testing.T, p string) {
	t.Helper()
	buf := make([]byte, 1024)
	n, err := unix.Lgetxattr(p, "user.origin", buf)
	if errors.Is(err, unix.ENOTSUP) {
		t.Logf("no user xattrs on this file system: not checked")
		return
	}
	if err != nil || string(buf[:n]) != "test" {
		t.Errorf("user.origin: %q, %v; want it kept", buf[:max(n, 0)], err)
	}
	for _, a := range []string{"security.capability", "trusted.overlay.opaque"} {
		if _, err := unix.Lgetxattr(p, a, buf); err == nil {
			t.Errorf("%s was kept; only user.* may be", a)
		}
	}
}

// TestRefused: what must not become an approved image.
func TestRefused(t *testing.T) {
	ctx := context.Background()
	good := imagetest.Image(t, imagetest.Python(t))
	for _, tc := range []struct {
		name   string
		src    func(t *testing.T) string
		want   error
		inText string
	}{
		{"no python3", func(t *testing.T) string {
			return imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Layer(t, imagetest.Entry{Name: "usr/bin/python2", Body: "x", Mode: 0o755})))
		}, ErrNoPython, "/usr/local/bin/python3 and /usr/bin/python3"},
		{"python3 links outside the image", func(t *testing.T) string {
			return imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Layer(t, imagetest.Entry{Name: "usr/bin/python3", Typ: tar.TypeSymlink, Link: "../../../../../usr/bin/python3"})))
		}, ErrNoPython, "python3"},
		{"tampered layer: other gzip bytes", func(t *testing.T) string {
			dir := imagetest.WriteLayout(t, good)
			other, _ := imagetest.Layer(t, imagetest.Entry{Name: "usr/bin/python3", Body: "evil", Mode: 0o755}).Compressed()
			b, _ := io.ReadAll(other)
			replaceLayerBlob(t, dir, good, func([]byte) []byte { return b })
			return dir
		}, ErrDigest, "hash to"},
		{"tampered layer: a flipped byte", func(t *testing.T) string {
			dir := imagetest.WriteLayout(t, good)
			replaceLayerBlob(t, dir, good, func(b []byte) []byte { b[len(b)/2] ^= 0xff; return b })
			return dir
		}, ErrDigest, "layer 0"},
		{"tampered config", func(t *testing.T) string {
			dir := imagetest.WriteLayout(t, good)
			cn, _ := good.ConfigName()
			p := filepath.Join(dir, "blobs", "sha256", cn.Hex)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, bytes.Replace(b, []byte(`"linux"`), []byte(`"linux" `), 1), 0o644)
			return dir
		}, ErrDigest, "config hashes to"},
		{"not a layout", func(t *testing.T) string { return t.TempDir() }, ErrInvalid, "OCI image layout"},
		{"not an archive", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "x.tar")
			os.WriteFile(p, []byte("hello"), 0o644)
			return p
		}, ErrInvalid, "docker save"},
		{"another platform", func(t *testing.T) string {
			cf, _ := good.ConfigFile()
			cf = cf.DeepCopy()
			cf.Architecture = "s390x"
			img, _ := mutate.ConfigFile(good, cf)
			return imagetest.WriteLayout(t, img)
		}, ErrInvalid, "s390x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			_, err := s.Import(ctx, tc.src(t), "app", Options{})
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.inText) {
				t.Fatalf("Import: %v; want %v saying %q", err, tc.want, tc.inText)
			}
			assertNothingLeft(t, s)
		})
	}
	t.Run("bad name and runtime", func(t *testing.T) {
		s := newStore(t)
		dir := imagetest.WriteLayout(t, good)
		if _, err := s.Import(ctx, dir, "../x", Options{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("name ../x: %v", err)
		}
		if _, err := s.Import(ctx, dir, "app", Options{Runtime: "kata"}); !errors.Is(err, ErrInvalid) {
			t.Errorf("runtime kata: %v", err)
		}
	})
	t.Run("limits", func(t *testing.T) {
		s := newStore(t)
		dir := imagetest.WriteLayout(t, good)
		if _, err := s.Import(ctx, dir, "app", Options{MaxBytes: 10}); !errors.Is(err, ErrTooLarge) {
			t.Errorf("MaxBytes 10: %v", err)
		}
		if _, err := s.Import(ctx, dir, "app", Options{MaxEntries: 3}); !errors.Is(err, ErrTooLarge) {
			t.Errorf("MaxEntries 3: %v", err)
		}
	})
}

// assertNothingLeft fails unless s names no image and holds no root nor temporary directory
// (after a refused import).
func assertNothingLeft(t *testing.T, s *Store) {
	t.Helper()
	if ims, _ := s.List(); len(ims) != 0 {
		t.Errorf("the refused image is listed: %+v", ims)
	}
	ents, _ := os.ReadDir(filepath.Join(s.Dir(), "rootfs"))
	tmp, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp"))
	if len(ents)+len(tmp) != 0 {
		t.Errorf("left behind: rootfs %v, tmp %v", ents, tmp)
	}
}

// replaceLayerBlob rewrites the (only) layer's blob of img in layout dir.
func replaceLayerBlob(t *testing.T, dir string, img v1.Image, f func([]byte) []byte) {
	t.Helper()
	ls, _ := img.Layers()
	d, _ := ls[0].Digest()
	p := filepath.Join(dir, "blobs", "sha256", d.Hex)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, f(b), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestHostileEntries unpacks archives that try to write outside the root, directly (unpack) and
// through the whole import (mutate.Extract first).
func TestHostileEntries(t *testing.T) {
	var hostPasswd unix.Stat_t
	if err := unix.Stat("/etc/passwd", &hostPasswd); err != nil {
		t.Fatal(err)
	}
	outside := t.TempDir() // the root's parent: nothing but the root may appear in it
	marker := "sandboxd-hostile-" + filepath.Base(outside)
	ents := []imagetest.Entry{
		{Name: "etc/", Typ: tar.TypeDir},
		{Name: "../" + marker, Body: "x"},
		{Name: "../../../../../../../tmp/" + marker, Body: "x"},
		{Name: "/abs-" + marker, Body: "inside"}, // an absolute name is a name in the root
		{Name: "toroot", Typ: tar.TypeSymlink, Link: "/"},
		{Name: "toroot/tmp/" + marker, Body: "through an absolute symlink"},
		{Name: "toetc", Typ: tar.TypeSymlink, Link: "/etc"},
		{Name: "toetc/" + marker, Body: "through a symlink to /etc"},
		{Name: "up", Typ: tar.TypeSymlink, Link: "../../../../../.."},
		{Name: "up/tmp/" + marker, Body: "through a relative symlink out"},
		{Name: "hostpasswd", Typ: tar.TypeLink, Link: "/etc/passwd"},
		{Name: "hostpasswd2", Typ: tar.TypeLink, Link: "../../../../etc/passwd"},
		{Name: "toetc/passwd", Typ: tar.TypeLink, Link: "toetc/hostpasswd"},
		{Name: "dev/", Typ: tar.TypeDir},
		{Name: "dev/sda", Typ: tar.TypeBlock},
		{Name: "dev/null", Typ: tar.TypeChar},
		{Name: "fifo", Typ: tar.TypeFifo},
		{Name: "file", Body: "a file"},
		{Name: "file/below", Body: "under a file"},
	}
	check := func(t *testing.T, root string) {
		t.Helper()
		if got, _ := os.ReadDir(outside); len(got) != 1 {
			t.Errorf("outside the root: %v", got)
		}
		for _, p := range []string{"/tmp/" + marker, "/etc/" + marker, "/" + marker, "/abs-" + marker} {
			if _, err := os.Lstat(p); err == nil {
				os.Remove(p)
				t.Errorf("%s was written on the host", p)
			}
		}
		for _, rel := range []string{"hostpasswd", "hostpasswd2"} {
			var st unix.Stat_t
			if unix.Lstat(filepath.Join(root, rel), &st) == nil && st.Ino == hostPasswd.Ino && st.Dev == hostPasswd.Dev {
				t.Errorf("%s is a hard link to the host's /etc/passwd", rel)
			}
		}
		for _, rel := range []string{"dev/sda", "dev/null", "fifo", "file/below"} {
			if _, err := os.Lstat(filepath.Join(root, rel)); err == nil {
				t.Errorf("%s was made", rel)
			}
		}
	}
	t.Run("unpack", func(t *testing.T) {
		root := filepath.Join(outside, "root")
		os.Mkdir(root, 0o755)
		defer os.RemoveAll(root)
		st, err := unpack(context.Background(), bytes.NewReader(imagetest.Tar(t, ents...)), root, limits{maxBytes: 1 << 20, maxEntries: 100})
		if err != nil {
			t.Fatal(err)
		}
		check(t, root)
		// What stays inside: written under the root, through links resolved in it.
		for rel, body := range map[string]string{
			"abs-" + marker: "inside", "tmp/" + marker: "through an absolute symlink", "etc/" + marker: "through a symlink to /etc",
		} {
			if b, err := os.ReadFile(filepath.Join(root, rel)); err != nil || string(b) != body {
				t.Errorf("%s: %q, %v; want %q", rel, b, err, body)
			}
		}
		if st.skipped < 6 {
			t.Errorf("skipped %d entries, want at least 6 (.., 2 hard links out, devices, fifo, under a file)", st.skipped)
		}
	})
	t.Run("import", func(t *testing.T) {
		// The same entries but the ".." names (mutate.Extract refuses an archive with them),
		// above a layer with python3.
		var safe []imagetest.Entry
		for _, e := range ents {
			if !strings.HasPrefix(e.Name, "..") {
				safe = append(safe, e)
			}
		}
		s, err := Open(filepath.Join(outside, "root"))
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(s.Dir())
		im, err := s.Import(context.Background(), imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t), imagetest.Layer(t, safe...))), "hostile", Options{})
		if err != nil {
			t.Fatal(err)
		}
		check(t, s.RootFS(im.Digest))
		// The upper layer's symlink /etc replaced the lower layer's directory: python3 stays.
		if im.Python != "3.11" {
			t.Errorf("python %q", im.Python)
		}
		_, err = s.Import(context.Background(), imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t), imagetest.Layer(t, imagetest.Entry{Name: "../x", Body: "x"}))), "dotdot", Options{})
		if err == nil || !strings.Contains(err.Error(), "unsafe tar path") {
			t.Errorf("an archive with ../x: %v", err)
		}
	})
}

// TestWhiteouts: a lower layer's directory removed by a whiteout and another emptied by an
// opaque marker.
func TestWhiteouts(t *testing.T) {
	lower := imagetest.Python(t,
		imagetest.Entry{Name: "gone/", Typ: tar.TypeDir}, imagetest.Entry{Name: "gone/a", Body: "a"},
		imagetest.Entry{Name: "opaque/", Typ: tar.TypeDir}, imagetest.Entry{Name: "opaque/old", Body: "old"},
		imagetest.Entry{Name: "kept", Body: "kept"}, imagetest.Entry{Name: "file-gone", Body: "x"})
	upper := imagetest.Layer(t,
		imagetest.Entry{Name: ".wh.gone", Body: ""}, imagetest.Entry{Name: ".wh.file-gone", Body: ""},
		imagetest.Entry{Name: "opaque/", Typ: tar.TypeDir}, imagetest.Entry{Name: "opaque/.wh..wh..opq", Body: ""}, imagetest.Entry{Name: "opaque/new", Body: "new"})
	s := newStore(t)
	im, err := s.Import(context.Background(), imagetest.WriteLayout(t, imagetest.Image(t, lower, upper)), "wh", Options{})
	if err != nil {
		t.Fatal(err)
	}
	root := s.RootFS(im.Digest)
	for rel, exists := range map[string]bool{"gone": false, "gone/a": false, "file-gone": false, "opaque/old": false, "opaque/new": true, "kept": true, ".wh.gone": false, "opaque/.wh..wh..opq": false} {
		if _, err := os.Lstat(filepath.Join(root, rel)); (err == nil) != exists {
			t.Errorf("%s: exists %v, want %v", rel, err == nil, exists)
		}
	}
}

// TestOncePerDigest: a second name for the same image reuses its root; rm keeps a root another
// name or a live sandbox uses and deletes it after.
func TestOncePerDigest(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	dir := imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t)))
	a, err := s.Import(ctx, dir, "a", Options{})
	if err != nil {
		t.Fatal(err)
	}
	root := s.RootFS(a.Digest)
	marker := filepath.Join(root, "marker") // would not survive a second unpack
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := s.Import(ctx, dir, "b", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if b.Digest != a.Digest || b.Size != a.Size || b.Python != a.Python {
		t.Fatalf("second import %+v, first %+v", b, a)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("the root was unpacked again: %v", err)
	}
	ims, err := s.List()
	if err != nil || len(ims) != 2 || ims[0].Name != "a" || ims[1].Name != "b" {
		t.Fatalf("List: %+v, %v", ims, err)
	}
	live := map[string]bool{a.Digest: true}
	inUse := func(d string) (bool, error) { return live[d], nil }
	if err := s.Remove(ctx, "a", inUse); !errors.Is(err, ErrInUse) {
		t.Fatalf("rm while a sandbox runs it: %v", err)
	}
	if _, err := s.Get("a"); err != nil {
		t.Fatalf("a refused rm removed the Name: %v", err)
	}
	live[a.Digest] = false
	if err := s.Remove(ctx, "a", inUse); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(root); err != nil {
		t.Fatalf("the root b uses was deleted: %v", err)
	}
	if err := s.Remove(ctx, "a", inUse); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rm of a missing Name: %v", err)
	}
	if err := s.Remove(ctx, "b", inUse); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(root); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the root no name uses is still there: %v", err)
	}
	if tmp, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp")); len(tmp) != 0 {
		t.Errorf("tmp/ keeps %v", tmp)
	}
}

// TestImagesRereads: Images sees a change made by another Store (another process) on the same
// directory.
func TestImagesRereads(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	other, _ := Open(s.Dir())
	if ims, err := s.Images(); err != nil || len(ims) != 0 {
		t.Fatalf("Images: %v, %v", ims, err)
	}
	if _, err := other.Import(ctx, imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t))), "x", Options{}); err != nil {
		t.Fatal(err)
	}
	if ims, err := s.Images(); err != nil || len(ims) != 1 || ims[0].Name != "x" {
		t.Fatalf("Images after an import elsewhere: %v, %v", ims, err)
	}
	if err := other.Remove(ctx, "x", nil); err != nil {
		t.Fatal(err)
	}
	if ims, err := s.Images(); err != nil || len(ims) != 0 {
		t.Fatalf("Images after an rm elsewhere: %v, %v", ims, err)
	}
}

func TestMain(m *testing.M) {
	syscall.Umask(0o022)
	os.Exit(m.Run())
}
