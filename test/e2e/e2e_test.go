// Package e2e tests sandboxd as its users see it: the real binary, serving HTTP, running real
// container sandboxes (crun or runc) on the real image, with its SQLite database on disk.
//
// It needs root, an OCI runtime, the built binaries (SANDBOXD_BIN, a directory holding sandboxd and
// sandbox-agent) and the image (SANDBOXD_ROOTFS); `make test` provides all of them. Without them
// the tests skip, except when CI is set: then they fail.
package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

var (
	binDir = os.Getenv("SANDBOXD_BIN")
	rootfs = os.Getenv("SANDBOXD_ROOTFS")
)

func requireEnv(t *testing.T) {
	t.Helper()
	var why string
	switch {
	case os.Geteuid() != 0:
		why = "needs root"
	case binDir == "" || rootfs == "":
		why = "needs SANDBOXD_BIN and SANDBOXD_ROOTFS (run make test)"
	}
	if why == "" {
		if _, err := os.Stat(filepath.Join(binDir, "sandboxd")); err != nil {
			why = "no sandboxd binary in SANDBOXD_BIN: " + err.Error()
		}
	}
	if why != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but the end-to-end tests cannot run: %s", why)
		}
		t.Skip(why)
	}
}

// server is a running sandboxd process.
type server struct {
	t       *testing.T
	cmd     *exec.Cmd
	url     string
	key     string
	dataDir string
	logs    *bytes.Buffer
	logw    *lockedWriter // writes logs (nil: nothing writes it concurrently)
	// The kubernetes pass (launchReplicas): store is the database's URL, peer the second replica
	// (stopped with this one); do alternates between the two.
	store string
	peer  *server
	turn  atomic.Uint64
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// launch starts sandboxd on dataDir and waits until it is healthy; on a fresh dataDir it reads the
// first API key the server prints.
func launch(addr, dataDir string, extra ...string) (*server, error) {
	return launchWith(addr, dataDir, nil, extra...)
}

// launchWith is launch with prep (if not nil) called on the command before it starts (e.g. to
// give it a process group of its own, or a terminal).
func launchWith(addr, dataDir string, prep func(*exec.Cmd), extra ...string) (*server, error) {
	s := &server{url: "http://" + addr, dataDir: dataDir, logs: &bytes.Buffer{}}
	args := append([]string{"serve", "--listen", addr, "--data-dir", dataDir,
		"--image", "agentcop/agent-sandbox:latest=" + rootfs}, extra...)
	s.cmd = exec.Command(filepath.Join(binDir, "sandboxd"), args...)
	s.logw = &lockedWriter{w: s.logs}
	s.cmd.Stderr = s.logw
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if prep != nil {
		prep(s.cmd)
	}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	keyc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case keyc <- strings.TrimSpace(sc.Text()):
			default:
			}
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("sandboxd did not become healthy: %v\n%s", err, s.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case s.key = <-keyc:
	case <-time.After(200 * time.Millisecond):
	}
	return s, nil
}

// stop ends the server with SIGTERM (it destroys its sandboxes) and waits for it.
func (s *server) stop() {
	if s.peer != nil {
		s.peer.stop()
	}
	if s.cmd.ProcessState == nil {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		_ = s.cmd.Wait()
	}
}

// servingPid is the process that serves s: the one s.cmd started re-executes itself in a mount
// namespace of its own (mountns.Enter) and waits for it, so the server's memory, mounts and
// files below mountns.Base are its only child's. It fails the test when there is none.
func (s *server) servingPid() int {
	s.t.Helper()
	pid := s.cmd.Process.Pid
	kids := processChildren()[pid]
	if len(kids) != 1 {
		s.t.Fatalf("sandboxd %d: no single re-executed child (%v)", pid, kids)
	}
	return kids[0]
}

// startServer launches a server that the test owns.
func startServer(t *testing.T, dataDir string) *server {
	t.Helper()
	return startServerWith(t, dataDir)
}

