package e2e

import (
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

// TestReplicasQuota: 50 parallel creates of one Free account, spread over two replicas on one
// database, make exactly 3 sandboxes; the other 47 are refused with the API's 429.
func TestReplicasQuota(t *testing.T) {
	reps, url := replicas(t, 2)
	key := keyFor(t, url, "e2e-replicas-free", "free")
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	created := map[*server][]string{}
	for i := range 50 {
		s := reps[i%2]
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
	_, ev := b.do("GET", "/api/audit?type=sandbox.destroyed", key, nil)
	if ev["total"] != float64(1) {
		t.Fatalf("sandbox.destroyed events: %v", ev)
	}
	// The surviving replica serves on.
	c := b.create(key, nil)
	if r := b.run(key, c, "result = 6*7", 30); r["result"] != float64(42) {
		t.Fatalf("run on the surviving replica: %v", r)
	}
}
