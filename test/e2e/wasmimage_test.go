package e2e

import (
	"os"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

// TestWASMImage: pure-Python wheels built here, imported with `sandboxd images import --mode
// wasm` beside the running server, approved without a restart, listed with their packages and
// their base's Python, importable in a WASM sandbox of the image (and only there); a wheel with
// native code or an entry leaving the package directory is refused, naming it; `images rm` is
// refused while the sandbox lives; an unapproved name is refused.
func TestWASMImage(t *testing.T) {
	hostOnly(t, "WASM sandboxes run in the service's own process")
	requireWasm(t)
	dataDir := shortTempDir(t, "sbxd-wasmimg-")
	s := startServerWith(t, dataDir, "--wasm-image", "python:3.11-wasi="+wasmImage)
	images := imagesCmd(dataDir)
	for _, tc := range []struct {
		name string
		file imagetest.WheelFile
		say  []string
	}{
		{"native", imagetest.WheelFile{Name: "evil/_x.cpython-311-x86_64-linux-gnu.so", Body: "\x7fELF"}, []string{"evil-1.0-py3-none-any.whl", "_x.cpython-311-x86_64-linux-gnu.so", "native code"}},
		{"escaping", imagetest.WheelFile{Name: "../../escaped.py", Body: "x = 1\n"}, []string{"evil-1.0-py3-none-any.whl", `"../../escaped.py"`, "leaves the package directory"}},
		{"absolute", imagetest.WheelFile{Name: "/tmp/escaped.py", Body: "x = 1\n"}, []string{`"/tmp/escaped.py"`}},
	} {
		dir := t.TempDir()
		imagetest.Wheel(t, dir, "evil-1.0-py3-none-any.whl", "evil", "1.0", tc.file)
		out, err := images("import", dir, "--name", "e2e/evil:1", "--mode", "wasm")
		if err == nil {
			t.Fatalf("%s: imported: %s", tc.name, out)
		}
		for _, w := range tc.say {
			if !strings.Contains(out, w) {
				t.Errorf("%s: the refusal does not say %q: %s", tc.name, w, out)
			}
		}
	}
	if _, err := os.Stat("/tmp/escaped.py"); err == nil {
		t.Error("/tmp/escaped.py was written")
	}

	wheels := t.TempDir()
	imagetest.Wheel(t, wheels, "thepkg-1.0-py3-none-any.whl", "thepkg", "1.0",
		imagetest.WheelFile{Name: "thepkg/__init__.py", Body: "from .core import answer\n"},
		imagetest.WheelFile{Name: "thepkg/core.py", Body: "import json\ndef answer():\n    return json.dumps({'answer': 42})\n"})
	imagetest.Wheel(t, wheels, "helper-0.2-py2.py3-none-any.whl", "helper", "0.2", imagetest.WheelFile{Name: "helper.py", Body: "NAME = 'helper'\n"})
	const name = "e2e/wasm-tools:1"
	out, err := images("import", wheels, "--name", name, "--mode", "wasm")
	if err != nil {
		t.Fatalf("images import: %v\n%s", err, out)
	}
	t.Logf("images import: %s", strings.TrimSpace(out))

	_, list := s.do("GET", "/api/images", s.key, nil)
	var im map[string]any
	for _, v := range list["images"].([]any) {
		if m := v.(map[string]any); m["name"] == name {
			im = m
		}
	}
	if im == nil || im["mode"] != "wasm" || im["base"] != "python:3.11-wasi" || im["python_version"] != "3.11" || im["status"] != "ready" ||
		!strings.HasPrefix(im["digest"].(string), "sha256:") || !hasPackage(im, "thepkg") || !hasPackage(im, "helper") {
		t.Fatalf("GET /api/images: %v", list)
	}

	status, m := s.awaitReady(s.key)(s.do("POST", "/api/sandbox/create", s.key, map[string]any{"agent_id": "e2e", "mode": "wasm", "config": map[string]any{"image": name}}))
	if status != 201 || m["status"] != "ready" {
		t.Fatalf("create: %d %v", status, m)
	}
	id := m["sandbox_id"].(string)
	r := s.run(s.key, id, "import thepkg, helper\nresult = thepkg.answer() + helper.NAME", 60)
	if r["status"] != "completed" || r["result"] != `{"answer": 42}helper` {
		t.Fatalf("run: %v", r)
	}
	if _, sb := s.do("GET", "/api/sandbox/"+id, s.key, nil); sb["image_digest"] != im["digest"] {
		t.Fatalf("the sandbox's record: image_digest %v, want %v", sb["image_digest"], im["digest"])
	}
	// The base alone has no such package.
	status, m = s.awaitReady(s.key)(s.do("POST", "/api/sandbox/create", s.key, map[string]any{"agent_id": "e2e", "mode": "wasm"}))
	if status != 201 {
		t.Fatalf("create on the base: %d %v", status, m)
	}
	plain := m["sandbox_id"].(string)
	if r := s.run(s.key, plain, "import thepkg", 60); r["status"] != "failed" || !strings.Contains(r["stderr"].(string), "No module named 'thepkg'") {
		t.Fatalf("the base imports the image's package: %v", r)
	}

	if out, err := images("rm", name); err == nil || !strings.Contains(out, "in use by live sandbox(es) "+id) {
		t.Fatalf("images rm while %s lives: %v\n%s", id, err, out)
	}
	for _, sb := range []string{id, plain} {
		if status, _ := s.do("DELETE", "/api/sandbox/"+sb, s.key, nil); status != 204 {
			t.Fatalf("delete: %d", status)
		}
	}
	if out, err := images("rm", name); err != nil {
		t.Fatalf("images rm: %v\n%s", err, out)
	}
	for _, n := range []string{name, "e2e/never-approved:1"} {
		status, m := s.do("POST", "/api/sandbox/create", s.key, map[string]any{"agent_id": "e2e", "mode": "wasm", "config": map[string]any{"image": n}})
		if status != 403 || m["error"] != "image_not_approved" {
			t.Errorf("create with %s: %d %v", n, status, m)
		}
	}
}