// startServerWith launches a server with extra serve flags.
func startServerWith(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	launchIt := launch
	if onKubernetes {
		launchIt = func(addr, dataDir string, extra ...string) (*server, error) {
			return launchReplicas(t, addr, dataDir, extra...)
		}
	}
	s, err := launchIt(freeAddr(t), dataDir, extra...)
	if err != nil {
		t.Fatal(err)
	}
	s.t = t
	t.Cleanup(func() {
		s.stop()
		s.removeKubeFiles()
		if t.Failed() {
			t.Logf("sandboxd logs:\n%s", s.logs.String())
			if s.peer != nil {
				t.Logf("second replica's logs:\n%s", s.peer.logs.String())
			}
		}
	})
	return s
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// logged reports whether the server has logged sub so far.
func (s *server) logged(sub string) bool {
	if s.logw != nil {
		s.logw.mu.Lock()
		defer s.logw.mu.Unlock()
	}
	return strings.Contains(s.logs.String(), sub)
}

// awaitRun waits until run runID of sandbox id has status want.
func (s *server) awaitRun(key, id, runID, want string) {
	s.t.Helper()
	waitfor.True(s.t, 30*time.Second, func() bool {
		_, m := s.do("GET", "/api/sandbox/"+id+"/runs/"+runID, key, nil)
		return m["status"] == want
	})
}

// newKey creates a key with the CLI (while the server runs).
func (s *server) newKey(account, plan string) string {
	args := []string{"keys", "create", "--data-dir", s.dataDir, "--account", account, "--plan", plan}
	if s.store != "" {
		args = append(args, "--store", s.store)
	}
	out, err := exec.Command(filepath.Join(binDir, "sandboxd"), args...).Output()
	if err != nil {
		s.t.Fatalf("keys create: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

func (s *server) do(method, path, key string, body any) (int, map[string]any) {
	s.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		if str, ok := body.(string); ok {
			b = []byte(str)
		}
		rd = bytes.NewReader(b)
	}
	url := s.url
	if s.peer != nil && s.turn.Add(1)%2 == 0 {
		url = s.peer.url // the kubernetes pass: every other request through the second replica
	}
	req, _ := http.NewRequest(method, url+path, rd)
	req.Header.Set("X-AgentCop-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if len(b) > 0 {
		if err := json.Unmarshal(b, &m); err != nil {
			s.t.Fatalf("%s %s: not JSON: %q", method, path, b)
		}
	}
	return resp.StatusCode, m
}

// create makes a sandbox with config cfg, to be deleted when the test ends, and fails the test
// unless it is ready.
func (s *server) create(key string, cfg map[string]any) string {
	s.t.Helper()
	id := s.createReady(key, map[string]any{"agent_id": "e2e", "config": cfg})
	s.t.Cleanup(func() { // best effort: the test may have stopped the server
		req, _ := http.NewRequest("DELETE", s.url+"/api/sandbox/"+id, nil)
		req.Header.Set("X-AgentCop-Key", key)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	})
	return id
}

// createReady makes a sandbox from a whole create request and fails the test unless it is ready
// (see awaitReady).
func (s *server) createReady(key string, req map[string]any) string {
	s.t.Helper()
	status, m := s.awaitReady(key)(s.do("POST", "/api/sandbox/create", key, req))
	if status != 201 || m["status"] != "ready" {
		s.t.Fatalf("create: %d %v", status, m)
	}
	return m["sandbox_id"].(string)
}

// awaitReady returns what makes a create's answer (status, body) final: a 201 as it is; a 202
// "provisioning" — what a slow host answers (the cgroup v2 VM runs under software emulation, where
// a WASM image's first compile takes minutes) — polled as a client does, within 5 minutes, and
// then answered as 201 with the sandbox once it is ready.
func (s *server) awaitReady(key string) func(int, map[string]any) (int, map[string]any) {
	return func(status int, m map[string]any) (int, map[string]any) {
		if status != 202 || m["status"] != "provisioning" {
			return status, m
		}
		id, _ := m["sandbox_id"].(string)
		for deadline := time.Now().Add(5 * time.Minute); m["status"] == "provisioning" && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			if _, got := s.do("GET", "/api/sandbox/"+id, key, nil); got != nil {
				m = got
			}
		}
		if m["status"] == "ready" {
			status = 201
		}
		return status, m
	}
}

// run executes code synchronously and returns the run object.
func (s *server) run(key, id, code string, timeout int) map[string]any {
	s.t.Helper()
	status, m := s.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"code": code, "timeout": timeout})
	if status != 200 {
		s.t.Fatalf("run: %d %v", status, m)
	}
	return m
}

