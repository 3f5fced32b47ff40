package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// replicas starts n sandboxd serve processes, each with its own data directory and port, on one
// new PostgreSQL database; it returns them and the database's URL.
func replicas(t *testing.T, n int) ([]*server, string) {
	t.Helper()
	requireEnv(t)
	url := pgtest.Shared(t).NewDatabase(t)
	var out []*server
	for range n {
		out = append(out, startServerWith(t, t.TempDir(), "--store", url, "--warm-pool", "0"))
	}
	return out, url
}

// keyFor creates an account's key with the CLI, on the shared database.
func keyFor(t *testing.T, url, account, plan string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "sandboxd"), "keys", "create", "--store", url,
		"--data-dir", t.TempDir(), "--account", account, "--plan", plan).Output()
	if err != nil {
		t.Fatalf("keys create --store: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

// burst makes n creates of key's account at once, the i-th through reps[i%len(reps)]; it returns
// how many got each status and the sandboxes made, by the replica that made them. A 429 must say
// concurrency_limit.
func burst(t *testing.T, reps []*server, key string, n int) (map[int]int, map[*server][]string) {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	created := map[*server][]string{}
	for i := range n {
		s := reps[i%len(reps)]
		wg.Go(func() {
			status, m := s.do("POST", "/api/sandbox/create", key, map[string]any{"agent_id": "burst"})
			mu.Lock()
			defer mu.Unlock()
			codes[status]++
			if status == 201 || status == 202 {
				created[s] = append(created[s], m["sandbox_id"].(string))
			} else if status == 429 && m["error"] != "concurrency_limit" {
				t.Errorf("429 with error %v, want concurrency_limit", m["error"])
			}
		})
	}
	wg.Wait()
	return codes, created
}

// TestReplicasQuota: 50 parallel creates of one Free account, spread over two replicas on one
// database, make exactly 3 sandboxes; the other 47 are refused with the API's 429.
func TestReplicasQuota(t *testing.T) {
	reps, url := replicas(t, 2)
	key := keyFor(t, url, "e2e-replicas-free", "free")
	codes, created := burst(t, reps, key, 50)
	for s, ids := range created { // each sandbox is deleted through the replica that owns it
		for _, id := range ids {
			s.do("DELETE", "/api/sandbox/"+id, key, nil)
		}
	}
	if codes[201]+codes[202] != 3 || codes[429] != 47 {
		t.Fatalf("status counts %v; want 3 created and 47×429", codes)
	}
}

// TestReplicaLost: a replica killed (kill -9) while a run of its sandbox runs: another replica
// records the run error, with a reason naming the lost replica, and the sandbox destroyed
// (replica_lost), within the staleness threshold.
func TestReplicaLost(t *testing.T) {
	reps, url := replicas(t, 2)
	a, b := reps[0], reps[1]
	key := keyFor(t, url, "e2e-replicas-lost", "pro")
	id := a.createReady(key, map[string]any{"agent_id": "lost"})
	status, m := a.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"code": "import time; time.sleep(60)", "async": true, "timeout": 120})
	if status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	runID := m["run_id"].(string)
	a.awaitRun(key, id, runID, "running")

	if err := a.cmd.Process.Kill(); err != nil { // kill -9
		t.Fatal(err)
	}
	_ = a.cmd.Wait()
	start := time.Now()
	// Until A is declared lost, B forwards to it: a run asked of B is refused as unavailable (503,
	// Retry-After), or, once the sweep recorded the sandbox ended, as destroyed (409).
	if st, m := b.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"code": "print(1)"}); !(st == 503 && m["error"] == "unavailable") && !(st == 409 && m["error"] == "sandbox_destroyed") {
		t.Fatalf("run through B while A is dead: %d %v", st, m)
	}

	// No upper bound but the staleness threshold's order: waitfor's is generous.
	var run map[string]any
	var polled time.Time
	waitfor.True(t, 5*time.Minute, func() bool {
		if time.Since(polled) < 200*time.Millisecond { // within the API key's rate limit
			return false
		}
		polled = time.Now()
		status, m := b.do("GET", "/api/sandbox/"+id+"/runs/"+runID, key, nil)
		run = m
		return status == 200 && run["status"] != "running"
	})
	t.Logf("the run was recorded ended %v after its replica was killed", time.Since(start).Round(time.Second))
	errObj, _ := run["error"].(map[string]any)
	if run["status"] != "error" || errObj["type"] != "ReplicaLost" ||
		!strings.Contains(errObj["message"].(string), "stopped heartbeating while the run ran") || run["finished_at"] == nil {
		t.Fatalf("run of the killed replica: %v", run)
	}
	_, sb := b.do("GET", "/api/sandbox/"+id, key, nil)
	if sb["status"] != "destroyed" || sb["destroy_reason"] != "replica_lost" {
		t.Fatalf("sandbox of the killed replica: %v", sb)
	}
	// The sweep writes the sandbox's end, then its audit event.
	var ev map[string]any
	if !waitfor.Until(time.Minute, func() bool {
		time.Sleep(200 * time.Millisecond) // within the API key's rate limit
		_, ev = b.do("GET", "/api/audit?type=sandbox.destroyed", key, nil)
		return ev["total"] == float64(1)
	}) {
		t.Fatalf("sandbox.destroyed events: %v", ev)
	}
	// The surviving replica serves on.
	c := b.create(key, nil)
	if r := b.run(key, c, "result = 6*7", 30); r["result"] != float64(42) {
		t.Fatalf("run on the surviving replica: %v", r)
	}
}

