package hostfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tree makes a root with a file, a subdirectory, symlinks inside and out, a FIFO, and a secret
// file next to the root.
func tree(t *testing.T) (*Dir, string) {
	t.Helper()
	base := t.TempDir()
	root := filepath.Join(base, "root")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "sub"), 0o755))
	must(os.WriteFile(filepath.Join(root, "a.txt"), []byte("hello"), 0o644))
	must(os.WriteFile(filepath.Join(base, "secret"), []byte("secret"), 0o600))
	must(os.Symlink("../secret", filepath.Join(root, "rel-out")))
	must(os.Symlink(filepath.Join(base, "secret"), filepath.Join(root, "abs-out")))
	must(os.Symlink("../a.txt", filepath.Join(root, "sub", "in")))
	must(os.Symlink("..", filepath.Join(root, "sub", "up")))
	must(unix.Mkfifo(filepath.Join(root, "fifo"), 0o644))
	d, err := Open(root, filepath.Join(base, "staging"))
	must(err)
	t.Cleanup(func() { d.Close() })
	return d, base
}

func TestOpenFile(t *testing.T) {
	d, _ := tree(t)
	for _, tc := range []struct {
		rel     string
		want    string // content, or "dir"
		wantErr error
	}{
		{"a.txt", "hello", nil},
		{"sub/in", "hello", nil},       // a symlink that stays inside is followed
		{"sub/up/a.txt", "hello", nil}, // "up" is the root itself
		{"", "dir", nil},
		{"sub/", "dir", nil},
		{"../secret", "", ErrEscapes},
		{"sub/../../secret", "", ErrEscapes},
		{"/etc/passwd", "", ErrEscapes},
		{"rel-out", "", ErrEscapes},
		{"abs-out", "", ErrEscapes},
		{"sub/up/rel-out", "", ErrEscapes},
		{"fifo", "", ErrNotRegular},
		{"missing", "", os.ErrNotExist},
	} {
		t.Run(tc.rel, func(t *testing.T) {
			done := make(chan struct{})
			go func() {
				defer close(done)
				f, err := d.OpenFile(tc.rel)
				if tc.wantErr != nil {
					if !errors.Is(err, tc.wantErr) {
						t.Errorf("err %v, want %v", err, tc.wantErr)
					}
					if f != nil {
						f.Close()
					}
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				if tc.want == "dir" {
					if f.Info.Type != "dir" {
						t.Errorf("type %s", f.Info.Type)
					}
					return
				}
				b, _ := io.ReadAll(f)
				if string(b) != tc.want || f.Info.Size != int64(len(tc.want)) {
					t.Errorf("read %q (size %d)", b, f.Info.Size)
				}
			}()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("open blocked")
			}
		})
	}
}

func TestReadDirAndSHA256(t *testing.T) {
	d, _ := tree(t)
	f, err := d.OpenFile("")
	if err != nil {
		t.Fatal(err)
	}
	ents, err := f.ReadDir()
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range ents {
		got[e.Name] = e.Type
	}
	want := map[string]string{"a.txt": "file", "sub": "dir", "rel-out": "symlink", "abs-out": "symlink", "fifo": "other"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q (all: %v)", k, got[k], v, got)
		}
	}
	f, err = d.OpenFile("a.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum := sha256.Sum256([]byte("hello"))
	for range 2 { // computed, then remembered
		if s, err := f.SHA256(); err != nil || s != hex.EncodeToString(sum[:]) {
			t.Fatalf("sha256 %s %v", s, err)
		}
	}
}

func TestWrite(t *testing.T) {
	d, base := tree(t)
	root := filepath.Join(base, "root")
	data := bytes.Repeat([]byte("0123456789"), 100_000)
	size, sum, err := d.Write("new/deep/file.bin", bytes.NewReader(data), 1<<20)
	want := sha256.Sum256(data)
	if err != nil || size != int64(len(data)) || sum != hex.EncodeToString(want[:]) {
		t.Fatalf("write: %d %s %v", size, sum, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "new/deep/file.bin")); !bytes.Equal(b, data) {
		t.Fatal("content differs")
	}
	f, _ := d.OpenFile("new/deep/file.bin")
	if s, _ := f.SHA256(); s != sum {
		t.Errorf("remembered sum %s", s)
	}
	f.Close()
	for _, tc := range []struct {
		rel     string
		limit   int64
		wantErr error
	}{
		{"too-big", 10, ErrTooLarge},
		{"../escape", 100, ErrEscapes},
		{"rel-out/x", 100, ErrEscapes},
		{"abs-out", 100, nil}, // replaces the symlink itself, never the file it points to
		{"sub", 100, ErrIsDir},
		{"a.txt/x", 100, ErrNotDir},
		{"", 100, ErrRoot},
	} {
		t.Run(tc.rel, func(t *testing.T) {
			_, _, err := d.Write(tc.rel, strings.NewReader(strings.Repeat("x", 50)), tc.limit)
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("err %v, want %v", err, tc.wantErr)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(root, "too-big")); !os.IsNotExist(err) {
		t.Error("a refused upload left a file")
	}
	if b, _ := os.ReadFile(filepath.Join(base, "secret")); string(b) != "secret" {
		t.Errorf("the file outside changed: %q", b)
	}
	if ents, _ := os.ReadDir(filepath.Join(base, "staging")); len(ents) != 0 {
		t.Errorf("staging not empty: %v", ents)
	}
}

// An upload that breaks off leaves nothing, not even in the staging directory.
func TestWriteInterrupted(t *testing.T) {
	d, base := tree(t)
	r := io.MultiReader(strings.NewReader("partial"), errReader{})
	if _, _, err := d.Write("part.txt", r, 1<<20); err == nil {
		t.Fatal("no error")
	}
	if _, err := os.Stat(filepath.Join(base, "root", "part.txt")); !os.IsNotExist(err) {
		t.Error("partial file visible")
	}
	if ents, _ := os.ReadDir(filepath.Join(base, "staging")); len(ents) != 0 {
		t.Errorf("staging not empty: %v", ents)
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, io.ErrUnexpectedEOF }

func TestRemove(t *testing.T) {
	d, base := tree(t)
	for _, tc := range []struct {
		rel     string
		wantErr error
	}{
		{"sub", ErrNotEmpty},
		{"rel-out", nil}, // the link, not its target
		{"a.txt", nil},
		{"../secret", ErrEscapes},
		{"missing", os.ErrNotExist},
		{"", ErrRoot},
	} {
		if err := d.Remove(tc.rel); !errors.Is(err, tc.wantErr) {
			t.Errorf("%s: err %v, want %v", tc.rel, err, tc.wantErr)
		}
	}
	if _, err := os.Stat(filepath.Join(base, "secret")); err != nil {
		t.Error("the target outside was removed")
	}
}