var (
	shared     *server
	sharedErr  error
	sharedOnce sync.Once
)

// sharedServer is one server for the tests that don't restart it.
func sharedServer(t *testing.T) *server {
	requireEnv(t)
	sharedOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sandboxd-e2e-")
		if err != nil {
			sharedErr = err
			return
		}
		if onKubernetes {
			shared, sharedErr = launchReplicas(t, freeAddr(t), dir)
		} else {
			shared, sharedErr = launch(freeAddr(t), dir)
		}
	})
	if sharedErr != nil || shared.key == "" {
		t.Fatalf("shared server did not start: %v", sharedErr)
	}
	shared.t = t
	return shared
}

func TestMain(m *testing.M) {
	checkResponses()
	code := responsesChecked(m.Run())
	if shared != nil {
		shared.stop()
		if code != 0 {
			fmt.Fprintf(os.Stderr, "shared sandboxd logs:\n%s", shared.logs.String())
		}
		os.RemoveAll(shared.dataDir)
		shared.removeKubeFiles()
	}
	pgtest.StopShared()
	stopKube()
	os.Exit(code)
}

func TestSeedExample(t *testing.T) {
	s := sharedServer(t)
	status, m := s.awaitReady(s.key)(s.do("POST", "/api/sandbox/create", s.key, `{
	  "agent_id": "data-processor", "mode": "container",
	  "config": {"image": "agentcop/agent-sandbox:latest",
	    "filesystem": {"read_only": ["/workspace/data"], "read_write": ["/workspace/output"], "blocked": ["/etc", "/root"]},
	    "network": {"block_outbound": true},
	    "resources": {"cpu": "0.5", "memory": "512m", "timeout": 30}}}`))
	if status != 201 || m["status"] != "ready" || m["mode"] != "container" {
		t.Fatalf("create: %d %v", status, m)
	}
	id := m["sandbox_id"].(string)
	created, _ := time.Parse(time.RFC3339, m["created_at"].(string))
	expires, _ := time.Parse(time.RFC3339, m["expires_at"].(string))
	if expires.Sub(created) != 30*time.Second {
		t.Fatalf("expires_at - created_at = %v", expires.Sub(created))
	}
	r := s.run(s.key, id, "result = 6*7", 30)
	if r["status"] != "completed" || r["result"] != float64(42) || r["exit_code"] != float64(0) {
		t.Fatalf("run: %v", r)
	}
	r = s.run(s.key, id, "print('hi')\nimport sys; print('err', file=sys.stderr)\nresult = {'rows': 12}", 30)
	if r["stdout"] != "hi\n" || r["stderr"] != "err\n" || r["result"].(map[string]any)["rows"] != float64(12) {
		t.Fatalf("run: %v", r)
	}
	r = s.run(s.key, id, "x = 1\n1/0", 30)
	e, _ := r["error"].(map[string]any)
	if r["status"] != "failed" || r["exit_code"] != float64(1) || e["type"] != "ZeroDivisionError" ||
		e["message"] != "division by zero" || !strings.Contains(e["traceback"].(string), "line 2") {
		t.Fatalf("exception run: %v", r)
	}
	if status, _ = s.do("DELETE", "/api/sandbox/"+id, s.key, nil); status != 204 {
		t.Fatalf("delete: %d", status)
	}
	_, m = s.do("GET", "/api/sandbox/"+id, s.key, nil)
	if m["status"] != "destroyed" || m["destroy_reason"] != "deleted" || m["runs"].(map[string]any)["total"] != float64(3) {
		t.Fatalf("after delete: %v", m)
	}
	metrics := s.metrics()
	for _, want := range []string{
		`sandboxd_create_seconds_count{mode="container",outcome="ready"}`,
		`sandboxd_run_seconds_count{mode="container",status="completed"}`,
		`sandboxd_run_seconds_count{mode="container",status="failed"}`,
		`sandboxd_sandboxes_destroyed_total{mode="container",reason="deleted"}`,
		`sandboxd_sandboxes{mode="container",status="ready"}`,
		`sandboxd_store_seconds_count{op="create_sandbox",result="ok"}`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// metrics scrapes GET /metrics (no key).
func (s *server) metrics() string {
	s.t.Helper()
	resp, err := http.Get(s.url + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		s.t.Fatalf("/metrics: %d %s", resp.StatusCode, b)
	}
	return string(b)
}

func TestFilesystemRules(t *testing.T) {
	s := sharedServer(t)
	secret := fmt.Sprintf("/root/sandboxd-e2e-secret-%d", time.Now().UnixNano())
	if err := os.WriteFile(secret, []byte("host secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(secret)
	id := s.create(s.key, map[string]any{"filesystem": map[string]any{
		"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/output"},
		"blocked": []string{"/etc", "/root", "/workspace/output/private"}}})
	code := fmt.Sprintf(`
import os
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__
attempt("write_ro", lambda: open("/workspace/data/x", "w").write("x"))
attempt("write_rw", lambda: open("/workspace/output/x", "w").write("x"))
attempt("read_rw", lambda: open("/workspace/output/x").read())
attempt("list_etc", lambda: os.listdir("/etc"))
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("write_etc", lambda: open("/etc/new", "w").write("x"))
attempt("list_root", lambda: os.listdir("/root"))
attempt("list_private", lambda: os.listdir("/workspace/output/private"))
attempt("write_rootfs", lambda: open("/usr/x", "w").write("x"))
attempt("write_tmp", lambda: open("/tmp/x", "w").write("x"))
for i, p in enumerate([%q, "/proc/1/root%s", "/../../..%s", "/proc/self/root/..%s"]):
    attempt("host_%%d" %% i, lambda: open(p).read())
st = open("/proc/self/status").read()
out["uid"] = os.getuid()
out["caps"] = [l.split()[1] for l in st.splitlines() if l.startswith("CapEff")][0]
out["nnp"] = [l.split()[1] for l in st.splitlines() if l.startswith("NoNewPrivs")][0]
out["seccomp"] = [l.split()[1] for l in st.splitlines() if l.startswith("Seccomp:")][0]
result = out
`, secret, secret, secret, secret)
	r := s.run(s.key, id, code, 30)
	if r["status"] != "completed" {
		t.Fatalf("run: %v", r)
	}
	got := r["result"].(map[string]any)
	want := map[string]any{
		"write_ro": "OSError", "write_rw": "ok", "read_rw": "ok", "list_etc": "PermissionError", "read_passwd": "PermissionError",
		"write_etc": "PermissionError", "list_root": "PermissionError", "list_private": "PermissionError",
		"write_rootfs": "OSError", "write_tmp": "ok", "uid": float64(10000), "caps": "0000000000000000", "nnp": "1", "seccomp": "2",
	}
	if onKubernetes {
		// A pod has no user namespace: its code runs as its sandbox's own host uid (the first of
		// its ids + 10000, from the server's id range, 2^30 up), which no other sandbox has.
		if uid, _ := got["uid"].(float64); uid < 1<<30+10000 {
			t.Errorf("uid %v in a pod, want its sandbox's own (2^30 + …)", got["uid"])
		}
		delete(want, "uid")
	}
	for k, v := range want {
		g := got[k]
		if v == "OSError" && (g == "OSError" || g == "PermissionError") { // EROFS or EACCES
			continue
		}
		if g != v {
			t.Errorf("%s: got %v, want %v", k, g, v)
		}
	}
	for i := range 4 {
		if g := got[fmt.Sprintf("host_%d", i)]; g == "ok" {
			t.Errorf("host file reached through path %d", i)
		}
	}
	// Files in /tmp and read_write paths persist between runs; interpreter state does not.
	r = s.run(s.key, id, "import os\nresult = [open('/tmp/x').read(), os.path.exists('/workspace/output/x'), 'out' in globals()]", 30)
	if fmt.Sprint(r["result"]) != "[x true false]" {
		t.Fatalf("second run: %v", r["result"])
	}
}

func TestResourceLimits(t *testing.T) {
	s := sharedServer(t)
	pro := s.newKey("e2e-limits", "pro")
	id := s.create(pro, map[string]any{"resources": map[string]any{"memory": "64m"}, "process": map[string]any{"allow_spawn": true}})
	countProcs := "import os\nresult = len([p for p in os.listdir('/proc') if p.isdigit()])"

	r := s.run(pro, id, "b = b'x' * (256 << 20)\nprint(len(b))", 30)
	if r["status"] != "oom" {
		t.Fatalf("memory hog: %v", r["status"])
	}
	start := time.Now()
	r = s.run(pro, id, "while True: pass", 2)
	if r["status"] != "timeout" { // it would not end otherwise
		t.Fatalf("busy loop: %v after %v", r["status"], time.Since(start))
	}
	if r = s.run(pro, id, countProcs, 30); r["result"] != float64(2) { // the agent and this python
		t.Fatalf("processes left after timeout: %v", r["result"])
	}
	// A fork bomb in a sandbox with room in memory: the pids limit contains it.
	spawner := s.create(pro, map[string]any{"process": map[string]any{"allow_spawn": true}})
	bomb := "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
	r = s.run(pro, spawner, bomb, 3)
	if r["status"] != "timeout" && r["status"] != "oom" {
		t.Fatalf("fork bomb: %v", r)
	}
	if r = s.run(pro, spawner, countProcs, 30); r["status"] != "completed" || r["result"] != float64(2) {
		t.Fatalf("after the fork bomb: %v %v", r["status"], r["result"])
	}
	if r = s.run(pro, id, "import subprocess\nresult = subprocess.run(['true']).returncode", 30); r["result"] != float64(0) {
		t.Fatalf("allow_spawn true: %v", r)
	}
	r = s.run(pro, id, "import concurrent.futures as f\nwith f.ThreadPoolExecutor(4) as ex:\n    result = sum(ex.map(lambda x: x*x, range(10)))", 30)
	if r["result"] != float64(285) {
		t.Fatalf("threads: %v", r)
	}

	def := s.create(pro, nil)
	r = s.run(pro, def, "import subprocess\nsubprocess.run(['true'])", 30)
	if e, _ := r["error"].(map[string]any); r["status"] != "failed" || e["type"] != "PermissionError" {
		t.Fatalf("allow_spawn false: %v", r)
	}
	r = s.run(pro, def, "import threading\nt = threading.Thread(target=lambda: None); t.start(); t.join()\nresult = 'threads ok'", 30)
	if r["result"] != "threads ok" {
		t.Fatalf("threads with allow_spawn false: %v", r)
	}
}

func TestFreePlanConcurrency(t *testing.T) {
	s := sharedServer(t)
	key := s.newKey("e2e-free", "free")
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	var ids []string
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, m := s.do("POST", "/api/sandbox/create", key, map[string]any{"agent_id": "burst"})
			mu.Lock()
			defer mu.Unlock()
			codes[status]++
			if status == 201 || status == 202 { // 202: still provisioning (a slow node), as the API allows
				ids = append(ids, m["sandbox_id"].(string))
			}
		}()
	}
	wg.Wait()
	for _, id := range ids {
		s.do("DELETE", "/api/sandbox/"+id, key, nil)
	}
	if codes[201]+codes[202] != 3 || codes[429] != 47 {
		t.Fatalf("status counts %v; want 3 created (201 or 202) and 47×429", codes)
	}
}

func TestExpiry(t *testing.T) {
	s := sharedServer(t)
	life := 2
	if onKubernetes {
		life = 12 // a pod takes seconds to start: a 2 s sandbox would expire before it is ready
	}
	id := s.create(s.key, map[string]any{"resources": map[string]any{"timeout": life}})
	if onKubernetes {
		expiredPod(t, s, id)
		return
	}
	veths := sandboxVeths(t, id)
	if len(veths) != 1 {
		t.Fatalf("sandbox %s has veths %v, want one", id, veths)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		_, m := s.do("GET", "/api/sandbox/"+id, s.key, nil)
		if m["status"] == "destroyed" {
			exp, _ := time.Parse(time.RFC3339, m["expires_at"].(string))
			des, _ := time.Parse(time.RFC3339, m["destroyed_at"].(string))
			// (how soon after expires_at the reaper destroys it is timing, not a test's business)
			if m["destroy_reason"] != "expired" || des.Before(exp) {
				t.Fatalf("expired: %v", m)
			}
			if n := sandboxProcesses(t, id); n != 0 {
				t.Fatalf("%d processes of the expired sandbox remain", n)
			}
			if left := networkLeft(t, veths); len(left) != 0 {
				t.Fatalf("left after expiry: %v", left)
			}
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("sandbox was not destroyed at expires_at")
}

// sandboxProcesses counts live host processes in the cgroup of sandbox id ("" = any sandbox).
// Zombies are not counted: a killed container's init is reparented to the host's init, which
// reaps it in its own time (this host's PID 1 takes seconds); a zombie runs nothing and holds no
// memory, mount or namespace.
func sandboxProcesses(t *testing.T, id string) int {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	n := 0
	for _, d := range dirs {
		b, err := os.ReadFile(d + "/cgroup")
		if err != nil || !strings.Contains(string(b), "/sandboxd/"+id) {
			continue
		}
		if st, err := os.ReadFile(d + "/stat"); err == nil {
			if f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:])); len(f) > 0 && f[0] == "Z" {
				continue
			}
		}
		n++
	}
	return n
}

