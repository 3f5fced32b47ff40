package wasm

// Tests of the driver's mechanics with the probe module (testdata/probe) in place of python.wasm:
// timeouts, cancellation, output, worker crashes, filesystem rules, the memory cap.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
)

func TestRegistered(t *testing.T) {
	if !slices.Contains(driver.Names(), "wasm") {
		t.Fatalf("driver.Names() = %v, want wasm in it", driver.Names())
	}
}

func TestProbeRun(t *testing.T) {
	d := openDriver(t, "probe")
	spec := baseSpec(t, probeImage)
	id := harness.Sandbox(t, d, spec)
	res := probe(t, d, id, 10*time.Second, "print:hello", "env:HOME", "env:PYTHONHOME", "exit:3")
	got := probeLines(res)
	if res.Status != driver.StatusFailed || res.ExitCode != 3 {
		t.Errorf("status %s exit %d, want failed 3", res.Status, res.ExitCode)
	}
	if got["env:HOME"] != "ok /tmp" || got["env:PYTHONHOME"] != "ok /usr/local" || !strings.HasPrefix(string(res.Stdout), "hello\n") {
		t.Errorf("stdout %q", res.Stdout)
	}
	if res.MemoryPeak <= 0 || res.Duration <= 0 || res.Started.IsZero() {
		t.Errorf("memory peak %d, duration %v, started %v", res.MemoryPeak, res.Duration, res.Started)
	}
	if _, err := d.Exec(context.Background(), "t-nosuchsandbox", driver.ExecRequest{Code: "print(1)"}); err != driver.ErrNotFound {
		t.Errorf("exec in unknown sandbox: %v, want ErrNotFound", err)
	}
	// The worker: the sandbox's own unprivileged host user, no capabilities, its own process
	// group, in the sandbox's cgroup.
	b, _ := d.lookup(id)
	pid := workerPid(t, b)
	// Every thread: credentials and no_new_privs are per thread, and the Go runtime starts
	// threads before the worker drops its privileges.
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("worker %d's threads: %v", pid, err)
	}
	ids := strings.Repeat(fmt.Sprintf("\t%d", spec.HostIDs+driver.SandboxUser), 4)
	for _, task := range tasks {
		st, err := os.ReadFile(task)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"Uid:" + ids, "Gid:" + ids, "CapEff:\t0000000000000000", "CapPrm:\t0000000000000000", "NoNewPrivs:\t1"} {
			if !strings.Contains(string(st), want) {
				t.Errorf("worker thread %s lacks %q:\n%s", task, want, st)
			}
		}
		for _, l := range strings.Split(string(st), "\n") {
			if g, ok := strings.CutPrefix(l, "Groups:"); ok && strings.TrimSpace(g) != "" {
				t.Errorf("worker thread %s has supplementary groups: %s", task, g)
			}
		}
	}
	if pgid, _ := syscall.Getpgid(pid); pgid != pid {
		t.Errorf("worker pgid %d, want its own group %d", pgid, pid)
	}
	if procs := processesIn(sandboxGroup(t, d, id)); len(procs) != 1 || procs[0] != pid {
		t.Errorf("processes in the sandbox's cgroup %v, want the worker %d", procs, pid)
	}
}

