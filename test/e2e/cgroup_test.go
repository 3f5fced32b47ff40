package e2e

import (
	"testing"
	"time"
)

// spinCode forks two processes that each spin for 1.5 s of wall time and sets result to the CPU
// time they used per second of wall time (1.0 = one core).
const spinCode = `import os, time
def spin(sec):
    end = time.time() + sec
    while time.time() < end:
        pass
t0, c0 = time.time(), os.times()
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        spin(1.5)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
c1 = os.times()
result = (c1.children_user + c1.children_system - c0.children_user - c0.children_system) / (time.time() - t0)`

// TestCgroupLimits: the cpu quota holds two spinning processes to the sandbox's share (cgroup v1
// cpu.cfs_quota_us, v2 cpu.max), the run reports its CPU time, and delete leaves no cgroup and no
// process behind. (Memory (typed oom) and the pids limit: TestResourceLimits.)
func TestCgroupLimits(t *testing.T) {
	hostOnly(t, "reads the sandbox's cgroup on the host (pods: the kubelet's; TestResourceLimits runs)")
	s := sharedServer(t)
	pro := s.newKey("e2e-cgroup", "pro")
	id := s.create(pro, map[string]any{"resources": map[string]any{"cpu": "0.5"}, "process": map[string]any{"allow_spawn": true}})
	r := s.run(pro, id, spinCode, 60)
	cores, _ := r["result"].(float64)
	if r["status"] != "completed" || cores <= 0 || cores > 0.65 {
		t.Fatalf("two spinning processes under cpu 0.5 used %.2f cores (want ≤ 0.65): %v", cores, r)
	}
	t.Logf("cpu 0.5: two spinning processes used %.2f cores", cores)
	if u, _ := r["usage"].(map[string]any); u == nil || u["cpu_ms"].(float64) < 100 {
		t.Errorf("the run's usage does not show the CPU it used: %v", r["usage"])
	}
	if n := sandboxProcesses(t, id); n == 0 {
		t.Fatal("the sandbox has no processes in its cgroup: the checks below would prove nothing")
	}
	if d := cgroupDirs(id); len(d) == 0 {
		t.Fatal("the sandbox's cgroup is not where cgroupDirs looks: the checks below would prove nothing")
	}
	if status, m := s.do("DELETE", "/api/sandbox/"+id, pro, nil); status != 200 && status != 204 {
		t.Fatalf("delete: %d %v", status, m)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(cgroupDirs(id)) > 0 || sandboxProcesses(t, id) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("10 s after delete: cgroups %v, %d processes", cgroupDirs(id), sandboxProcesses(t, id))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
