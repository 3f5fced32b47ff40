package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

var wasmImage = os.Getenv("SANDBOXD_PYTHON_WASM")

// shortTempDir is a new directory under /tmp, removed after the test: short, since socket paths
// below a data directory have a length limit.
func shortTempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// requireWasm is requireEnv for the tests that also need the WASM image (SANDBOXD_PYTHON_WASM).
func requireWasm(t *testing.T) {
	t.Helper()
	requireEnv(t)
	if wasmImage == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but SANDBOXD_PYTHON_WASM is not (make test builds python.wasm and sets it)")
		}
		t.Skip("needs SANDBOXD_PYTHON_WASM (make test)")
	}
}

// TestWasmMode: the seed's request in WASM mode (network removed) over HTTP, and the rules that
// hold there — filesystem, memory, time, what WASI Python lacks, a crashing guest, no network.
func TestWasmMode(t *testing.T) {
	hostOnly(t, "WASM sandboxes run in the service's own process")
	requireWasm(t)
	dir := shortTempDir(t, "sbxd-wasm-")
	s := startServerWith(t, dir, "--wasm-image", "python:3.11-wasi="+wasmImage)
	key := s.key // the default account (free plan) owns the sandbox: the files helpers use its key

	status, m := s.awaitReady(key)(s.do("POST", "/api/sandbox/create", key, `{
	  "agent_id": "data-processor", "mode": "wasm",
	  "config": {"image": "python:3.11-wasi",
	    "filesystem": {"read_only": ["/workspace/data"], "read_write": ["/workspace/output"], "blocked": ["/workspace/output/secret"]},
	    "resources": {"cpu": "0.5", "memory": "256m", "timeout": 1800}}}`))
	// (a lifetime the test cannot outlast on a slow host: the VM under emulation took 133 s)
	if status != 201 || m["status"] != "ready" || m["mode"] != "wasm" {
		t.Fatalf("create: %d %v", status, m)
	}
	id := m["sandbox_id"].(string)
	r := s.run(key, id, `import json, sqlite3, zlib; result = json.dumps({"ok": True})`, 60)
	if r["status"] != "completed" || r["result"] != `{"ok": true}` {
		t.Fatalf("seed run: %v", r)
	}

	// Rich results: the trailing expression's repr, a display() output readable as a file.
	r = s.run(key, id, "display({'a': 1})\nx = 20\nx + 22", 60)
	if outs, _ := r["outputs"].([]any); r["display"] != "42" || len(outs) != 1 {
		t.Errorf("rich run: display %v outputs %v", r["display"], r["outputs"])
	} else if status, body, _ := s.get(id, outs[0].(map[string]any)["path"].(string)); status != 200 || string(body) != "{'a': 1}" {
		t.Errorf("display output: %d %q", status, body)
	}

	// Data in through the files API, out through the sandbox.
	if status, _ := s.put(id, "/workspace/data/in.csv", []byte("a,b\n1,2\n")); status != 201 {
		t.Fatalf("upload: %d", status)
	}
	r = s.run(key, id, "import csv\nrows = list(csv.reader(open('/workspace/data/in.csv')))\nopen('/workspace/output/n.txt', 'w').write(str(len(rows)))\nresult = rows", 60)
	if r["status"] != "completed" {
		t.Fatalf("csv run: %v", r)
	}
	if status, body, _ := s.get(id, "/workspace/output/n.txt"); status != 200 || string(body) != "2" {
		t.Errorf("download: %d %q", status, body)
	}

	checks := []struct {
		name, code string
		want       string // the run's result, as JSON
	}{
		{"read_only refuses writes", `
try:
    open('/workspace/data/x', 'w'); result = 'written'
except OSError as e:
    result = 'refused'`, `"refused"`},
		{"blocked is absent", `
import os
result = [os.path.exists('/workspace/output/secret'), 'secret' in os.listdir('/workspace/output')]`, "[false,false]"},
		{"nothing outside the mounts", `
import os
found = []
for p in ['/etc/passwd', '/root', '/proc/self', '/workspace/../etc/passwd', '/workspace/output/../../etc/passwd', '/usr/local/lib/../../../etc/passwd']:
    if os.path.exists(p): found.append(p)
result = found`, "[]"},
		{"no symlink out", `
import os
try:
    os.symlink('../../../../etc', '/workspace/output/esc'); result = os.listdir('/workspace/output/esc')
except OSError as e:
    result = 'refused'`, `"refused"`},
		{"sockets fail cleanly", `
import socket
try:
    socket.create_connection(('1.1.1.1', 80), timeout=2); result = 'connected'
except Exception as e:
    result = 'failed'`, `"failed"`},
		{"subprocess fails cleanly", `
import subprocess
try:
    subprocess.run(['true']); result = 'ran'
except Exception as e:
    result = 'failed'`, `"failed"`},
		{"threads fail cleanly", `
import threading
try:
    t = threading.Thread(target=lambda: None); t.start(); t.join(); result = 'ran'
except Exception as e:
    result = 'failed'`, `"failed"`},
	}
	for _, c := range checks {
		r := s.run(key, id, c.code, 60)
		got, _ := json.Marshal(r["result"])
		if r["status"] != "completed" || string(got) != c.want {
			t.Errorf("%s: %v %v", c.name, r["status"], r["result"])
		}
	}

	// A memory hog ends as oom; a busy loop and a long sleep end as timeout (the run would not end
	// otherwise: how soon after the timeout is bench's to measure).
	if r := s.run(key, id, "b = b'x' * (1 << 30)", 60); r["status"] != "oom" {
		t.Errorf("memory hog: %v %v", r["status"], r["error"])
	}
	for _, code := range []string{"while True: pass", "import time\ntime.sleep(100)"} {
		start := time.Now()
		r := s.run(key, id, code, 2)
		if r["status"] != "timeout" {
			t.Errorf("%q: %v after %v", code, r["status"], time.Since(start))
		}
	}
	// A guest that crashes the interpreter (deep recursion in C) takes down its worker, not
	// sandboxd; the sandbox goes on.
	r = s.run(key, id, "import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n+1)\nf(0)", 60)
	if r["status"] == "completed" {
		t.Errorf("runaway recursion completed: %v", r)
	}
	if r := s.run(key, id, "result = 6*7", 60); r["result"] != float64(42) {
		t.Fatalf("after a crash: %v", r)
	}
	// Recursion deeper than the interpreter's C stack: a clear error, and the sandbox goes on.
	r = s.run(key, id, "import sys\nsys.setrecursionlimit(10**7)\nx = []\nfor _ in range(300000):\n    x = [x]\nimport pickle\npickle.dumps(x)", 60)
	if e, _ := r["error"].(map[string]any); r["status"] != "failed" || e["type"] != "StackOverflow" ||
		!strings.Contains(fmt.Sprint(r["stderr"]), "sandbox: the interpreter crashed (the interpreter's C stack overflowed") {
		t.Errorf("C stack overflow: status %v error %v stderr %.300v", r["status"], r["error"], r["stderr"])
	}
	if r := s.run(key, id, "result = 6*7", 60); r["result"] != float64(42) {
		t.Fatalf("after a stack overflow: %v", r)
	}
	if status, _ := s.do("GET", "/health", "", nil); status != 200 {
		t.Fatalf("sandboxd unhealthy after a guest crash: %d", status)
	}

	// No network in WASM mode.
	status, m = s.do("POST", "/api/sandbox/create", key, map[string]any{"agent_id": "a", "mode": "wasm",
		"config": map[string]any{"network": map[string]any{"allow": []string{"api.company.com"}}}})
	if status != 400 || m["error"] != "unsupported_in_mode" {
		t.Errorf("wasm with network: %d %v", status, m)
	}
	if status, _ = s.do("DELETE", "/api/sandbox/"+id, key, nil); status != 204 {
		t.Errorf("delete: %d", status)
	}
}
