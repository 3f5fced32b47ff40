package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// filesClient returns a client of a files server on a volume of its own (root/rw, root/other),
// over in-memory connections (the TCP admission is the agent's, tested with it).
func filesClient(t *testing.T) (agent.FilesClient, string) {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"rw", "other"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s := &filesServer{root: root, log: slog.New(slog.DiscardHandler)}
	return agent.FilesClient{Dial: func(ctx context.Context) (net.Conn, error) {
		c, srv := net.Pipe()
		go func() {
			defer srv.Close()
			s.handle(srv, bufio.NewReader(srv))
		}()
		return c, nil
	}}, root
}

// TestFilesServer: the sidecar's operations and its confinement to each directory.
func TestFilesServer(t *testing.T) {
	c, root := filesClient(t)
	ctx := context.Background()
	secret := filepath.Join(root, "secret")
	os.WriteFile(secret, []byte("secret"), 0o600)
	os.WriteFile(filepath.Join(root, "other", "o.txt"), []byte("other"), 0o644)
	for name, target := range map[string]string{"abs": secret, "rel": "../secret", "other": "../other/o.txt", "dir": "/", "in": "sub/f.txt"} {
		if err := os.Symlink(target, filepath.Join(root, "rw", name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unixMkfifo(filepath.Join(root, "rw", "fifo")); err != nil {
		t.Fatal(err)
	}

	size, sum, err := c.Write(ctx, "rw", "sub/f.txt", strings.NewReader("hello"), 5)
	if err != nil || size != 5 || sum != "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" {
		t.Fatalf("write: %d %s %v", size, sum, err)
	}
	f, err := c.Open(ctx, "rw", "in")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(f)
	if s, serr := f.SHA256(); err != nil || string(b) != "hello" || serr != nil || s != sum || f.Info.Type != "file" {
		t.Errorf("read through a link inside: %q %v, sum %s %v", b, err, s, serr)
	}
	f.Close()
	d, err := c.Open(ctx, "rw", "")
	if err != nil || d.Info.Type != "dir" {
		t.Fatalf("open the dir: %v", err)
	}
	names := []string{}
	for _, e := range d.Entries {
		names = append(names, e.Name+":"+e.Type)
	}
	d.Close()
	slices.Sort(names)
	if strings.Join(names, " ") != "abs:symlink dir:symlink fifo:other in:symlink other:symlink rel:symlink sub:dir" {
		t.Errorf("listing %v", names)
	}

	for _, c2 := range []struct {
		name string
		err  error
		want error
	}{
		{"read abs link", openErr(c, "rw", "abs"), hostfs.ErrEscapes},
		{"read rel link", openErr(c, "rw", "rel"), hostfs.ErrEscapes},
		{"read into another dir", openErr(c, "rw", "other"), hostfs.ErrEscapes},
		{"read through /", openErr(c, "rw", "dir/etc/passwd"), hostfs.ErrEscapes},
		{"read dotdot", openErr(c, "rw", "../secret"), hostfs.ErrEscapes},
		{"read absolute", openErr(c, "rw", "/etc/passwd"), hostfs.ErrEscapes},
		{"read fifo", openErr(c, "rw", "fifo"), hostfs.ErrNotRegular},
		{"read missing", openErr(c, "rw", "none"), fs.ErrNotExist},
		{"dir dotdot", openErr(c, "..", "secret"), hostfs.ErrEscapes},
		{"dir staging", openErr(c, ".staging", ""), hostfs.ErrEscapes},
		{"dir with a slash", openErr(c, "rw/sub", "f.txt"), hostfs.ErrEscapes},
		{"write through /", writeErr(c, "rw", "dir/tmp/x", "x", 10), hostfs.ErrEscapes},
		{"write through rel", writeErr(c, "rw", "rel/x", "x", 10), hostfs.ErrEscapes},
		{"write too large", writeErr(c, "rw", "big", strings.Repeat("x", 300<<10), 100<<10), hostfs.ErrTooLarge},
		{"write a dir", writeErr(c, "rw", "sub", "x", 10), hostfs.ErrIsDir},
		{"write the root", writeErr(c, "rw", "", "x", 10), hostfs.ErrRoot},
		{"remove a full dir", c.Remove(ctx, "rw", "sub"), hostfs.ErrNotEmpty},
	} {
		if !errors.Is(c2.err, c2.want) {
			t.Errorf("%s: %v, want %v", c2.name, c2.err, c2.want)
		}
	}
	// A link's own name: written over, removed, never its target.
	if _, _, err := c.Write(ctx, "rw", "abs", strings.NewReader("new"), 10); err != nil {
		t.Errorf("write at a link's name: %v", err)
	}
	if err := c.Remove(ctx, "rw", "rel"); err != nil {
		t.Error(err)
	}
	if b, _ := os.ReadFile(secret); string(b) != "secret" {
		t.Errorf("the secret outside is %q", b)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, ".staging")); len(ents) != 0 {
		t.Errorf("staging holds %d files after refused writes", len(ents))
	}
	if _, err := os.Lstat(filepath.Join(root, "rw", "big")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a write over the limit left %v", err)
	}
	if n, err := c.Usage(ctx); err != nil || n <= 0 {
		t.Errorf("usage %d %v", n, err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Error(err)
	}
}

// TestFilesServerReads: reads of a large file in requests, seeks backwards and forwards, a body
// that fails half-way stores nothing.
func TestFilesServerReads(t *testing.T) {
	c, root := filesClient(t)
	ctx := context.Background()
	content := make([]byte, 5<<20+123)
	for i := range content {
		content[i] = byte(i * 7)
	}
	if _, _, err := c.Write(ctx, "rw", "big", bytes.NewReader(content), 10<<20); err != nil {
		t.Fatal(err)
	}
	f, err := c.Open(ctx, "rw", "big")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 100)
	io.ReadFull(f, buf)
	for _, off := range []int64{3 << 20, 17, int64(len(content)) - 50, 1 << 20} {
		f.Seek(off, io.SeekStart)
		n, err := io.ReadFull(f, buf)
		want := content[off:min(off+100, int64(len(content)))]
		if !bytes.Equal(buf[:n], want) || (err != nil && !errors.Is(err, io.ErrUnexpectedEOF)) {
			t.Errorf("at %d: %d bytes %v", off, n, err)
		}
	}
	f.Seek(0, io.SeekStart)
	all, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(all, content) {
		t.Errorf("read all: %d bytes %v", len(all), err)
	}
	// A body that fails: nothing stored.
	_, _, err = c.Write(ctx, "rw", "half", io.MultiReader(strings.NewReader("part"), failing{}), 10<<20)
	if !errors.Is(err, errBroken) {
		t.Errorf("a failing body: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(root, "rw", "half")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a failed write left %v", err)
	}
}

var errBroken = errors.New("broken body")

type failing struct{}

func (failing) Read([]byte) (int, error) { return 0, errBroken }

func openErr(c agent.FilesClient, dir, p string) error {
	f, err := c.Open(context.Background(), dir, p)
	if err == nil {
		f.Close()
	}
	return err
}

func writeErr(c agent.FilesClient, dir, p, content string, limit int64) error {
	_, _, err := c.Write(context.Background(), dir, p, strings.NewReader(content), limit)
	return err
}

func unixMkfifo(p string) error { return unix.Mkfifo(p, 0o644) }