// cgroupDirs lists the cgroups of the given sandboxes left on the host: a directory <id> below a
// "sandboxd" directory anywhere in /sys/fs/cgroup (on cgroup v1 in each controller's hierarchy, on
// a delegated cgroup v2 host below the server's own cgroup). (Checks are scoped to this test's
// sandboxes: other packages' tests create sandboxes at the same time.)
func cgroupDirs(ids ...string) []string {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	var out []string
	_ = filepath.WalkDir("/sys/fs/cgroup", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if want[d.Name()] && filepath.Base(filepath.Dir(p)) == "sandboxd" {
			out = append(out, p)
			return filepath.SkipDir
		}
		if strings.Count(p, "/") > 8 {
			return filepath.SkipDir
		}
		return nil
	})
	return out
}

// netNamespaces returns the network namespaces held by the processes of sandbox id ("" = by every
// process on the host).
func netNamespaces(id string) map[string]bool {
	out := map[string]bool{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if id != "" {
			if b, err := os.ReadFile(d + "/cgroup"); err != nil || !strings.Contains(string(b), "/sandboxd/"+id) {
				continue
			}
		}
		if target, err := os.Readlink(d + "/ns/net"); err == nil {
			out[target] = true
		}
	}
	return out
}

// hostNet is the network namespace of the calling thread, which is the host's: not
// /proc/self's, the thread group leader's, which a goroutine that entered a sandbox's namespace
// and ended locked to that thread can leave there for good (the Go runtime wedges a leader it
// cannot end) — then the host's own namespace passed for a sandbox's.
func hostNet() string {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ns, _ := os.Readlink("/proc/thread-self/ns/net")
	return ns
}