// TestReplicasRoute: every request for a sandbox may reach any replica. A sandbox created
// through replica A is read, run in (sync, async with its event stream, in a code context), given
// files and deleted through replica B, which forwards each request to A; B's forwards cross one
// hop only, and what B answers is what A would.
func TestReplicasRoute(t *testing.T) {
	reps, url := replicas(t, 2)
	a, b := reps[0], reps[1]
	key := keyFor(t, url, "e2e-replicas-route", "pro")
	a.key, b.key = key, key
	id := a.create(key, map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace"}}})

	if st, m := b.do("GET", "/api/sandbox/"+id, key, nil); st != 200 || m["status"] != "ready" {
		t.Fatalf("get through B: %d %v", st, m)
	}
	if r := b.run(key, id, "import os; result = os.getpid() > 0", 30); r["status"] != "completed" || r["result"] != true {
		t.Fatalf("run through B: %v", r)
	}
	if st, m := b.put(id, "/workspace/in.txt", []byte("through B")); st != 201 {
		t.Fatalf("upload through B: %d %v", st, m)
	}
	if st, body, _ := a.get(id, "/workspace/in.txt"); st != 200 || string(body) != "through B" {
		t.Fatalf("A reads the file B uploaded: %d %q", st, body)
	}

	// An async run through B, followed through B's forwarded event stream.
	st, m := b.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"async": true,
		"code": "print(open('/workspace/in.txt').read())"})
	if st != 202 {
		t.Fatalf("async run through B: %d %v", st, m)
	}
	runID := m["run_id"].(string)
	evs := b.events(id, runID, "")
	var out strings.Builder
	for _, e := range evs[:len(evs)-1] {
		out.WriteString(chunkText(e))
	}
	if evs[len(evs)-1].event != "end" || !strings.Contains(out.String(), "through B") {
		t.Fatalf("event stream through B carried %q; events %+v", out.String(), evs)
	}

	// A code context made through B keeps its state on A.
	st, m = b.do("POST", "/api/sandbox/"+id+"/contexts", key, map[string]any{})
	if st != 201 {
		t.Fatalf("context through B: %d %v", st, m)
	}
	ctxID := m["context_id"].(string)
	for i, c := range []struct{ code, want string }{{"x = 41", ""}, {"x += 1; result = x", "42"}} {
		st, r := b.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"code": c.code, "context": ctxID})
		if st != 200 || r["status"] != "completed" || (c.want != "" && r["result"] != float64(42)) {
			t.Fatalf("context run %d through B: %d %v", i, st, r)
		}
	}

	// A forwarded request is never forwarded again: B serves one marked forwarded itself, and has
	// no such sandbox running: it says the sandbox runs on A and ran nothing (503, try again — not
	// a false "destroyed", and a retry cannot run the code twice).
	runsOf := func() int {
		st, m := a.do("GET", "/api/sandbox/"+id+"/runs", key, nil)
		runs, ok := m["runs"].([]any)
		if st != 200 || !ok {
			t.Fatalf("runs through A: %d %v", st, m)
		}
		return len(runs)
	}
	before := runsOf()
	repA, err := os.ReadFile(filepath.Join(a.dataDir, "replica-id"))
	if err != nil {
		t.Fatal(err)
	}
	aID := strings.TrimSpace(string(repA))
	resp := b.raw("POST", "/api/sandbox/"+id+"/run", key, strings.NewReader(`{"code":"print(1)"}`),
		"Content-Type", "application/json", "X-Sandboxd-Forwarded-By", "rep_someone")
	var env struct{ Error, Message string }
	err = json.NewDecoder(resp.Body).Decode(&env)
	resp.Body.Close()
	if resp.StatusCode != 503 || err != nil || env.Error != "unavailable" || resp.Header.Get("Retry-After") != "5" ||
		env.Message != fmt.Sprintf("sandbox %q runs on replica %s, which did not take this request; try again", id, aID) {
		t.Fatalf("a request marked forwarded: %d %+v %v (Retry-After %q), want 503 unavailable naming replica %s",
			resp.StatusCode, env, err, resp.Header.Get("Retry-After"), aID)
	}
	if n := runsOf(); n != before {
		t.Fatalf("runs after the refused forward: %d, want the %d made before", n, before)
	}

	if st, m := b.do("DELETE", "/api/sandbox/"+id, key, nil); st != 200 && st != 202 && st != 204 {
		t.Fatalf("delete through B: %d %v", st, m)
	}
	if _, m := a.do("GET", "/api/sandbox/"+id, key, nil); m["status"] != "destroyed" {
		t.Fatalf("after delete through B, A says %v", m)
	}
	if st, _ := b.do("GET", "/api/sandbox/"+id, key, nil); st != 200 {
		t.Fatalf("a destroyed sandbox's record through B: %d", st)
	}
}
