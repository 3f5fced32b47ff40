package sandbox_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
)

// TestFilesThroughFiler: for a driver that keeps its sandboxes' files (driver.Filer) the service
// makes no host directories for them, and the files API goes through the driver with the same
// rules and answers as through the host directories.
func TestFilesThroughFiler(t *testing.T) {
	filer := fakedriver.NewFiler(t.TempDir())
	e := newEnvOn(t, "free", filer)
	svc := e.svc
	id := e.create(t, &api.Config{Filesystem: &api.Filesystem{
		ReadOnly: []string{"/workspace/data"}, ReadWrite: []string{"/workspace/out"}, Blocked: []string{"/workspace/out/secret"}}})

	// No host directories.
	spec, _ := filer.Spec(id)
	if spec.TmpDir != "" || spec.WorkDir != "" || len(spec.Mounts) != 2 || spec.Mounts[0].HostDir != "" || spec.Mounts[1].HostDir != "" {
		t.Errorf("spec of a Filer driver's sandbox has host dirs: tmp %q work %q mounts %+v", spec.TmpDir, spec.WorkDir, spec.Mounts)
	}
	ents, err := os.ReadDir(filepath.Join(e.dir, "sandboxes", id))
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		if ent.Name() != "outputs" {
			t.Errorf("the sandbox's host dir holds %s (a Filer driver's sandbox needs only its outputs)", ent.Name())
		}
	}

	ctx := context.Background()
	w, err := svc.WriteFile(ctx, e.acct, id, "/workspace/out/a/b.txt", strings.NewReader("hello"))
	if err != nil {
		t.Fatal(err)
	}
	if w.Size != 5 || w.SHA256 != "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" {
		t.Errorf("written %+v", w)
	}
	// read_only paths are written by the files API (only the sandbox cannot).
	if _, err := svc.WriteFile(ctx, e.acct, id, "/workspace/data/in.csv", strings.NewReader("1,2")); err != nil {
		t.Errorf("write a read_only path: %v", err)
	}
	f, err := svc.OpenFile(ctx, e.acct, id, "/workspace/out/a/b.txt")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(f)
	sum, _ := f.SHA256()
	f.Close()
	if string(b) != "hello" || f.Info.Type != "file" || sum != w.SHA256 {
		t.Errorf("read %q %+v %s", b, f.Info, sum)
	}
	d, err := svc.OpenFile(ctx, e.acct, id, "/workspace/out/")
	if err != nil {
		t.Fatal(err)
	}
	list, err := d.List()
	d.Close()
	if err != nil || len(list.Entries) != 1 || list.Entries[0].Name != "a" || list.Entries[0].Type != "dir" {
		t.Errorf("listing %+v, %v", list, err)
	}

	// The rules: outside, blocked, escaping, too large, not found, the mount itself.
	big := strings.NewReader(strings.Repeat("x", sandbox.DefaultMaxUploadBytes+1))
	for _, c := range []struct {
		name string
		err  error
		want sandbox.Kind
	}{
		{"outside", writeErr(svc, e, id, "/etc/passwd"), sandbox.KindPathNotAllowed},
		{"blocked", writeErr(svc, e, id, "/workspace/out/secret/k"), sandbox.KindPathNotAllowed},
		{"dotdot", writeErr(svc, e, id, "/workspace/out/../data/x"), sandbox.KindPathNotAllowed},
		{"the mount", writeErr(svc, e, id, "/workspace/out"), sandbox.KindPathNotAllowed},
		{"too large", func() error { _, err := svc.WriteFile(ctx, e.acct, id, "/workspace/out/big", big); return err }(), sandbox.KindPayloadTooLarge},
		{"not found", func() error { _, err := svc.OpenFile(ctx, e.acct, id, "/workspace/out/none"); return err }(), sandbox.KindNotFound},
		{"dir not empty", svc.DeleteFile(ctx, e.acct, id, "/workspace/out/a"), sandbox.KindConflict},
	} {
		if got := sandbox.KindOf(c.err); got != c.want {
			t.Errorf("%s: %v (%s), want %s", c.name, c.err, got, c.want)
		}
	}
	if _, err := svc.OpenFile(ctx, e.acct, id, "/workspace/out/big"); sandbox.KindOf(err) != sandbox.KindNotFound {
		t.Errorf("a refused upload left something: %v", err)
	}
	// A link the sandbox planted that leads out of its mount is not followed.
	outside := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(outside, []byte("host secret"), 0o644)
	var rw string
	filepath.WalkDir(filepath.Join(filer.Root, id), func(p string, de os.DirEntry, err error) error {
		if err == nil && de.Name() == "a" {
			rw = filepath.Dir(p)
		}
		return nil
	})
	if err := os.Symlink(outside, filepath.Join(rw, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.OpenFile(ctx, e.acct, id, "/workspace/out/link"); sandbox.KindOf(err) != sandbox.KindPathNotAllowed {
		t.Errorf("read through a link out: %v", err)
	}
	if _, err := svc.WriteFile(ctx, e.acct, id, "/workspace/out/link/x", strings.NewReader("x")); sandbox.KindOf(err) != sandbox.KindPathNotAllowed {
		t.Errorf("write through a link out: %v", err)
	}

	if err := svc.DeleteFile(ctx, e.acct, id, "/workspace/out/a/b.txt"); err != nil {
		t.Fatal(err)
	}
	f.Audited(ctx, 5)
	for _, typ := range []string{"file.written", "file.read", "file.deleted"} {
		evs, _, err := e.st.ListEvents(ctx, store.EventFilter{AccountID: e.acct.ID, SandboxID: id, Type: typ})
		if err != nil || len(evs) == 0 {
			t.Errorf("no %s event: %v", typ, err)
		}
	}
	// Gone with its sandbox.
	if err := svc.Delete(ctx, e.acct, id); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.OpenFile(ctx, e.acct, id, "/workspace/data/in.csv"); sandbox.KindOf(err) != sandbox.KindSandboxDestroyed {
		t.Errorf("after delete: %v", err)
	}
}

func writeErr(svc *sandbox.Service, e *env, id, p string) error {
	_, err := svc.WriteFile(context.Background(), e.acct, id, p, strings.NewReader("x"))
	return err
}