// TestProbeKill: timeouts and cancellation end the run on time, whatever the guest does (package
// worker's trap 2: sleeping; a busy loop), and the sandbox keeps working with a fresh worker in the same cgroup.
func TestProbeKill(t *testing.T) {
	d := openDriver(t, "probe")
	id := harness.Sandbox(t, d, baseSpec(t, probeImage))
	for _, tc := range []struct {
		name   string
		op     string
		cancel bool
		want   driver.Status
	}{
		{"sleep timeout", "sleep:100s", false, driver.StatusTimeout},
		{"spin timeout", "spin", false, driver.StatusTimeout},
		{"sleep cancel", "sleep:100s", true, driver.StatusCancelled},
		{"spin cancel", "spin", true, driver.StatusCancelled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := d.lookup(id)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			timeout := time.Second
			if tc.cancel {
				timeout = time.Minute
				time.AfterFunc(time.Second, cancel)
			}
			env, _ := buildEnv(nil)
			res, err := d.exec(ctx, b, protocol.Run{Env: env, Args: []string{"probe", "print:started", tc.op}}, driver.ExecRequest{Timeout: timeout})
			if err != nil {
				t.Fatal(err)
			}
			if res.Status != tc.want || res.ExitCode != 128+int(syscall.SIGKILL) {
				t.Errorf("status %s exit %d, want %s 137", res.Status, res.ExitCode, tc.want)
			}
			if !strings.Contains(string(res.Stdout), "started") {
				t.Errorf("output before the kill is lost: %q", res.Stdout)
			}
			if tc.op == "spin" && res.CPU < 100*time.Millisecond {
				t.Errorf("CPU %v of a second of spinning", res.CPU)
			}
			res = probe(t, d, id, 10*time.Second, "print:again")
			if res.Status != driver.StatusCompleted || !strings.HasPrefix(string(res.Stdout), "again\n") {
				t.Fatalf("next run: %s %q %q", res.Status, res.Stdout, res.Stderr)
			}
			if procs := processesIn(sandboxGroup(t, d, id)); len(procs) != 1 {
				t.Errorf("processes in the sandbox's cgroup: %v, want its one worker", procs)
			}
		})
	}
}

// TestProbeCPUQuota: a sandbox with cpu 0.5 gets half a core.
func TestProbeCPUQuota(t *testing.T) {
	d := openDriver(t, "probe")
	spec := baseSpec(t, probeImage)
	spec.CPU = 0.5
	id := harness.Sandbox(t, d, spec)
	res := probe(t, d, id, 2*time.Second, "spin")
	if res.Status != driver.StatusTimeout {
		t.Fatalf("status %s", res.Status)
	}
	cores := res.CPU.Seconds() / 2
	if cores > 0.6 {
		t.Errorf("spinning for 2 s used %v of CPU (%.2f cores), want at most 0.5", res.CPU, cores)
	}
	// Below 0.5 only when the machine is busy: the quota is a ceiling.
	t.Logf("spinning for 2 s under a quota of 0.5 cores used %.2f cores", cores)
}

// TestProbeWorkerCrash: a worker killed from outside, between runs or during one, never takes
// the driver down, and the sandbox's next run works.
func TestProbeWorkerCrash(t *testing.T) {
	d := openDriver(t, "probe")
	id := harness.Sandbox(t, d, baseSpec(t, probeImage))
	b, _ := d.lookup(id)
	pid := func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.w == nil {
			return 0
		}
		return b.w.pid
	}

	// Between runs.
	w := currentWorker(t, b)
	syscall.Kill(w.pid, syscall.SIGKILL)
	waitExited(t, w)
	if res := probe(t, d, id, 10*time.Second, "print:1"); res.Status != driver.StatusCompleted {
		t.Fatalf("after the worker was killed between runs: %s %q", res.Status, res.Stderr)
	}

	// During a run: the run is an error of the driver (not of the code), the next run works.
	p := pid()
	time.AfterFunc(500*time.Millisecond, func() { syscall.Kill(p, syscall.SIGKILL) })
	env, _ := buildEnv(nil)
	_, err := d.exec(context.Background(), b, protocol.Run{Env: env, Args: []string{"probe", "sleep:10s"}}, driver.ExecRequest{Timeout: 20 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "wasm worker died") {
		t.Fatalf("run whose worker was killed: err %v, want wasm worker died", err)
	}
	if res := probe(t, d, id, 10*time.Second, "print:1"); res.Status != driver.StatusCompleted {
		t.Fatalf("after the worker was killed during a run: %s %q", res.Status, res.Stderr)
	}
}

