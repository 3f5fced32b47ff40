package e2e

// The adversarial suite: sandbox code as an attacker writes it, against a real server with two
// tenants, in both modes. Each attack of the tenancy issue (and others of the same classes) is
// tried; each must be refused, and every sandbox involved must still work afterwards. The threat
// model in ARCHITECTURE.md names the test of each boundary.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// tenants is a server with two accounts, each on the pro plan (small disks are allowed on any
// plan; pro allows more than three sandboxes at once).
type tenants struct {
	s                *server
	attacker, victim string // API keys
}

// forModes runs f as a subtest per mode (wasm when python.wasm is there: startTenants fails
// under CI without it).
func (tn *tenants) forModes(t *testing.T, f func(t *testing.T, mode string)) {
	for _, mode := range []string{"container", "wasm"} {
		t.Run(mode, func(t *testing.T) {
			if mode == "wasm" {
				hostOnly(t, "WASM sandboxes run in the service's own process")
			}
			if mode == "wasm" && wasmImage == "" {
				t.Skip("needs SANDBOXD_PYTHON_WASM (make test)")
			}
			tn.s.t = t
			f(t, mode)
		})
	}
}

func startTenants(t *testing.T) *tenants {
	t.Helper()
	requireEnv(t)
	dir, err := os.MkdirTemp("", "sbxd-adv-") // short: socket paths have a length limit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var extra []string
	if wasmImage != "" {
		extra = []string{"--wasm-image", "python:3.11-wasi=" + wasmImage}
	} else if os.Getenv("CI") != "" {
		t.Fatal("CI is set but SANDBOXD_PYTHON_WASM is not (make test builds python.wasm and sets it)")
	}
	s := startServerWith(t, dir, extra...)
	return &tenants{s: s, attacker: s.newKey("attacker", "pro"), victim: s.newKey("victim", "pro")}
}

// sandbox creates a sandbox of key's account; mode "" is container.
func (tn *tenants) sandbox(key, mode string, cfg map[string]any) string {
	tn.s.t.Helper()
	status, m := tn.s.awaitReady(key)(tn.s.do("POST", "/api/sandbox/create", key, map[string]any{"agent_id": "adversary", "mode": mode, "config": cfg}))
	if status != 201 || m["status"] != "ready" {
		tn.s.t.Fatalf("create: %d %v", status, m)
	}
	id := m["sandbox_id"].(string)
	tn.s.t.Cleanup(func() { tn.s.do("DELETE", "/api/sandbox/"+id, key, nil) })
	return id
}

// result runs code and returns its `result`, JSON-decoded into v; the run must complete.
func (tn *tenants) result(key, id, code string, v any) {
	tn.s.t.Helper()
	r := tn.s.run(key, id, code, 120)
	if r["status"] != "completed" {
		tn.s.t.Fatalf("run: %v", r)
	}
	b, _ := json.Marshal(r["result"])
	if err := json.Unmarshal(b, v); err != nil {
		tn.s.t.Fatalf("result %s: %v", b, err)
	}
}

// healthy requires a sandbox to run code as before.
func (tn *tenants) healthy(key, id string) {
	tn.s.t.Helper()
	if r := tn.s.run(key, id, "import json, csv\nresult = 6*7", 60); r["status"] != "completed" || r["result"] != float64(42) {
		tn.s.t.Fatalf("the sandbox does not work any more: %v", r)
	}
}

func (tn *tenants) file(key, id, p string) (int, []byte) {
	resp := tn.s.raw("GET", filesURL(id, p), key, nil)
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.Bytes()
}

