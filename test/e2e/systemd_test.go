package e2e

import (
	"bytes"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// The unit under test and where the test installs it.
const (
	unitSource  = "../../deploy/sandboxd.service"
	unitPath    = "/etc/systemd/system/sandboxd.service"
	dropInPath  = "/etc/systemd/system/sandboxd.service.d/e2e.conf"
	envPath     = "/etc/sandboxd/sandboxd.env"
	unitDataDir = "/var/lib/sandboxd"
)

// TestSystemdService: deploy/sandboxd.service under systemd as PID 1 (the systemd VM of test/vm,
// SANDBOXD_VM_VARIANT=systemd). The unit starts sandboxd with the test's binaries (a drop-in
// replaces /usr/local/bin in the unit's own ExecStart) and images (its environment file);
// `systemctl stop` ends it with every sandbox destroyed and recorded by the stop, nothing left
// on the host; it starts again with nothing to reconcile; after `systemctl kill -s SIGKILL` the
// next start reconciles what the killed server left.
func TestSystemdService(t *testing.T) {
	hostOnly(t, "sandboxd as a systemd unit of this host")
	if os.Getenv("SANDBOXD_VM_VARIANT") != "systemd" {
		t.Skip("needs systemd as PID 1: runs in the systemd VM (test/vm)")
	}
	requireEnv(t)
	if comm, _ := os.ReadFile("/proc/1/comm"); strings.TrimSpace(string(comm)) != "systemd" {
		t.Fatalf("SANDBOXD_VM_VARIANT=systemd but PID 1 is %q", bytes.TrimSpace(comm))
	}
	unit, err := os.ReadFile(unitSource)
	if err != nil {
		t.Fatal(err)
	}
	var execStart string
	for _, l := range strings.Split(string(unit), "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			execStart = v
		}
	}
	if !strings.HasPrefix(execStart, "/usr/local/bin/sandboxd serve ") {
		t.Fatalf("the unit's ExecStart is %q", execStart)
	}
	addr := freeAddr(t)
	opts := "--image agentcop/agent-sandbox:latest=" + rootfs
	if wasmImage != "" {
		opts += " --wasm-image python:3.11-wasi=" + wasmImage
	}
	files := map[string]string{
		unitPath: string(unit),
		dropInPath: "[Service]\nExecStart=\nExecStart=" +
			strings.Replace(execStart, "/usr/local/bin/sandboxd", filepath.Join(binDir, "sandboxd"), 1) + "\n",
		envPath: "SANDBOXD_LISTEN=" + addr + "\nSANDBOXD_OPTS=" + opts + "\n",
	}
	t.Cleanup(func() {
		_ = exec.Command("systemctl", "stop", "sandboxd").Run()
		if t.Failed() {
			out, _ := exec.Command("journalctl", "-u", "sandboxd", "--no-pager", "-n", "200").CombinedOutput()
			t.Logf("journal of sandboxd.service:\n%s", out)
		}
		for p := range files {
			os.Remove(p)
		}
		os.Remove(filepath.Dir(dropInPath))
		_ = exec.Command("systemctl", "daemon-reload").Run()
		_ = exec.Command("systemctl", "reset-failed", "sandboxd").Run()
		os.RemoveAll(unitDataDir)
	})
	_ = exec.Command("systemctl", "stop", "sandboxd").Run()
	os.RemoveAll(unitDataDir)
	// The VM's /var/lib is on its root overlay, which cannot hold the upper layers of the
	// sandboxes' roots (a real host's /var/lib is ext4, xfs or btrfs): a tmpfs stands in for it.
	if err := os.MkdirAll(unitDataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", unitDataDir).CombinedOutput(); err != nil {
		t.Fatalf("tmpfs on %s: %v %s", unitDataDir, err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("systemctl", "stop", "sandboxd").Run()
		_ = exec.Command("umount", "-l", unitDataDir).Run()
	})
	for p, content := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	systemctl(t, "daemon-reload")
	// The unit as shipped, but for where the binary is (verify checks that it is executable).
	verified := filepath.Join(t.TempDir(), "sandboxd.service")
	if err := os.WriteFile(verified, []byte(strings.Replace(string(unit), "/usr/local/bin/sandboxd", filepath.Join(binDir, "sandboxd"), 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", verified).CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	s := &server{t: t, url: "http://" + addr, dataDir: unitDataDir, logs: &bytes.Buffer{}}
	since := time.Now()
	systemctl(t, "start", "sandboxd")
	pid := waitService(t, s, 0)
	for p, want := range map[string]string{"KillMode": "mixed", "Delegate": "yes", "TasksMax": "infinity"} {
		if got := unitProp(t, p); got != want {
			t.Errorf("%s=%s, want %s", p, got, want)
		}
	}
	key := s.newKey("svc", "pro")
	var ids []string
	for i := range 2 {
		id := s.createReady(key, map[string]any{"agent_id": "e2e"})
		if r := s.run(key, id, "result = "+strconv.Itoa(i+40), 60); r["result"] != float64(i+40) {
			t.Fatalf("run in %s: %v", id, r)
		}
		ids = append(ids, id)
	}
	// The sandboxes' cgroups are below the unit's own, delegated one (package cgroup, Delegate).
	for _, id := range ids {
		want := "/sys/fs/cgroup/system.slice/sandboxd.service/sandboxd/" + id
		if d := cgroupDirs(id); len(d) != 1 || d[0] != want {
			t.Errorf("sandbox %s's cgroups: %v, want %s", id, d, want)
		}
	}
	if j := journal(t, since); !strings.Contains(j, "cgroup=/system.slice/sandboxd.service") {
		t.Errorf("the journal does not name the delegated cgroup:\n%s", j)
	}
	// The pool is full (the default 2 warm sandboxes for the one shape asked for), which the stop
	// must destroy too: none is half made when the snapshot is taken (as in TestStop).
	waitWarm(t, s, 2, ids...)
	before := stopSnapshot(t, pid, unitDataDir, ids)

	// systemctl stop: SIGTERM to the main process only; sandboxd destroys and records.
	start := time.Now()
	systemctl(t, "stop", "sandboxd")
	t.Logf("systemctl stop: %v", time.Since(start).Round(time.Millisecond))
	if got := unitProp(t, "Result"); got != "success" {
		t.Errorf("Result=%s after systemctl stop, want success", got)
	}
	if got := unitProp(t, "ExecMainStatus"); got != "0" {
		t.Errorf("ExecMainStatus=%s after systemctl stop, want 0", got)
	}
	before.assertGone(t)
	assertRecordsEnded(t, unitDataDir, "svc", ids)
	if j := journal(t, since); !strings.Contains(j, "sandboxd stopped") || strings.Contains(j, "killed=true") {
		t.Errorf("the journal does not show a clean stop:\n%s", j)
	}

	// Started again: it serves, and has nothing to reconcile.
	since = time.Now()
	systemctl(t, "start", "sandboxd")
	pid = waitService(t, s, 0)
	for _, id := range ids {
		if _, m := s.do("GET", "/api/sandbox/"+id, key, nil); m["status"] != "destroyed" || m["destroy_reason"] != "server_restart" {
			t.Errorf("sandbox %s after the restart: %v", id, m)
		}
	}
	if j := journal(t, since); strings.Contains(j, "reconciled sandbox left live") {
		t.Errorf("the start after a clean stop reconciled sandboxes:\n%s", j)
	}

	// SIGKILL mid-life (every process of the unit): the next start reconciles.
	c := s.createReady(key, map[string]any{"agent_id": "e2e"})
	s.run(key, c, "print(1)", 60)
	since = time.Now()
	systemctl(t, "kill", "-s", "SIGKILL", "sandboxd")
	// The killed process is gone from the unit (MainPID 0, or already the one Restart=on-failure
	// started); start waits for a restart under way, or starts it.
	waitfor.True(t, 30*time.Second, func() bool { return unitProp(t, "MainPID") != strconv.Itoa(pid) })
	systemctl(t, "start", "sandboxd")
	waitService(t, s, pid)
	if _, m := s.do("GET", "/api/sandbox/"+c, key, nil); m["status"] != "destroyed" || m["destroy_reason"] != "server_restart" {
		t.Errorf("sandbox %s after SIGKILL and a start: %v", c, m)
	}
	if j := journal(t, since); !strings.Contains(j, "reconciled sandbox left live") || !strings.Contains(j, c) {
		t.Errorf("the start after SIGKILL did not reconcile %s:\n%s", c, j)
	}
	if n := sandboxProcesses(t, c); n != 0 {
		t.Errorf("%d processes of %s left after the reconciliation", n, c)
	}
	if d := cgroupDirs(c); len(d) != 0 {
		t.Errorf("cgroups of %s left after the reconciliation: %v", c, d)
	}
	systemctl(t, "stop", "sandboxd")
}

// systemctl runs systemctl and fails the test if it fails.
func systemctl(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("systemctl", args...).CombinedOutput(); err != nil {
		t.Fatalf("systemctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// unitProp returns a property of sandboxd.service.
func unitProp(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command("systemctl", "show", "-p", name, "--value", "sandboxd").Output()
	if err != nil {
		t.Fatalf("systemctl show %s: %v", name, err)
	}
	return strings.TrimSpace(string(out))
}

// waitService waits until the service's main process is not old and the API answers /health;
// it returns the main PID.
func waitService(t *testing.T, s *server, old int) int {
	t.Helper()
	var pid int
	waitfor.True(t, 60*time.Second, func() bool {
		pid, _ = strconv.Atoi(unitProp(t, "MainPID"))
		if pid == 0 || pid == old {
			return false
		}
		resp, err := http.Get(s.url + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return pid
}

// journal returns sandboxd.service's journal since t0.
func journal(t *testing.T, t0 time.Time) string {
	t.Helper()
	out, err := exec.Command("journalctl", "-u", "sandboxd", "--no-pager", "-o", "cat",
		"--since", t0.Add(-time.Second).Format("2006-01-02 15:04:05")).CombinedOutput()
	if err != nil {
		t.Fatalf("journalctl: %v\n%s", err, out)
	}
	return string(out)
}