// TestProbeOutput: output streams as it is written, is kept up to MaxOutput per stream and
// flagged beyond.
func TestProbeOutput(t *testing.T) {
	d := openDriver(t, "probe")
	id := harness.Sandbox(t, d, baseSpec(t, probeImage))
	b, _ := d.lookup(id)
	env, _ := buildEnv(nil)
	var streamed [2]int
	var firstAt time.Time
	res, err := d.exec(context.Background(), b, protocol.Run{Env: env, MaxOutput: 100000, Args: []string{"probe", "stdout:250000", "stderr:5000", "sleep:1s"}},
		driver.ExecRequest{Timeout: 10 * time.Second, OnOutput: func(s driver.Stream, p []byte) {
			if firstAt.IsZero() {
				firstAt = time.Now()
			}
			if s == driver.Stdout {
				streamed[0] += len(p)
			} else {
				streamed[1] += len(p)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	ended := time.Now()
	if len(res.Stdout) != 100000 || !res.StdoutTruncated {
		t.Errorf("stdout %d bytes truncated %v, want 100000 true", len(res.Stdout), res.StdoutTruncated)
	}
	if len(res.Stderr) != 5000 || res.StderrTruncated {
		t.Errorf("stderr %d bytes truncated %v, want 5000 false", len(res.Stderr), res.StderrTruncated)
	}
	if streamed != [2]int{100000, 5000} {
		t.Errorf("streamed %v", streamed)
	}
	// The guest writes, then sleeps 1 s: output streamed arrives before that sleep, output held
	// back arrives with the end. Half the sleep tells them apart whatever the machine's load.
	if ended.Sub(firstAt) < 500*time.Millisecond {
		t.Errorf("first output arrived %v before the run's end, which the guest's 1 s sleep follows: not streamed", ended.Sub(firstAt))
	}
}

// TestProbeFilesystem: the WASI mounts and nothing else. Writes to read-only mounts fail; blocked
// paths and every host path outside the mounts are unreachable, through "..", through symlinks
// the guest tries to create, and through symlinks already in a host directory.
func TestProbeFilesystem(t *testing.T) {
	d := openDriver(t, "probe")
	root := t.TempDir()
	mk := func(rel, content string) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, rel string) {
		if err := os.Symlink(target, filepath.Join(root, rel)); err != nil {
			t.Fatal(err)
		}
	}
	mk("outside/secret.txt", "host-secret")
	mk("ws/file.txt", "ws-file")
	mk("ws/secret/s.txt", "blocked-secret")
	mk("ws/sub/secret/t.txt", "nested-name")
	mk("ro/r.txt", "ro-file")
	mk("plain/file.txt", "plain-file")
	link(filepath.Join(root, "outside/secret.txt"), "ws/link-abs")
	link("../outside/secret.txt", "ws/link-rel")
	link("secret/s.txt", "ws/link-blocked")
	link(filepath.Join(root, "outside/secret.txt"), "plain/link-abs")
	link("../outside/secret.txt", "plain/link-rel")
	link("../outside", "plain/link-dir")
	link("file.txt", "plain/link-inside")
	link("/proc/self/root/etc/hostname", "plain/link-proc")

	spec := baseSpec(t, probeImage)
	spec.Mounts = []driver.Mount{
		{Path: "/workspace", HostDir: filepath.Join(root, "ws")},
		{Path: "/workspace/ro", HostDir: filepath.Join(root, "ro"), ReadOnly: true},
		{Path: "/plain", HostDir: filepath.Join(root, "plain")},
		{Path: "/etc/inside-blocked", HostDir: filepath.Join(root, "plain")},
	}
	spec.Blocked = []string{"/workspace/secret", "/etc"}
	id := harness.Sandbox(t, d, spec)

	// Refusals, as WASI's errno texts say them (lower-cased): EACCES, EPERM, ENOENT, EROFS, ELOOP,
	// ENOTDIR, EBADF (a path under no mount: wasi-libc finds no directory to resolve it in).
	denied := []string{"permission denied", "operation not permitted", "no such file", "read-only", "too many symbolic links", "not a directory", "bad file"}
	for _, tc := range []struct {
		op   string
		want string // "ok", "ok <data>", "denied" (any refusal), or an error substring
	}{
		// Mounts work.
		{"read:/workspace/file.txt", "ok ws-file"},
		{"write:/workspace/new.txt:1", "ok"},
		{"read:/workspace/ro/r.txt", "ok ro-file"},
		{"read:/plain/link-inside", "ok plain-file"},
		{"write:/tmp/t.txt:tmp", "ok"},
		{"read:/usr/local/lib/python3.11/marker.py", "ok marker"},
		// Read-only.
		{"write:/workspace/ro/r.txt:x", "read-only"},
		{"write:/workspace/ro/new.txt:x", "read-only"},
		{"mkdir:/workspace/ro/d", "read-only"},
		{"remove:/workspace/ro/r.txt", "read-only"},
		{"rename:/workspace/ro/r.txt:/workspace/ro/s.txt", "read-only"},
		{"write:/usr/local/lib/python3.11/marker.py:x", "read-only"},
		{"write:/usr/local/lib/new.py:x", "read-only"},
		// Blocked inside a mount: absent under every name.
		{"read:/workspace/secret/s.txt", "no such file"},
		{"stat:/workspace/secret", "no such file"},
		{"ls:/workspace/secret", "no such file"},
		{"read:/workspace/link-blocked", "denied"},
		{"mkdir:/workspace/secret", "permission denied"},
		{"write:/workspace/secret:x", "permission denied"},
		{"rename:/workspace/secret:/workspace/moved", "denied"},
		{"remove:/workspace/secret/s.txt", "no such file"},
		{"read:/workspace/sub/secret/t.txt", "ok nested-name"},
		// Blocked outside the mounts, and a mount inside a blocked path: not there.
		{"read:/etc/hostname", "denied"},
		{"ls:/etc/inside-blocked", "denied"},
		{"read:/etc/inside-blocked/file.txt", "denied"},
		// Host paths outside the mounts.
		{"ls:/", "denied"},
		{"read:/proc/self/environ", "denied"},
		{"read:" + filepath.Join(root, "outside/secret.txt"), "denied"},
		{"read:/workspace/../outside/secret.txt", "denied"},
		{"read:/workspace/../../../../" + filepath.Join(root, "outside/secret.txt"), "denied"},
		{"read:/tmp/../workspace/file.txt", "ok ws-file"}, // ".." inside the guest's own tree is fine
		// Symlinks already on the host side.
		{"read:/workspace/link-abs", "denied"},
		{"read:/workspace/link-rel", "denied"},
		{"read:/plain/link-abs", "denied"},
		{"read:/plain/link-rel", "denied"},
		{"read:/plain/link-dir/secret.txt", "denied"},
		{"ls:/plain/link-dir", "denied"},
		{"read:/plain/link-proc", "denied"},
		{"write:/plain/link-rel:overwrite", "denied"},
		// Links the guest tries to make (package worker's trap 1).
		{"symlink:../outside/secret.txt:/plain/evil", "operation not permitted"},
		{"symlink:/:/plain/evil2", "operation not permitted"},
		{"symlink:file.txt:/plain/evil3", "operation not permitted"},
		{"symlink:..:/tmp/up", "operation not permitted"},
		{"link:/plain/file.txt:/plain/hard", "operation not permitted"},
		{"read:/plain/evil", "no such file"},
	} {
		t.Run(strings.ReplaceAll(tc.op, "/", "_"), func(t *testing.T) {
			res := probe(t, d, id, 10*time.Second, tc.op)
			got := strings.ToLower(probeLines(res)[tc.op])
			switch {
			case tc.want == "denied":
				if !strings.HasPrefix(got, "err ") || !slices.ContainsFunc(denied, func(s string) bool { return strings.Contains(got, s) }) {
					t.Errorf("%s: got %q, want a refusal", tc.op, got)
				}
			case strings.HasPrefix(tc.want, "ok"):
				if got != strings.ToLower(tc.want) {
					t.Errorf("%s: got %q, want %q", tc.op, got, tc.want)
				}
			default:
				if !strings.HasPrefix(got, "err ") || !strings.Contains(got, tc.want) {
					t.Errorf("%s: got %q, want an error with %q", tc.op, got, tc.want)
				}
			}
		})
	}
	// Listings leave blocked names out; files outside were never touched.
	if got := probeLines(probe(t, d, id, 10*time.Second, "ls:/workspace"))["ls:/workspace"]; strings.Contains(got, "secret,") || strings.HasSuffix(got, "secret") || !strings.Contains(got, "file.txt") {
		t.Errorf("ls /workspace: %q", got)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "outside/secret.txt")); string(b) != "host-secret" {
		t.Errorf("host file outside the mounts changed: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "ws/new.txt")); string(b) != "1" {
		t.Errorf("write to the read-write mount did not reach the host: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(root, "plain/evil")); err == nil {
		t.Errorf("the guest created a symlink on the host")
	}
}

// TestProbeMemoryCap: the guest cannot grow its memory past the sandbox's cap, and the worker's
// RSS stays near the cap (package worker's trap 4).
func TestProbeMemoryCap(t *testing.T) {
	d := openDriver(t, "probe")
	spec := baseSpec(t, probeImage)
	spec.MemoryBytes = 256 << 20
	id := harness.Sandbox(t, d, spec)
	b, _ := d.lookup(id)
	env, _ := buildEnv(nil)
	pid := workerPid(t, b)
	resetPeakRSS(t, pid)
	res, err := d.exec(context.Background(), b, protocol.Run{Env: env, Args: []string{"probe", "grow:1024"}}, driver.ExecRequest{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	peakRSS := peakRSSOf(t, pid)
	if res.Status == driver.StatusCompleted {
		t.Fatalf("the guest allocated 1 GiB under a 256 MiB cap")
	}
	if res.MemoryPeak > spec.MemoryBytes {
		t.Errorf("memory peak %d over the cap %d", res.MemoryPeak, spec.MemoryBytes)
	}
	if limit := spec.MemoryBytes * 3 / 2; peakRSS >= limit {
		t.Errorf("worker RSS peaked at %d MiB, want below 1.5 × the cap (%d MiB)", peakRSS>>20, limit>>20)
	}
	t.Logf("status %s exit %d, memory peak %d MiB, worker RSS peak %d MiB", res.Status, res.ExitCode, res.MemoryPeak>>20, peakRSS>>20)
}

// workerPid returns the pid of sandbox b's current worker.
func workerPid(t testing.TB, b *box) int {
	t.Helper()
	return currentWorker(t, b).pid
}

// currentWorker returns sandbox b's current worker.
func currentWorker(t testing.TB, b *box) *proc {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w == nil {
		t.Fatal("the sandbox has no worker")
	}
	return b.w
}

// waitExited returns once the driver has seen worker w exit.
func waitExited(t testing.TB, w *proc) {
	t.Helper()
	select {
	case <-w.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("worker %d: not seen to exit in 30 s", w.pid)
	}
}

// resetPeakRSS resets the kernel's record of process pid's peak RSS (VmHWM).
func resetPeakRSS(t testing.TB, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatal(err)
	}
}

// peakRSSOf returns process pid's peak RSS (VmHWM) in bytes.
func peakRSSOf(t testing.TB, pid int) int64 {
	t.Helper()
	return procStatus(t, pid, "VmHWM")
}

// procStatus returns a "kB" field of /proc/<pid>/status, in bytes.
func procStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// TestProbeUnreadableMount: a mount whose directory the worker may not read (changed on the host
// side after Create) does not stop the instance from starting; only that mount fails.
func TestProbeUnreadableMount(t *testing.T) {
	d := openDriver(t, "probe")
	dir := t.TempDir()
	spec := baseSpec(t, probeImage)
	spec.Mounts = []driver.Mount{{Path: "/m", HostDir: dir}}
	id := harness.Sandbox(t, d, spec)
	if err := os.Chmod(dir, 0); err != nil {
		t.Fatal(err)
	}
	got := probeLines(probe(t, d, id, 10*time.Second, "print:up", "ls:/m"))
	if got["print:up"] != "ok" || !strings.Contains(strings.ToLower(got["ls:/m"]), "permission denied") {
		t.Errorf("got %v", got)
	}
}

// TestPool: Create takes idle workers and starts one itself when the pool is empty; Close kills
// the idle workers and removes their cgroups; a driver opening the same state dir removes the
// empty cgroups no sandbox owns.
func TestPool(t *testing.T) {
	drivertest.Need(t, "the wasm driver's tests", setupErr)
	exe, _ := os.Executable()
	stateDir := filepath.Join(tmpRoot, "state-pool")
	d, err := Open(driver.Options{StateDir: stateDir, WasmWorker: []string{exe, protocol.WorkerCommand}, WasmPool: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := d.Prepare(ctx, probeImage); err != nil {
		t.Fatal(err)
	}
	// Three creates in a row: the first takes the idle worker, the others cannot wait for the
	// filler and start their own.
	var ids []string
	for i := 0; i < 3; i++ {
		id := "t-" + statedir.RandomHex(8)
		if err := d.Create(ctx, id, baseSpec(t, probeImage)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
		if res := probe(t, d, id, 10*time.Second, "print:ok"); res.Status != driver.StatusCompleted {
			t.Fatalf("run in sandbox %d: %s", i, res.Status)
		}
	}
	for _, id := range ids {
		group := sandboxGroup(t, d, id)
		if err := d.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
		assertGone(t, d, id, group)
	}
	if err := d.Prepare(ctx, probeImage); err != nil {
		t.Fatal(err)
	}
	p, _ := d.poolFor(probeImage)
	var idle []*proc
	for len(p.idle) > 0 {
		idle = append(idle, <-p.idle)
	}
	for _, w := range idle {
		p.idle <- w
	}
	if len(idle) != 1 {
		t.Fatalf("%d idle workers, want 1", len(idle))
	}
	d.Close()
	for _, w := range idle {
		if w.alive() {
			t.Errorf("idle worker %d survives Close", w.pid)
		}
		for _, m := range d.cg.Mounts() {
			if _, err := os.Stat(cgroup.Dir(m, w.group)); err == nil {
				t.Errorf("cgroup %s of an idle worker survives Close", cgroup.Dir(m, w.group))
			}
		}
	}
	if err := d.Create(ctx, "t-"+statedir.RandomHex(8), baseSpec(t, probeImage)); err == nil {
		t.Error("Create after Close succeeded")
	}

	// A stale, empty cgroup of a pool worker of an earlier process.
	stale := d.cgParent + "/w-stale"
	if err := d.cg.Create(stale, cgroup.Limits{}); err != nil {
		t.Fatal(err)
	}
	d2, err := Open(driver.Options{StateDir: stateDir, WasmWorker: []string{exe, protocol.WorkerCommand}})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	for _, m := range d2.cg.Mounts() {
		if _, err := os.Stat(cgroup.Dir(m, stale)); err == nil {
			t.Errorf("stale cgroup %s survives Open", cgroup.Dir(m, stale))
		}
	}
}

// TestPrepareBrokenImage: Prepare reports an image whose module does not compile, and Check
// reports the failing pool.
func TestPrepareBrokenImage(t *testing.T) {
	drivertest.Need(t, "the wasm driver's tests", setupErr)
	image := filepath.Join(t.TempDir(), "broken")
	os.MkdirAll(filepath.Join(image, "lib", "python3.11"), 0o755)
	os.WriteFile(filepath.Join(image, "python.wasm"), []byte("not wasm"), 0o644)
	exe, _ := os.Executable()
	d, err := Open(driver.Options{StateDir: filepath.Join(tmpRoot, "state-broken"), WasmWorker: []string{exe, protocol.WorkerCommand}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := d.Prepare(ctx, image); err == nil || !strings.Contains(err.Error(), "compile") {
		t.Errorf("Prepare of a broken image: %v, want the compile error", err)
	}
	if err := d.Check(ctx); err == nil {
		t.Error("Check passes with a failing pool")
	}
}