func (tn *tenants) upload(key, id, p string, data []byte) (int, map[string]any) {
	resp := tn.s.raw("PUT", filesURL(id, p), key, bytes.NewReader(data))
	defer resp.Body.Close()
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// hijack is the agent-channel attack: find anything that leads to an agent (sockets, the old
// socket directory, host paths in mountinfo, other PIDs), plant symlinks where the old socket was,
// and report what was found and done.
const hijack = `
import os, stat
found, planted = [], []
for root, dirs, files in os.walk("/"):
    if root in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for n in dirs + files:
        p = os.path.join(root, n)
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                found.append(p)
        except OSError:
            pass
for p in ("/.sandbox/run/agent.sock", "/.sandbox/agent.sock", "/tmp/agent.sock", "/.sandbox/work/agent.sock"):
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.remove(p)
        os.symlink("/proc/1/root/tmp", p)
        planted.append(p)
    except OSError:
        pass
result = {"sockets": found, "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
          "self": os.getpid(), "mountinfo": open("/proc/self/mountinfo").read(), "planted": planted}
`

// TestAttackAgentChannel: the critical hole of the issue — a run made to execute in another
// tenant's sandbox through a planted agent socket. Nothing in a sandbox leads to an agent; the
// runs of both tenants land where they are sent.
func TestAttackAgentChannel(t *testing.T) {
	tn := startTenants(t)
	cfg := map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}}}
	victim := tn.sandbox(tn.victim, "", cfg)
	attacker := tn.sandbox(tn.attacker, "", cfg)
	tn.s.run(tn.victim, victim, "open('/workspace/out/victim', 'w').write('v')", 30)
	for round := range 3 {
		var got struct {
			Sockets, Planted []string
			Pids             []int
			Self             int
			Mountinfo        string
		}
		tn.result(tn.attacker, attacker, hijack, &got)
		if len(got.Sockets) > 0 || len(got.Pids) != 2 || got.Pids[0] != 1 {
			t.Errorf("round %d: the attacker sees sockets %v, processes %v", round, got.Sockets, got.Pids)
		}
		if strings.Contains(got.Mountinfo, victim) || strings.Contains(got.Mountinfo, attacker) || strings.Contains(got.Mountinfo, tn.s.dataDir) {
			t.Errorf("round %d: mountinfo names a sandbox or the data dir:\n%s", round, got.Mountinfo)
		}
		// The attacker's next run runs in the attacker's sandbox.
		tn.s.run(tn.attacker, attacker, "open('/workspace/out/mine', 'w').write('a')\nopen('/tmp/csv.py', 'w').write('raise SystemExit(9)')", 30)
	}
	if st, _ := tn.file(tn.attacker, attacker, "/workspace/out/mine"); st != 200 {
		t.Errorf("the attacker's run did not land in its own sandbox: %d", st)
	}
	if st, _ := tn.file(tn.victim, victim, "/workspace/out/mine"); st != 404 {
		t.Errorf("the attacker's file is in the victim's sandbox: %d", st)
	}
	var v struct {
		Files []string
		Tmp   []string
	}
	tn.result(tn.victim, victim, "import os, csv\nresult = {'files': sorted(os.listdir('/workspace/out')), 'tmp': os.listdir('/tmp')}", &v)
	if strings.Join(v.Files, ",") != "victim" || len(v.Tmp) != 0 {
		t.Errorf("the victim's sandbox holds %v, /tmp %v", v.Files, v.Tmp)
	}
	_, m := tn.s.do("GET", "/api/sandbox/"+victim, tn.victim, nil)
	if runs := m["runs"].(map[string]any)["total"]; runs != float64(2) {
		t.Errorf("the victim's sandbox has %v runs, want its own 2", runs)
	}
	tn.healthy(tn.attacker, attacker)
	tn.healthy(tn.victim, victim)
}

