package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
)

// TestClusterImage: `sandboxd cluster-image --out DIR` writes an OCI layout whose index names the
// digest it prints, holding both binaries, sandboxd its entrypoint, run as a non-root user; a
// non-empty directory, a missing --out and a missing binary are refused with what to do.
func TestClusterImage(t *testing.T) {
	dir := t.TempDir()
	agent, server := filepath.Join(dir, "sandbox-agent"), filepath.Join(dir, "sandboxd")
	for _, f := range []string{agent, server} {
		if err := os.WriteFile(f, []byte("\x7fELF not really "+filepath.Base(f)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(dir, "layout")
	var printed bytes.Buffer
	if err := clusterImage([]string{"--out", out, "--agent-bin", agent, "--server-bin", server}, &printed); err != nil {
		t.Fatal(err)
	}
	digest := strings.TrimSpace(printed.String())
	var index struct {
		Manifests []struct{ Digest string }
	}
	b, err := os.ReadFile(filepath.Join(out, "index.json"))
	if err == nil {
		err = json.Unmarshal(b, &index)
	}
	if err != nil || len(index.Manifests) != 1 || index.Manifests[0].Digest != digest || !strings.HasPrefix(digest, "sha256:") {
		t.Fatalf("printed %q; index %s (%v)", digest, b, err)
	}
	p, err := layout.FromPath(out)
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := p.ImageIndex()
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if e := cf.Config.Entrypoint; len(e) != 1 || e[0] != "/sandboxd" || cf.Config.User != "65532:65532" {
		t.Errorf("entrypoint %q user %q, want /sandboxd as 65532:65532", e, cf.Config.User)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d (%v)", len(layers), err)
	}
	rc, _ := layers[0].Uncompressed()
	defer rc.Close()
	var names []string
	for tr := tar.NewReader(rc); ; {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
	}
	if strings.Join(names, " ") != "sandbox-agent sandboxd" {
		t.Errorf("layer holds %q, want the two binaries", names)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--out", out, "--agent-bin", agent, "--server-bin", server}, "not empty"},
		{[]string{"--agent-bin", agent}, "--out DIR"},
		{[]string{"--out", filepath.Join(dir, "o1"), "--agent-bin", filepath.Join(dir, "none"), "--server-bin", server}, "--agent-bin"},
		{[]string{"--out", filepath.Join(dir, "o2"), "--agent-bin", agent, "--server-bin", filepath.Join(dir, "none")}, "--server-bin"},
	} {
		if err := clusterImage(c.args, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("cluster-image %v: %v, want an error naming %q", c.args, err, c.want)
		}
	}
}
