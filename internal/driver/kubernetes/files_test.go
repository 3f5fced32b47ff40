package kubernetes

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

func put(t *testing.T, d *Driver, id, mount, rel, content string) {
	t.Helper()
	if _, _, err := d.WriteFile(context.Background(), id, mount, rel, strings.NewReader(content), 1<<20); err != nil {
		t.Fatalf("write %s/%s: %v", mount, rel, err)
	}
}

// get reads rel of mount through the files sidecar.
func get(d *Driver, id, mount, rel string) (string, error) {
	f, _, err := d.OpenFile(context.Background(), id, mount, rel)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	return string(b), err
}

// TestFiles: the files API's driver side (driver.Filer) against a real pod. What the host writes
// a run reads, what a run writes the host reads; read_only paths are the host's to write, never
// the sandbox's; links the sandbox plants that lead out of their path (to the agent's secret, to
// "/", to another path) are not followed by reads or writes, links that stay inside are; a write
// larger than the disk fails with ENOSPC and leaves nothing; one over the limit leaves nothing.
func TestFiles(t *testing.T) {
	d := shared(t)
	spec := testSpec()
	spec.Mounts = []driver.Mount{{Path: "/workspace/data", ReadOnly: true}, {Path: "/workspace/out"}}
	id := sandbox(t, d, spec)
	ctx := context.Background()
	put(t, d, id, "/workspace/data", "in/input.txt", "input")
	put(t, d, id, "/workspace/out", "given.txt", "given")
	got := probe(t, d, id, `
attempt("ro read", lambda: read("/workspace/data/in/input.txt"))
attempt("rw read", lambda: read("/workspace/out/given.txt"))
attempt("ro overwrite", lambda: write("/workspace/data/in/input.txt", "changed"))
attempt("ro new", lambda: write("/workspace/data/new.txt"))
attempt("ro unlink", lambda: os.unlink("/workspace/data/in/input.txt"))
attempt("rw write", lambda: write("/workspace/out/result.txt", "from the run"))
attempt("tmp write", lambda: write("/tmp/t.txt"))
for name, target in {"abs-secret": "/.sandbox/secret/secret", "root": "/", "rel-secret": "../../../../../../.sandbox/secret/secret",
                     "to-ro": "/workspace/data/in/input.txt", "rel-ro": "../data/in/input.txt", "etc": "/etc", "tmp": "/tmp"}.items():
    attempt("link " + name, lambda: os.symlink(target, "/workspace/out/" + name))
attempt("mkdir sub", lambda: os.mkdir("/workspace/out/sub"))
attempt("link up", lambda: os.symlink("..", "/workspace/out/sub/up"))
`)
	for k, w := range map[string]string{"ro read": "ok input", "rw read": "ok given", "ro overwrite": "EROFS", "ro new": "EROFS",
		"ro unlink": "EROFS", "rw write": "ok", "tmp write": "ok", "link up": "ok", "link abs-secret": "ok", "link root": "ok"} {
		if got[k] != w {
			t.Errorf("in the sandbox: %s: %s, want %s", k, got[k], w)
		}
	}
	if s, err := get(d, id, "/workspace/out", "result.txt"); err != nil || s != "from the run" {
		t.Errorf("what the run wrote: %q, %v", s, err)
	}
	if s, err := get(d, id, "/workspace/data", "in/input.txt"); err != nil || s != "input" {
		t.Errorf("the read_only file after the run: %q, %v", s, err)
	}
	if s, err := get(d, id, "/workspace/out", "sub/up/given.txt"); err != nil || s != "given" {
		t.Errorf("through a link that stays inside: %q, %v", s, err)
	}
	for _, rel := range []string{"abs-secret", "rel-secret", "root/etc/passwd", "root/.sandbox/secret/secret", "to-ro", "rel-ro", "etc/passwd", "tmp/t.txt"} {
		if s, err := get(d, id, "/workspace/out", rel); !errors.Is(err, hostfs.ErrEscapes) {
			t.Errorf("read %s: %q, %v; want ErrEscapes", rel, s, err)
		}
	}
	for _, rel := range []string{"root/tmp/x", "etc/x", "tmp/x", "rel-ro/x"} {
		if _, _, err := d.WriteFile(ctx, id, "/workspace/out", rel, strings.NewReader("x"), 10); err == nil {
			t.Errorf("write %s: it succeeded through a link out", rel)
		}
	}
	// A write at a link's own name replaces the link, never its target.
	if _, _, err := d.WriteFile(ctx, id, "/workspace/out", "to-ro", strings.NewReader("replaced"), 10); err != nil {
		t.Errorf("write at a link's name: %v", err)
	}
	if s, err := get(d, id, "/workspace/data", "in/input.txt"); err != nil || s != "input" {
		t.Errorf("the link's target after a write at its name: %q, %v", s, err)
	}
	// Listing: links are links.
	f, info, err := d.OpenFile(ctx, id, "/workspace/out", "")
	if err != nil {
		t.Fatal(err)
	}
	ents, err := f.ReadDir()
	f.Close()
	types := map[string]string{}
	for _, e := range ents {
		types[e.Name] = e.Type
	}
	if err != nil || info.Type != "dir" || types["root"] != "symlink" || types["given.txt"] != "file" || types["sub"] != "dir" || types["to-ro"] != "file" {
		t.Errorf("listing %+v: %v %v", info, types, err)
	}
	// Remove a link: the link goes, not what it points to.
	if err := d.RemoveFile(ctx, id, "/workspace/out", "rel-ro"); err != nil {
		t.Error(err)
	}
	if err := d.RemoveFile(ctx, id, "/workspace/out", "sub"); !errors.Is(err, hostfs.ErrNotEmpty) {
		t.Errorf("remove a full directory: %v", err)
	}
	if _, err := get(d, id, "/workspace/out", "nothing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing file: %v", err)
	}

	// Too large, disk full: refused, nothing left.
	used, err := d.DiskUsage(ctx, id)
	if err != nil || used <= 0 {
		t.Fatalf("disk usage %d, %v", used, err)
	}
	if _, _, err := d.WriteFile(ctx, id, "/workspace/out", "big", bytes.NewReader(make([]byte, 2000)), 1000); !errors.Is(err, hostfs.ErrTooLarge) {
		t.Errorf("over the limit: %v", err)
	}
	if _, _, err := d.WriteFile(ctx, id, "/workspace/out", "big", io.LimitReader(zeros{}, spec.DiskBytes+(16<<20)), 1<<30); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("larger than the disk: %v, want ENOSPC", err)
	}
	if _, err := get(d, id, "/workspace/out", "big"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused write left %v", err)
	}
	if after, err := d.DiskUsage(ctx, id); err != nil || after > used+(1<<20) {
		t.Errorf("disk usage %d before the refused writes, %d (%v) after: they left something", used, after, err)
	}
	// A large file round trip (half the disk): its content, its sum, ranges; timed.
	content := bytes.Repeat([]byte("0123456789abcdef"), 2<<20) // 32 MiB: many reads
	start := time.Now()
	size, sum, err := d.WriteFile(ctx, id, "/workspace/out", "large", bytes.NewReader(content), 1<<30)
	if err != nil || size != int64(len(content)) {
		t.Fatalf("write 32 MiB: %d %v", size, err)
	}
	wrote := time.Since(start)
	start = time.Now()
	rf, _, err := d.OpenFile(ctx, id, "/workspace/out", "large")
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	if s, err := rf.SHA256(); err != nil || s != sum {
		t.Errorf("sha256 %s %v, want %s", s, err, sum)
	}
	summed := time.Since(start)
	start = time.Now()
	if b, err := io.ReadAll(rf); err != nil || !bytes.Equal(b, content) {
		t.Errorf("read back %d bytes, %v", len(b), err)
	}
	t.Logf("32 MiB through the files sidecar: write %v, open+sha256 %v, read %v", wrote, summed, time.Since(start))
	rf.Seek(int64(len(content))-20, io.SeekStart)
	tail := make([]byte, 20)
	if _, err := io.ReadFull(rf, tail); err != nil || !bytes.Equal(tail, content[len(content)-20:]) {
		t.Errorf("a range at the end: %q %v", tail, err)
	}
	rf.Seek(5, io.SeekStart)
	if _, err := io.ReadFull(rf, tail); err != nil || !bytes.Equal(tail, content[5:25]) {
		t.Errorf("a range back at the start: %q %v", tail, err)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestFilesRace: a run swaps a directory of its read_write path for a link to the agent's secret
// directory as fast as it can while the host reads and writes through that name: no read returns
// the secret, no write lands outside.
func TestFilesRace(t *testing.T) {
	d := shared(t)
	spec := testSpec()
	spec.Mounts = []driver.Mount{{Path: "/workspace/out"}}
	id := sandbox(t, d, spec)
	ctx := context.Background()
	b, err := d.lookup(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var res driver.ExecResult
	var runErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		res, runErr = d.Exec(ctx, id, driver.ExecRequest{Timeout: 5 * time.Minute, MaxOutput: 1 << 20, Code: `
import os, shutil
base = "/workspace/out"
def rm(p):
    try:
        if os.path.islink(p) or not os.path.isdir(p):
            os.unlink(p)
        else:
            shutil.rmtree(p)
    except OSError:
        pass
n = 0
while not os.path.exists(base + "/stop"):
    try:
        os.mkdir(base + "/race.d")
        with open(base + "/race.d/secret", "w") as f:
            f.write("inside")
        os.rename(base + "/race.d", base + "/race")
    except OSError:
        pass
    rm(base + "/race")
    rm(base + "/race.d")
    try:
        os.symlink("/.sandbox/secret", base + "/race")
    except OSError:
        pass
    rm(base + "/race")
    n += 1
result = n
`})
	}()
	reads := map[string]int{}
	for i := 0; i < 300; i++ {
		s, err := get(d, id, "/workspace/out", "race/secret")
		switch {
		case err == nil && s == string(b.secret):
			t.Fatalf("read %d returned the agent's secret", i)
		case err == nil:
			reads["ok "+s]++
		default:
			reads[errKind(err)]++
		}
		if _, _, err := d.WriteFile(ctx, id, "/workspace/out", "race/secret", strings.NewReader("host"), 10); err != nil {
			reads["write "+errKind(err)]++
		} else {
			reads["write ok"]++
		}
	}
	put(t, d, id, "/workspace/out", "stop", "")
	wg.Wait()
	if runErr != nil || res.Status != driver.StatusCompleted {
		t.Fatalf("the racing run: %v %s %s", runErr, res.Status, res.Stderr)
	}
	t.Logf("the run swapped %s times; the host's reads and writes: %v", res.Result, reads)
	if out := drivertest.MustExec(t, d, id, "print(open('/.sandbox/secret/secret').read().strip() == "+fmt.Sprintf("%q", b.secret)+")"); out != "True\n" {
		t.Errorf("the secret after the race: %q", out)
	}
}

func errKind(err error) string {
	for _, k := range []error{hostfs.ErrEscapes, fs.ErrNotExist, hostfs.ErrNotDir, hostfs.ErrIsDir, hostfs.ErrNotRegular} {
		if errors.Is(err, k) {
			return k.Error()
		}
	}
	return "other: " + err.Error()
}

// TestContexts: code contexts in a pod, each request over a connection of its own: state across
// runs, a timeout that interrupts the code and keeps the state, a leftover child killed while the
// interpreter lives, os._exit resets it (ContextLost, then ContextRestarted), delete.
func TestContexts(t *testing.T) {
	d := shared(t)
	spec := testSpec()
	spec.AllowSpawn = true
	id := sandbox(t, d, spec)
	ctx := context.Background()
	if err := d.CreateContext(ctx, id, "ctx_a"); err != nil {
		t.Fatal(err)
	}
	drivertest.ContextSteps(t, d, id, "ctx_a")
	// A second context is separate; a run without a context sees neither.
	if err := d.CreateContext(ctx, id, "ctx_b"); err != nil {
		t.Fatal(err)
	}
	res, err := d.Exec(ctx, id, driver.ExecRequest{Code: "result = 'x' in globals()", Timeout: 30 * time.Second, MaxOutput: 1 << 20, Context: "ctx_b"})
	if err != nil || string(res.Result) != "false" {
		t.Errorf("another context: %s %v", res.Result, err)
	}
	for i := 0; i < 2; i++ {
		for _, name := range []string{"ctx_a", "ctx_b"} {
			if err := d.DeleteContext(ctx, id, name); err != nil {
				t.Fatalf("delete %s %d: %v", name, i, err)
			}
		}
	}
	res, err = d.Exec(ctx, id, driver.ExecRequest{Code: "import os\nresult = len([p for p in os.listdir('/proc') if p.isdigit()])", Timeout: 30 * time.Second, MaxOutput: 1 << 20})
	if err != nil || string(res.Result) != "2" { // the agent and this run
		t.Errorf("processes after the contexts' delete: %s %v (stderr %q)", res.Result, err, res.Stderr)
	}
	if err := d.CreateContext(ctx, "t-nosuchsandbox", "c"); !errors.Is(err, driver.ErrNotFound) {
		t.Errorf("a context in no sandbox: %v", err)
	}
}