// TestAttackHostDetails: nothing of the host's paths, its sandbox ids, its boot or its hardware
// tables is visible inside.
func TestAttackHostDetails(t *testing.T) {
	tn := startTenants(t)
	id := tn.sandbox(tn.attacker, "", map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}, "read_only": []string{"/workspace/in"}}})
	var got struct {
		Mountinfo string
		Files     map[string]string
		Sys       []string
	}
	tn.result(tn.attacker, id, `
import os
files = {}
for p in ("/proc/cmdline", "/proc/config.gz", "/proc/kallsyms", "/proc/modules", "/proc/partitions", "/proc/diskstats",
          "/proc/swaps", "/proc/iomem", "/proc/vmallocinfo", "/proc/kcore", "/proc/keys", "/sys/kernel/vmcoreinfo", "/sys/kernel/btf/vmlinux", "/sys/block"):
    try:
        files[p] = "dir" if os.path.isdir(p) and os.listdir(p) else open(p, "rb").read(64).hex()
    except OSError as e:
        files[p] = "refused"
result = {"mountinfo": open("/proc/self/mountinfo").read(), "files": files, "sys": os.listdir("/sys")}
`, &got)
	t.Logf("mountinfo in a sandbox:\n%s", got.Mountinfo)
	for _, leak := range []string{tn.s.dataDir, id, "sbx_", binDir, rootfs, "/run/sandboxd", "/tmp/sbxd", ".cache"} {
		if strings.Contains(got.Mountinfo, leak) {
			t.Errorf("mountinfo shows %q:\n%s", leak, got.Mountinfo)
		}
	}
	if onKubernetes {
		// A pod under runc gets the container runtime's /proc and /sys: Kubernetes lets a pod
		// mask no path of its own (procMount is Default or Unmasked), so what the container
		// driver masks here is visible — the kernel's command line, config, partitions, /sys.
		// ARCHITECTURE.md ("Kubernetes driver") says so; a gVisor RuntimeClass hides them.
		var visible []string
		for p, v := range got.Files {
			if v != "refused" && v != "" {
				visible = append(visible, p)
			}
		}
		t.Logf("known exposure of runc pods: %v readable, /sys holds %v", visible, got.Sys)
		return
	}
	for p, v := range got.Files {
		if v != "refused" && v != "" {
			t.Errorf("%s is readable: %s…", p, v[:min(len(v), 32)])
		}
	}
	if len(got.Sys) != 0 {
		t.Errorf("/sys holds %v", got.Sys)
	}
}

// TestAttackDisk: every byte a sandbox can write is bounded by its disk, in both modes: its
// read_write paths, /tmp, its working directory, uploads; a full disk is a file-system error
// inside (never an OOM), a 507 for an upload, and the sandbox keeps working; nothing else in the
// sandbox is writable.
func TestAttackDisk(t *testing.T) {
	tn := startTenants(t)
	tn.forModes(t, func(t *testing.T, mode string) {
		cfg := map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}},
			"resources": map[string]any{"disk": "64m", "memory": "128m"}}
		id := tn.sandbox(tn.attacker, mode, cfg)
		full := "ENOSPC"
		if mode == "wasm" {
			full = "EIO" // wazero's WASI has no ENOSPC
		}
		for _, dir := range []string{"/workspace/out", "/tmp", "."} {
			var got struct {
				Written int64
				Errno   string
			}
			tn.result(tn.attacker, id, fmt.Sprintf(`
import errno, os
n, err = 0, None
try:
    with open(os.path.join(%q, "fill"), "wb") as f:
        while n < (256 << 20):
            f.write(b"x" * (1 << 20))
            f.flush()
            n += 1 << 20
except OSError as e:
    err = errno.errorcode.get(e.errno)
result = {"written": n, "errno": err}
`, dir), &got)
			if got.Errno != full || got.Written > 64<<20 {
				t.Errorf("filling %s: wrote %d MiB, then %v; want %s within 64 MiB", dir, got.Written>>20, got.Errno, full)
			}
			// Full: an upload does not fit, and says so.
			if dir == "/workspace/out" {
				st, m := tn.upload(tn.attacker, id, "/workspace/out/upload", bytes.Repeat([]byte("u"), 8<<20))
				if st != 507 || m["error"] != "insufficient_storage" || !strings.Contains(fmt.Sprint(m["message"]), "64 MiB") {
					t.Errorf("upload to a full disk: %d %v", st, m)
				}
				_, sb := tn.s.do("GET", "/api/sandbox/"+id, tn.attacker, nil)
				if u := sb["usage"].(map[string]any)["disk_used_bytes"].(float64); u < 32<<20 || u > 64<<20 {
					t.Errorf("disk_used_bytes %v after filling a 64 MiB disk", u)
				}
				tn.s.run(tn.attacker, id, "import os\nos.remove('/workspace/out/fill')", 30)
			}
			if dir == "/tmp" {
				tn.s.run(tn.attacker, id, "import os\nos.remove('/tmp/fill')", 30)
			}
			tn.healthy(tn.attacker, id)
		}
		if st, _ := tn.upload(tn.attacker, id, "/workspace/out/upload", bytes.Repeat([]byte("u"), 8<<20)); st != 201 {
			t.Errorf("upload once space is free again: %d", st)
		}
		if mode == "wasm" {
			return
		}
		// Nothing else is writable: every directory the sandbox user may write is one of these.
		var writable []string
		tn.result(tn.attacker, id, `
import os
w = []
for root, dirs, files in os.walk("/"):
    if root in ("/proc", "/sys"):
        dirs[:] = []
        continue
    if os.access(root, os.W_OK):
        w.append(root)
        dirs[:] = []
result = w
`, &writable)
		for _, w := range writable {
			switch w {
			case "/tmp", "/workspace/out", "/.sandbox/work", "/dev/shm", "/dev/mqueue":
			default:
				t.Errorf("%s is writable", w)
			}
		}
	})
}

