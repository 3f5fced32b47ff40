package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

// TestOCIImage: an OCI image built here from the image's root (one layer), imported with
// `sandboxd images import` beside the running server, approved without a restart, run; GET
// /api/images and the sandbox's record show its digest; `images rm` is refused while the
// sandbox lives and done after — the warm sandboxes of its shape do not block it and are destroyed
// with it; an unapproved name is refused.
func TestOCIImage(t *testing.T) {
	hostOnly(t, "imports an image into the service's own store; a cluster runs images by reference (cluster_images)")
	requireEnv(t)
	dataDir := t.TempDir()
	s := startServer(t, dataDir)
	start := time.Now()
	layoutDir := imagetest.WriteLayout(t, imagetest.Image(t, imagetest.DirLayer(t, rootfs)))
	t.Logf("OCI layout of %s written in %s", rootfs, time.Since(start).Round(time.Millisecond))
	images := imagesCmd(dataDir)
	const name = "e2e/oci-data:1"
	start = time.Now()
	out, err := images("import", layoutDir, "--name", name)
	if err != nil {
		t.Fatalf("images import: %v\n%s", err, out)
	}
	t.Logf("images import in %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))

	_, list := s.do("GET", "/api/images", s.key, nil)
	var im map[string]any
	for _, v := range list["images"].([]any) {
		if m := v.(map[string]any); m["name"] == name {
			im = m
		}
	}
	digest, _ := im["digest"].(string)
	if im == nil || !strings.HasPrefix(digest, "sha256:") || im["mode"] != "container" || im["runtime"] != "crun" ||
		im["python_version"] != "3.11" || im["size_bytes"].(float64) < 1<<20 || im["status"] != "ready" || im["default"] != false {
		t.Fatalf("GET /api/images: %v", list)
	}
	if !hasPackage(im, "numpy") || !hasPackage(im, "pandas") {
		t.Errorf("the data image's packages (Debian's python3-*) are not listed: %v", im["packages"])
	}

	id := s.create(s.key, map[string]any{"image": name})
	r := s.run(s.key, id, "import sys; print(sys.version)", 60)
	if r["status"] != "completed" || !strings.HasPrefix(r["stdout"].(string), "3.11") {
		t.Fatalf("run: %v", r)
	}
	if _, sb := s.do("GET", "/api/sandbox/"+id, s.key, nil); sb["image_digest"] != digest {
		t.Fatalf("the sandbox's record: image_digest %v, want %s", sb["image_digest"], digest)
	}
	if out, err := images("rm", name); err == nil || !strings.Contains(out, "in use by live sandbox(es) "+id) {
		t.Fatalf("images rm while %s lives: %v\n%s", id, err, out)
	}
	if status, _ := s.do("DELETE", "/api/sandbox/"+id, s.key, nil); status != 204 {
		t.Fatalf("delete: %d", status)
	}
	// The warm pool keeps sandboxes of the image's shape, owned by no one: they do not block
	// the rm, and the server destroys them once the image is gone.
	waitWarm(t, s, 2)
	if out, err := images("rm", name); err != nil {
		t.Fatalf("images rm: %v\n%s", err, out)
	}
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "images", "rootfs")); len(ents) != 0 {
		t.Errorf("rootfs keeps %v", ents)
	}
	waitWarm(t, s, 0)
	for _, n := range []string{name, "e2e/never-approved:1"} {
		status, m := s.do("POST", "/api/sandbox/create", s.key, map[string]any{"agent_id": "e2e", "config": map[string]any{"image": n}})
		if status != 403 || m["error"] != "image_not_approved" {
			t.Errorf("create with %s: %d %v", n, status, m)
		}
	}
}

// hasPackage says whether an image of GET /api/images lists the distribution name.
func hasPackage(im map[string]any, name string) bool {
	pkgs, _ := im["packages"].([]any)
	for _, p := range pkgs {
		if m, _ := p.(map[string]any); m["name"] == name && m["version"] != "" {
			return true
		}
	}
	return false
}

// imagesCmd runs `sandboxd images ARGS --data-dir dataDir` and returns its output.
func imagesCmd(dataDir string) func(args ...string) (string, error) {
	return func(args ...string) (string, error) {
		out, err := exec.Command(filepath.Join(binDir, "sandboxd"), append([]string{"images"}, append(args, "--data-dir", dataDir)...)...).CombinedOutput()
		return string(out), err
	}
}
