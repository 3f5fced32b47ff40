package e2e

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// driverSandboxes lists the sandboxes the container driver of the server on dataDir holds.
func driverSandboxes(dataDir string) []string {
	ents, _ := os.ReadDir(filepath.Join(dataDir, "container", "sandboxes"))
	var ids []string
	for _, e := range ents {
		ids = append(ids, e.Name())
	}
	return ids
}

// waitWarm waits until the server reports want warm (ready, unowned) container sandboxes and its
// driver holds that many besides owned, and returns those.
func waitWarm(t *testing.T, s *server, want int, owned ...string) []string {
	t.Helper()
	var warm []string
	if !waitfor.Until(60*time.Second, func() bool {
		if warmContainers(s) != want {
			return false
		}
		warm = slices.DeleteFunc(driverSandboxes(s.dataDir), func(id string) bool { return slices.Contains(owned, id) })
		return len(warm) == want
	}) {
		t.Fatalf("warm sandboxes: the server reports %d, its driver holds %v besides %v; want %d", warmContainers(s), warm, owned, want)
	}
	return warm
}

// warmContainers is how many warm container sandboxes the server reports (-1: no such gauge).
func warmContainers(s *server) int {
	const gauge = `sandboxd_sandboxes{mode="container",status="warm"} `
	for _, l := range strings.Split(s.metrics(), "\n") {
		if v, ok := strings.CutPrefix(l, gauge); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				return -1
			}
			return n
		}
	}
	return -1
}

// assertReleased fails unless nothing of the given sandboxes is left on the host.
func assertReleased(t *testing.T, dataDir string, ids, veths []string) {
	t.Helper()
	for _, id := range ids {
		if n := sandboxProcesses(t, id); n != 0 {
			t.Errorf("%d processes of sandbox %s left", n, id)
		}
	}
	if d := cgroupDirs(ids...); len(d) != 0 {
		t.Errorf("cgroups left: %v", d)
	}
	if left := networkLeft(t, veths); len(left) != 0 {
		t.Errorf("network left: %v", left)
	}
	if left := driverSandboxes(dataDir); len(left) != 0 {
		t.Errorf("driver state left: %v", left)
	}
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "sandboxes")); len(ents) != 0 {
		t.Errorf("sandbox dirs left: %d", len(ents))
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(dataDir)) {
		t.Errorf("mounts of the data dir left")
	}
}

// TestWarmPool: the server keeps sandboxes of the shape asked for ready; a create of that shape
// takes one — with its own allow list, its own paths, every rule — and a clean stop or a crash
// leaves nothing of the warm ones.
func TestWarmPool(t *testing.T) {
	hostOnly(t, "counts the container driver's sandboxes on the host")
	requireEnv(t)
	dir := t.TempDir()
	s := startServer(t, dir)
	key := s.newKey("e2e-warm", "pro")
	cfg := func(host string) map[string]any {
		return map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}},
			"network": map[string]any{"allow": []string{host}}}
	}
	a := s.create(key, cfg("api.company.com"))
	warm := waitWarm(t, s, 2, a)
	b := s.create(key, cfg("other.example"))
	if !slices.Contains(warm, b) {
		t.Fatalf("create got %s, not one of the warm sandboxes %v", b, warm)
	}
	_, ev := s.do("GET", "/api/audit?type=sandbox.ready&sandbox_id="+b, key, nil)
	if evs, _ := ev["events"].([]any); len(evs) != 1 || evs[0].(map[string]any)["detail"].(map[string]any)["warm"] != true {
		t.Fatalf("ready event of a warm sandbox: %v", ev)
	}
	r := s.run(key, b, `import os
open('/workspace/out/f', 'w').write('from a warm sandbox')
result = {"procs": len([p for p in os.listdir('/proc') if p.isdigit()]), "uid": os.getuid(),
          "proxy": os.environ.get("HTTPS_PROXY", ""), "tmp": os.listdir('/tmp'), "out": os.listdir('/workspace/out')}`, 30)
	res, _ := r["result"].(map[string]any)
	if r["status"] != "completed" || res["procs"] != float64(2) || res["uid"] != float64(10000) || res["proxy"] == "" ||
		len(res["tmp"].([]any)) != 0 || fmt.Sprint(res["out"]) != "[f]" {
		t.Fatalf("run in a warm sandbox: %v", r)
	}
	resp := s.raw("GET", filesURL(b, "/workspace/out/f"), key, nil)
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(got) != "from a warm sandbox" {
		t.Fatalf("the warm sandbox's mount holds %q", got)
	}
	// The pool refills; everything is released by a clean stop.
	all := append(waitWarm(t, s, 2, a, b), a, b)
	veths := sandboxVeths(t, all...)
	if len(veths) != 4 {
		t.Fatalf("veths of %v: %v", all, veths)
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Wait(); err != nil {
		t.Fatalf("sandboxd exit after SIGTERM: %v", err)
	}
	assertReleased(t, dir, all, veths)

	// After a crash, the next start removes the warm sandboxes the dead process left.
	s2 := startServer(t, dir)
	c := s2.create(key, nil)
	warm = waitWarm(t, s2, 2, c)
	veths = sandboxVeths(t, append(warm, c)...)
	if err := s2.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = s2.cmd.Wait()
	s3 := startServer(t, dir)
	s3.stop()
	assertReleased(t, dir, append(warm, c), veths)
}