// TestAttackTmpIsNotMemory: /tmp is on the disk: a sandbox with 64 MiB of memory writes three
// times that to /tmp without an OOM, and its later runs still get their memory.
func TestAttackTmpIsNotMemory(t *testing.T) {
	tn := startTenants(t)
	id := tn.sandbox(tn.attacker, "", map[string]any{"resources": map[string]any{"memory": "64m", "disk": "1g"}})
	r := tn.s.run(tn.attacker, id, "with open('/tmp/big', 'wb') as f:\n    for _ in range(192):\n        f.write(b'x' * (1 << 20))", 120)
	if onKubernetes {
		// A pod's disk is a tmpfs counted in its memory (ARCHITECTURE.md, "Kubernetes driver": a
		// disk-backed emptyDir is bounded only by eviction): here /tmp does eat the memory limit.
		// What must hold: the run ends typed, and the sandbox works again once the file is gone.
		if r["status"] != "oom" {
			t.Fatalf("writing 192 MiB to /tmp in a 64 MiB pod: %v, want oom (its disk is memory)", r)
		}
		t.Logf("known deviation of pods: /tmp is memory (a 192 MiB write in a 64 MiB pod is oom)")
		r = tn.s.run(tn.attacker, id, "import os\nos.remove('/tmp/big')\nb = bytearray(40 << 20)\nresult = len(b) >> 20", 30)
		if r["status"] != "completed" || r["result"] != float64(40) {
			t.Fatalf("a run that needs memory once /tmp is emptied: %v", r)
		}
		return
	}
	if r["status"] != "completed" {
		t.Fatalf("writing 192 MiB to /tmp in a 64 MiB sandbox: %v", r)
	}
	r = tn.s.run(tn.attacker, id, "import os\nb = bytearray(40 << 20)\nresult = os.path.getsize('/tmp/big') >> 20", 30)
	if r["status"] != "completed" || r["result"] != float64(192) {
		t.Fatalf("a run that needs memory after 192 MiB were left in /tmp: %v", r)
	}
}

// TestAttackPerUserLimits: one tenant holding every inotify instance its user may have does not
// take them from another tenant's sandbox (each sandbox runs as host ids of its own).
func TestAttackPerUserLimits(t *testing.T) {
	tn := startTenants(t)
	cfg := map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}}}
	hog, other := tn.sandbox(tn.attacker, "", cfg), tn.sandbox(tn.victim, "", cfg)
	status, _ := tn.s.do("POST", "/api/sandbox/"+hog+"/run", tn.attacker, map[string]any{"async": true, "timeout": 60, "code": `
import ctypes, errno, time
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while libc.inotify_init1(0) >= 0:
    n += 1
open("/workspace/out/held", "w").write("%d %s" % (n, errno.errorcode[ctypes.get_errno()]))
time.sleep(30)
`})
	if status != 202 {
		t.Fatalf("hog: %d", status)
	}
	var held []byte
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var st int
		if st, held = tn.file(tn.attacker, hog, "/workspace/out/held"); st == 200 && len(held) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hog never held its instances")
		}
	}
	if !strings.HasSuffix(string(held), "EMFILE") {
		t.Fatalf("the hog: %s", held)
	}
	var got string
	tn.result(tn.victim, other, "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nresult = 'ok' if libc.inotify_init1(0) >= 0 else errno.errorcode[ctypes.get_errno()]", &got)
	if got != "ok" {
		t.Errorf("inotify_init1 in the other tenant's sandbox while the hog holds its %s: %s", held, got)
	}
}

