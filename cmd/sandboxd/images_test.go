package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/imagestore"
	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
	"github.com/sandboxd/sandboxd/internal/store"
)

// TestImagesCommands: import, ls, rm refused while a live sandbox's record names the digest and
// done once it is destroyed; bad command lines answered with the fix.
func TestImagesCommands(t *testing.T) {
	dataDir := t.TempDir()
	layoutDir := imagetest.WriteLayout(t, imagetest.Image(t, imagetest.Python(t)))
	run := imagesIn(dataDir)
	for _, tc := range []struct {
		args []string
		want string // in the error
	}{
		{[]string{"import", layoutDir}, "--name is required"},
		{[]string{"import", layoutDir, "--name", "-x"}, "invalid image: name"},
		{[]string{"import", layoutDir, "--name", "x", "--runtime", "kata"}, "want one of crun, runc, runsc"},
		{[]string{"import", filepath.Join(dataDir, "missing.tar"), "--name", "x"}, "no such file"},
		{[]string{"rm", "nothing"}, "sandboxd images ls lists them"},
		{[]string{"frob"}, "unknown subcommand"},
		{[]string{"ls", "extra"}, "want 0 argument(s)"},
	} {
		if _, err := run(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("images %v: %v; want an error saying %q", tc.args, err, tc.want)
		}
	}
	out, err := run("import", layoutDir, "--name", "team/app:1", "--runtime", "runsc")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "team/app:1 sha256:") || !strings.Contains(out, "python 3.11") {
		t.Errorf("import printed %q", out)
	}
	out, err = run("ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ims []imagestore.Image
	if err := json.Unmarshal([]byte(out), &ims); err != nil || len(ims) != 1 || ims[0].Runtime != "runsc" || ims[0].Python != "3.11" {
		t.Fatalf("ls --json: %s (%v)", out, err)
	}
	if out, err = run("ls"); err != nil || !strings.Contains(out, "team/app:1") || !strings.Contains(out, "PYTHON") {
		t.Errorf("ls: %q, %v", out, err)
	}

	// A live sandbox's record runs the image.
	ctx := context.Background()
	st, err := openStore(ctx, dataDir, "")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	if err := st.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "a", Plan: "free", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	sb := store.Sandbox{ID: "sbx_live", AccountID: "acct_1", AgentID: "a", Mode: "container", Status: store.SandboxReady,
		CreatedAt: now, ExpiresAt: now.Add(time.Hour), ImageDigest: ims[0].Digest}
	if err := st.CreateSandbox(ctx, sb, -1); err != nil {
		t.Fatal(err)
	}
	if _, err := run("rm", "team/app:1"); err == nil || !strings.Contains(err.Error(), "in use by live sandbox(es) sbx_live") {
		t.Fatalf("rm while sbx_live runs it: %v", err)
	}
	sb.Status, sb.DestroyedAt = store.SandboxDestroyed, &now
	if err := st.UpdateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	st.Close()
	if out, err := run("rm", "team/app:1"); err != nil || out != "removed team/app:1\n" {
		t.Fatalf("rm: %q, %v", out, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "images", "rootfs")); len(ents) != 0 {
		t.Errorf("rootfs keeps %v", ents)
	}
}

// TestImagesWASM: `images import --mode wasm` of a directory of wheels, what it prints and lists;
// bad modes answered with the fix.
func TestImagesWASM(t *testing.T) {
	dataDir := t.TempDir()
	wheels := t.TempDir()
	imagetest.Wheel(t, wheels, "thepkg-1.0-py3-none-any.whl", "thepkg", "1.0", imagetest.WheelFile{Name: "thepkg/__init__.py", Body: "V = 1\n"})
	run := imagesIn(dataDir)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"import", wheels, "--name", "w", "--mode", "vm"}, `mode "vm"`},
		{[]string{"import", wheels, "--name", "w", "--mode", "wasm", "--runtime", "runsc"}, "a runtime is for container images"},
		{[]string{"pull", "localhost:5000/x:1", "--mode", "wasm"}, "--mode is for import"},
	} {
		if _, err := run(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("images %v: %v; want an error saying %q", tc.args, err, tc.want)
		}
	}
	out, err := run("import", wheels, "--name", "team/wasm:1", "--mode", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "team/wasm:1 sha256:") || !strings.Contains(out, "wasm on python:3.11-wasi (python 3.11)") || !strings.Contains(out, "1 package(s): thepkg 1.0") {
		t.Errorf("import printed %q", out)
	}
	if out, err = run("ls"); err != nil || !strings.Contains(out, "team/wasm:1") || !strings.Contains(out, "python:3.11-wasi") {
		t.Errorf("ls: %q, %v", out, err)
	}
}

// imagesIn runs `sandboxd images ARGS --data-dir dataDir` and returns what it printed.
func imagesIn(dataDir string) func(args ...string) (string, error) {
	return func(args ...string) (string, error) {
		var out bytes.Buffer
		err := images(append(args, "--data-dir", dataDir), &out)
		return out.String(), err
	}
}