func TestCrashRecovery(t *testing.T) {
	hostOnly(t, "a server killed with its sandboxes' processes, mounts and cgroups on the host")
	requireEnv(t)
	dir := t.TempDir()
	s := startServer(t, dir)
	if s.key == "" {
		t.Fatal("first start printed no API key")
	}
	a := s.create(s.key, map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}}})
	b := s.create(s.key, nil)
	s.run(s.key, a, "open('/workspace/out/f', 'w').write('kept until destroy')", 30)
	status, m := s.do("POST", "/api/sandbox/"+b+"/run", s.key, map[string]any{"code": "while True: pass", "async": true, "timeout": 600})
	if status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	runID := m["run_id"].(string)
	s.awaitRun(s.key, b, runID, "running")
	if sandboxProcesses(t, b) == 0 {
		t.Fatal("the running sandbox has no processes: the check below would prove nothing")
	}
	veths := sandboxVeths(t, a, b)
	if len(veths) != 2 {
		t.Fatalf("want a veth per sandbox, found %v", veths)
	}
	// One network namespace of its own, once the zygote's start (an nsenter in the sandbox's
	// cgroup, still in the host's namespace until it enters the sandbox's) is over: a loaded host
	// may still be starting it while the run above runs through the launcher.
	var sandboxNets map[string]bool
	if !waitfor.Until(60*time.Second, func() bool {
		sandboxNets = netNamespaces(b)
		return len(sandboxNets) == 1 && !sandboxNets[hostNet()]
	}) {
		t.Fatalf("sandbox %s should have one network namespace of its own, has %v", b, sandboxNets)
	}

	if err := s.cmd.Process.Kill(); err != nil { // kill -9
		t.Fatal(err)
	}
	_ = s.cmd.Wait()

	s2 := startServer(t, dir)
	for _, id := range []string{a, b} {
		_, m := s2.do("GET", "/api/sandbox/"+id, s.key, nil)
		if m["status"] != "destroyed" || m["destroy_reason"] != "server_restart" {
			t.Fatalf("sandbox %s after restart: %v", id, m)
		}
	}
	_, m = s2.do("GET", "/api/sandbox/"+b+"/runs/"+runID, s.key, nil)
	if m["status"] != "error" || m["finished_at"] == nil {
		t.Fatalf("run after restart: %v", m)
	}
	_, m = s2.do("GET", "/api/sandbox?limit=10", s.key, nil)
	if m["total"] != float64(2) {
		t.Fatalf("records after restart: %v", m)
	}
	_, m = s2.do("GET", "/api/audit?type=sandbox.destroyed", s.key, nil)
	if m["total"] != float64(2) {
		t.Fatalf("audit after restart: %v", m)
	}
	if n := sandboxProcesses(t, a) + sandboxProcesses(t, b); n != 0 {
		t.Fatalf("%d sandbox processes leaked", n)
	}
	if d := cgroupDirs(a, b); len(d) != 0 {
		t.Fatalf("cgroups leaked: %v", d)
	}
	if left := networkLeft(t, veths); len(left) != 0 {
		t.Fatalf("network leaked: %v", left)
	}
	for ns := range sandboxNets {
		if netNamespaces("")[ns] {
			t.Fatalf("network namespace %s of sandbox %s leaked (a process still holds it)", ns, b)
		}
	}
	mounts, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", s2.servingPid()))
	hostMounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, mi := range [][]byte{mounts, hostMounts} {
		if bytes.Contains(mi, []byte(dir)) {
			t.Fatalf("mounts of the data dir leaked:\n%s", mi)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "sandboxes")); len(entries) != 0 {
		t.Fatalf("sandbox dirs left: %d", len(entries))
	}
	// And the restarted server works.
	c := s2.create(s.key, nil)
	if r := s2.run(s.key, c, "result = 6*7", 30); r["result"] != float64(42) {
		t.Fatalf("run after restart: %v", r)
	}
	cVeths := sandboxVeths(t, c)
	tables := nftTables(t, cVeths)
	if len(tables) != 1 {
		t.Fatalf("sandbox %s's rules should live in one host table, found %v", c, tables)
	}

	// SIGTERM: a clean stop destroys the live sandboxes before exiting 0.
	if status, m = s2.do("POST", "/api/sandbox/"+c+"/run", s.key, map[string]any{"code": "while True: pass", "async": true}); status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	s2.awaitRun(s.key, c, m["run_id"].(string), "running")
	if err := s2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := s2.cmd.Wait(); err != nil {
		t.Fatalf("sandboxd exit after SIGTERM: %v", err)
	}
	if n := sandboxProcesses(t, c); n != 0 {
		t.Fatalf("%d sandbox processes outlive a clean stop", n)
	}
	if d := cgroupDirs(c); len(d) != 0 {
		t.Fatalf("cgroups outlive a clean stop: %v", d)
	}
	if left := networkLeft(t, cVeths); len(left) != 0 {
		t.Fatalf("network outlives a clean stop: %v", left)
	}
	if left := tablesLeft(t, tables); len(left) != 0 {
		t.Fatalf("host table %s outlives a clean stop", left[0])
	}
	s3 := startServer(t, dir)
	_, m = s3.do("GET", "/api/sandbox/"+c, s.key, nil)
	if m["status"] != "destroyed" || m["destroy_reason"] != "server_restart" {
		t.Fatalf("sandbox after a clean stop: %v", m)
	}
	_, m = s3.do("GET", "/api/sandbox/"+c+"/runs?limit=1", s.key, nil)
	if runs := m["runs"].([]any); runs[0].(map[string]any)["status"] != "cancelled" {
		t.Fatalf("run cut by a clean stop: %v", runs[0])
	}
}