// TestAttackPoisonLaterRuns: nothing a run leaves — a module in /tmp or in its working directory,
// a symlink planted for the cleanup to follow — changes what a later run imports or finds.
func TestAttackPoisonLaterRuns(t *testing.T) {
	tn := startTenants(t)
	tn.forModes(t, func(t *testing.T, mode string) {
		id := tn.sandbox(tn.attacker, mode, nil)
		plant := `
import os
for p in ("csv.py", "json.py", "/tmp/csv.py", "/tmp/json.py", "/tmp/sitecustomize.py"):
    open(p, "w").write("raise SystemExit('poisoned')")
open("/tmp/keep", "w").write("kept")
try:
    os.symlink("/tmp/keep", "link-to-tmp")  # the cleanup of the working directory must not follow it
except OSError:
    pass  # WASM refuses links
`
		tn.s.run(tn.attacker, id, plant, 30)
		var got struct {
			Cwd  []string
			Keep string
			Path []string
		}
		tn.result(tn.attacker, id, `
import os, sys, csv, json
result = {"cwd": os.listdir("."), "keep": open("/tmp/keep").read(),
          "path": [p for p in sys.path if p in ("", ".") or p.startswith(("/tmp", "/.sandbox"))]}
`, &got)
		if len(got.Cwd) != 0 || got.Keep != "kept" || len(got.Path) != 0 {
			t.Errorf("the next run finds %+v", got)
		}
	})
}

// TestAttackRunsEndTyped: the item-7 findings — DELETE answers with the running run final; a
// denied connection that needs no name is refused at connect; a crashing interpreter's run names
// the signal; the sandbox survives its crash.
func TestAttackRunsEndTyped(t *testing.T) {
	tn := startTenants(t)
	id := tn.sandbox(tn.attacker, "", nil)
	r := tn.s.run(tn.attacker, id, `
import socket, time
t = time.monotonic()
try:
    socket.create_connection(("1.1.1.1", 853), timeout=5)
    result = "connected"
except ConnectionRefusedError:
    result = "refused in %.2f s" % (time.monotonic() - t)
except OSError as e:
    result = repr(e)
`, 30)
	res, _ := r["result"].(string)
	if onKubernetes && strings.HasPrefix(res, "OSError(101,") {
		res = "refused in 0. (the test cluster's pods have no default route: ENETUNREACH at connect)"
	}
	if !strings.HasPrefix(res, "refused in 0.") {
		t.Errorf("DNS-over-TLS: %v", r["result"])
	}
	r = tn.s.run(tn.attacker, id, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", 30)
	e, _ := r["error"].(map[string]any)
	if r["status"] != "failed" || e["type"] != "Signal" || !strings.Contains(fmt.Sprint(e["message"]), "SIGSEGV") ||
		!strings.Contains(fmt.Sprint(r["stderr"]), "Segmentation fault") {
		t.Errorf("a crashed interpreter's run: %v", r)
	}
	tn.healthy(tn.attacker, id)

	status, m := tn.s.do("POST", "/api/sandbox/"+id+"/run", tn.attacker, map[string]any{"async": true, "code": "import time; time.sleep(60)"})
	if status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	runID := m["run_id"].(string)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, rm := tn.s.do("GET", "/api/sandbox/"+id+"/runs/"+runID, tn.attacker, nil); rm["status"] == "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the run never started")
		}
	}
	if status, _ := tn.s.do("DELETE", "/api/sandbox/"+id, tn.attacker, nil); status != 204 {
		t.Fatalf("delete: %d", status)
	}
	if _, rm := tn.s.do("GET", "/api/sandbox/"+id+"/runs/"+runID, tn.attacker, nil); rm["status"] != "cancelled" || rm["finished_at"] == nil {
		t.Errorf("the running run right after DELETE: %v", rm)
	}
}
