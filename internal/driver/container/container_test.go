package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

func TestRegistered(t *testing.T) {
	if !slices.Contains(driver.Names(), "container") {
		t.Fatalf("driver.Names() = %v, want container in it", driver.Names())
	}
}

// denied are the errors that count as "refused" for a write or an access.
var denied = []string{"EACCES", "EROFS", "EPERM"}

// runProbe runs drivertest.PathProbe with body and returns what it collected.
func runProbe(t *testing.T, d *Driver, id, body string) map[string]string {
	t.Helper()
	res := drivertest.Exec(t, d, id, drivertest.PathProbe+body, 30*time.Second)
	var m map[string]string
	if err := json.Unmarshal(res.Result, &m); res.Status != driver.StatusCompleted || err != nil {
		t.Fatalf("probe: %s, result %s (%v), stderr %s", res.Status, res.Result, err, res.Stderr)
	}
	return m
}

// expect checks that attempt name gave one of want ("ok" standing for any success).
func expect(t *testing.T, got map[string]string, name string, want ...string) {
	t.Helper()
	v, ok := got[name]
	if strings.HasPrefix(v, "ok") {
		v = "ok"
	}
	if !ok || !slices.Contains(want, v) {
		t.Errorf("%s: got %q, want one of %v", name, got[name], want)
	}
}

// TestFilesystem: the container's side of the path rules (the conformance suite has the rest):
// the image is never written — neither by the sandbox nor by the mount points and blocked paths
// the driver makes —, blocked paths need not exist, the agent's binary is read-only.
func TestFilesystem(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		host := drivertest.HostDir(t)
		if err := os.Mkdir(host+"/deep", 0o755); err != nil {
			t.Fatal(err)
		}
		// A mount point that does not exist in the image: created in the overlay, never in it.
		newMount := "/srv/sbx-" + statedir.RandomHex(3) + "/deep"
		spec := baseSpec(t)
		spec.Mounts = []driver.Mount{
			{Path: "/workspace/data", HostDir: drivertest.HostDir(t), ReadOnly: true},
			{Path: newMount, HostDir: host + "/deep", ReadOnly: true},
		}
		spec.Blocked = []string{"/etc", "/root", "/nonexistent/dir", "/workspace/data/missing"}
		id := harness.Sandbox(t, d, spec)

		got := runProbe(t, d, id, `
attempt("etc_list", lambda: os.listdir("/etc"))
attempt("etc_read", lambda: read("/etc/passwd"))
attempt("etc_write", lambda: write("/etc/evil"))
attempt("root_list", lambda: os.listdir("/root"))
attempt("root_write", lambda: write("/root/evil"))
attempt("missing_list", lambda: os.listdir("/nonexistent/dir"))
attempt("missing_create", lambda: write("/nonexistent/dir/x"))
attempt("missing_in_mount_create", lambda: write("/workspace/data/missing/x"))
attempt("rootfs_write", lambda: write("/evil"))
attempt("rootfs_usr_write", lambda: write("/usr/bin/evil"))
attempt("rootfs_mkdir", lambda: os.mkdir("/opt/evil"))
attempt("rootfs_chmod", lambda: os.chmod("/usr/bin/python3", 0o777))
attempt("new_mount_list", lambda: os.listdir("`+newMount+`"))
attempt("agent_write", lambda: write("/.sandbox/bin/sandbox-agent"))
`)
		expect(t, got, "new_mount_list", "ok")
		for _, k := range []string{"etc_list", "etc_read", "etc_write", "root_list", "root_write", "missing_list", "missing_create",
			"missing_in_mount_create", "rootfs_write", "rootfs_usr_write", "rootfs_mkdir", "rootfs_chmod", "agent_write"} {
			expect(t, got, k, denied...)
		}
		// The image was not written: the new mount point exists only in the overlay.
		if _, err := os.Lstat(filepath.Join(rootfs, filepath.Dir(newMount))); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("mount point %s was created in the image: %v", newMount, err)
		}
		if _, err := os.Lstat(filepath.Join(rootfs, "nonexistent")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("blocked mount point was created in the image: %v", err)
		}
	})
}

func TestHostUnreachable(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		marker, err := os.CreateTemp("", "sbxd-host-marker-")
		if err != nil {
			t.Fatal(err)
		}
		marker.WriteString("host secret")
		marker.Close()
		os.Chmod(marker.Name(), 0o644)
		t.Cleanup(func() { os.Remove(marker.Name()) })
		p := marker.Name()
		id := harness.Sandbox(t, d, baseSpec(t))
		got := runProbe(t, d, id, `
import glob
p = "`+p+`"
for i, q in enumerate([p, "/proc/1/root" + p, "/proc/self/root" + p, "/../../.." + p, "/proc/1/cwd/../../.." + p,
                       "/proc/1/root/../../.." + p, "/tmp/../.." + p]):
    attempt("marker%d" % i, lambda: read(q))
def scan():
    hits = [q for q in glob.glob("/proc/*/root" + p)] + [q for q in glob.glob("/proc/*/cwd/" + os.path.basename(p))]
    if any(os.path.exists(h) for h in hits):
        return
    raise FileNotFoundError(2, "none")
attempt("proc_scan", scan)
attempt("shadow", lambda: read("/proc/1/root/etc/shadow"))
attempt("host_pid1", lambda: read("/proc/1/cmdline").index("sandbox-agent") >= 0 or (_ for _ in ()).throw(OSError(1, "not agent")))
attempt("sys_write", lambda: write("/sys/kernel/mm/transparent_hugepage/enabled", "never"))
attempt("proc_sys_write", lambda: write("/proc/sys/kernel/hostname", "evil"))
attempt("kcore", lambda: read("/proc/kcore"))
`)
		for i := 0; i < 7; i++ {
			// ENOENT: resolves inside the sandbox; EACCES: /proc/1 is the non-dumpable agent.
			expect(t, got, "marker"+string(rune('0'+i)), "ENOENT", "EACCES")
		}
		expect(t, got, "proc_scan", "ENOENT")
		expect(t, got, "shadow", denied...)
		expect(t, got, "host_pid1", "ok") // PID 1 is the agent: own PID namespace
		expect(t, got, "sys_write", append(denied, "ENOENT")...)
		expect(t, got, "proc_sys_write", denied...)
		expect(t, got, "kcore", append(denied, "ENOENT", "EIO")...)
	})
}

func TestIdentity(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		id := harness.Sandbox(t, d, baseSpec(t))
		out := drivertest.MustExec(t, d, id, `
import os, socket
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
for k in ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
    print(k, " ".join(st[k].split()))
print("hostname", socket.gethostname())
print("cwd", os.getcwd())
`)
		want := []string{
			"Uid 10000 10000 10000 10000", "Gid 10000 10000 10000 10000",
			"CapInh 0000000000000000", "CapPrm 0000000000000000", "CapEff 0000000000000000",
			"CapBnd 0000000000000000", "CapAmb 0000000000000000", "NoNewPrivs 1", "Seccomp 2",
			"hostname sandbox",
		}
		for _, w := range want {
			if !strings.Contains(out, w+"\n") {
				t.Errorf("missing %q in:\n%s", w, out)
			}
		}
	})
}

// TestNetwork: the default policy (block_outbound, nothing allowed) keeps a sandbox to itself:
// loopback works, a connection out is refused at once.
func TestNetwork(t *testing.T) {
	fakeInternet(t) // where 198.51.100.99 would go, were it not refused
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		id := harness.Sandbox(t, d, baseSpec(t))
		got := runProbe(t, d, id, `
import socket, time
def outside():
    s = socket.socket()
    s.settimeout(2)
    t0 = time.monotonic()
    try:
        s.connect(("198.51.100.99", 53))
    finally:
        out["outside_seconds"] = "%.2f" % (time.monotonic() - t0)
        s.close()
attempt("outside", outside)
def loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname(), timeout=2)
    a, _ = srv.accept()
    c.sendall(b"hi")
    assert a.recv(2) == b"hi"
attempt("loopback", loopback)
attempt("ifaces", lambda: sorted(n for _, n in socket.if_nameindex()) == ["eth0", "lo"] or (_ for _ in ()).throw(OSError(1, str(socket.if_nameindex()))))
`)
		expect(t, got, "outside", "ECONNREFUSED")
		if s := got["outside_seconds"]; s > "0.50" {
			t.Errorf("connect to 198.51.100.99 took %ss, want an immediate failure", s)
		}
		expect(t, got, "loopback", "ok")
		expect(t, got, "ifaces", "ok")
	})
}

// onlyInit asserts the sandbox's only processes are its own: no process of a run is left.
func onlyInit(t *testing.T, d *Driver, id string) {
	t.Helper()
	b, err := d.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	all, err := d.cg.procs(id)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(all, b.Pid) {
		t.Fatalf("the agent %d is not among the sandbox's processes %v", b.Pid, all)
	}
	pids, err := d.runProcesses(id, b.Pid, int(b.standby.Load()), true)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 0 {
		t.Fatalf("processes of a run left in the sandbox: %v", pids)
	}
}

func TestForkBomb(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		for _, c := range []struct {
			name   string
			memory int64
			code   string
		}{
			{"at the pids limit", 256 << 20, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"},
			// Each process also takes memory: the sandbox thrashes at its limit, and the run still
			// ends typed (oom or timeout), never as a failure of the driver.
			{"at the memory limit", 96 << 20, "import os\nkeep = []\nwhile True:\n    try:\n        os.fork()\n        keep.append(bytearray(4 << 20))\n    except (OSError, MemoryError):\n        pass\n"},
		} {
			spec := baseSpec(t)
			spec.AllowSpawn, spec.PidsLimit, spec.MemoryBytes = true, 64, c.memory
			id := harness.Sandbox(t, d, spec)
			res := drivertest.Exec(t, d, id, c.code, 3*time.Second) // fails the test on a driver error
			if res.Status != driver.StatusTimeout && res.Status != driver.StatusOOM && res.Status != driver.StatusFailed {
				t.Fatalf("%s: fork bomb ended %s", c.name, res.Status)
			}
			if d.rt.gvisor() && res.Status == driver.StatusOOM && sentryGone(d, id) {
				// gVisor has no OOM killer of its own: the host's memory cgroup killed the Sentry,
				// and the whole sandbox is gone (RATIONALE.md, runsc).
				if _, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)", Timeout: 10 * time.Second}); err == nil {
					t.Fatalf("%s: a run after the Sentry's OOM kill did not fail", c.name)
				}
				t.Logf("%s: the OOM killed the Sentry", c.name)
				continue
			}
			onlyInit(t, d, id)
			if out := drivertest.MustExec(t, d, id, "print(1)"); out != "1\n" {
				t.Fatalf("%s: after fork bomb: %q", c.name, out)
			}
		}
	})
}

// assertGone checks that nothing of sandbox id is left on the host.
func assertGone(t *testing.T, d *Driver, id string, pid int) {
	t.Helper()
	if pid > 0 && !processGone(pid, 2*time.Second) {
		t.Errorf("agent process %d still alive", pid)
	}
	dir := d.boxDir(id)
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir %s still there: %v", dir, err)
	}
	assertNetworkGone(t, d, id)
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), id) {
		t.Errorf("a mount of %s is left in /proc/self/mountinfo", id)
	}
	for _, m := range d.cg.Mounts() {
		if _, err := os.Lstat(sandboxDir(m, id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s still there", sandboxDir(m, id))
		}
	}
	for _, rt := range d.all {
		if rt.exists(id) {
			t.Errorf("%s still has state for %s", rt.name, id)
		}
	}
	ids, err := d.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(ids, id) {
		t.Errorf("List still shows %s", id)
	}
}

// processGone waits until pid does not exist or is a zombie (the host's init reaps orphans lazily).
func processGone(pid int, wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	for {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		// pid (comm) S ...: the state follows the last ')'.
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCreateFailureCleansUp(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		ctx := context.Background()
		for name, spec := range map[string]driver.Spec{
			"mount over a file": func() driver.Spec {
				s := baseSpec(t)
				s.Mounts = []driver.Mount{{Path: "/usr/bin/python3/x", HostDir: drivertest.HostDir(t)}}
				return s
			}(),
			"missing rootfs": func() driver.Spec { s := baseSpec(t); s.RootFS = "/nonexistent/rootfs"; return s }(),
			"no python (agent still starts)": func() driver.Spec {
				s := baseSpec(t)
				s.RootFS = t.TempDir()
				return s
			}(),
		} {
			id := "t-" + statedir.RandomHex(8)
			err := d.Create(ctx, id, spec)
			if name == "no python (agent still starts)" {
				// The agent is static: the sandbox starts; the run fails.
				if err != nil {
					t.Errorf("%s: %v", name, err)
					continue
				}
				res, err := d.Exec(ctx, id, driver.ExecRequest{Code: "print(1)", Timeout: 5 * time.Second})
				if err == nil && res.Status == driver.StatusCompleted {
					t.Errorf("%s: run completed without python", name)
				}
				if err := d.Destroy(ctx, id); err != nil {
					t.Error(err)
				}
			} else if err == nil {
				t.Errorf("%s: create succeeded", name)
				d.Destroy(ctx, id)
			}
			assertGone(t, d, id, 0)
		}
	})
}

func TestFloor(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		took, err := d.Floor(context.Background(), rootfs)
		if err != nil {
			t.Fatal(err)
		}
		if took <= 0 {
			t.Fatalf("floor %v", took)
		}
		ents, _ := os.ReadDir(filepath.Join(d.stateDir, "floor"))
		if len(ents) != 0 {
			t.Errorf("floor left %d bundles", len(ents))
		}
	})
}

func TestAgentDiesAtStart(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		dir := t.TempDir()
		bad := filepath.Join(dir, "bad-agent")
		if err := os.WriteFile(bad, []byte("#!/bin/sh\necho agent-boom >&2\nexit 3\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		bd, err := Open(driver.Options{StateDir: filepath.Join(dir, "s"), AgentBin: bad, Runtime: d.rt.name, RunscBin: runscBin, NetworkPool: testPool})
		if err != nil {
			t.Fatal(err)
		}
		defer bd.Close()
		id := "t-" + statedir.RandomHex(8)
		err = bd.Create(context.Background(), id, baseSpec(t))
		if err == nil {
			bd.Destroy(context.Background(), id)
			t.Fatal("create succeeded with an agent that exits")
		}
		t.Logf("create error: %v", err)
		if !strings.Contains(err.Error(), "agent-boom") {
			t.Errorf("error lacks the agent's output: %v", err)
		}
		assertGone(t, bd, id, 0)
	})
}

// TestAgentChannel attacks the agent's channel from inside a sandbox: nothing there is, names or
// leads to an agent socket (the driver binds it in the host's state dir and passes it as a
// descriptor), so code in one sandbox can neither replace it nor reach another sandbox's; and
// runs keep landing in their own sandbox.
func TestAgentChannel(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		dirs := [2]string{drivertest.HostDir(t), drivertest.HostDir(t)}
		var ids [2]string
		for i := range ids {
			spec := baseSpec(t)
			spec.Mounts = []driver.Mount{{Path: "/workspace/output", HostDir: dirs[i]}}
			ids[i] = harness.Sandbox(t, d, spec)
		}
		attacker := ids[0]
		out := drivertest.MustExec(t, d, attacker, `
import json, os, stat
found = []
for top in ["/"]:
    for root, dirs, files in os.walk(top):
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
fds = []
for fd in os.listdir("/proc/self/fd"):
    try:
        if os.readlink("/proc/self/fd/" + fd).startswith("socket:"):
            fds.append(fd)
    except OSError:
        pass
planted = []
for p in ["/.sandbox/run", "/.sandbox/run/agent.sock", "/.sandbox/agent.sock"]:
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink("/proc/1/root/x", p)
        planted.append(p)
    except OSError:
        pass
print(json.dumps({"sockets": found, "socket_fds": fds, "planted": planted,
    "sandbox_dir": sorted(os.listdir("/.sandbox")),
    "agent_sock_in_mountinfo": "agent.sock" in open("/proc/self/mountinfo").read()}))
`)
		var got struct {
			Sockets     []string `json:"sockets"`
			SocketFDs   []string `json:"socket_fds"`
			Planted     []string `json:"planted"`
			Dir         []string `json:"sandbox_dir"`
			InMountinfo bool     `json:"agent_sock_in_mountinfo"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		// The one socket a run holds is its own agent channel (pyrunner.AgentFD): a socketpair
		// with the agent, which the agent made for this run.
		if len(got.Sockets) > 0 || !slices.Equal(got.SocketFDs, []string{strconv.Itoa(pyrunner.AgentFD)}) || len(got.Planted) > 0 ||
			got.InMountinfo || !slices.Equal(got.Dir, []string{"bin", "work"}) {
			t.Errorf("agent channel visible in the sandbox: %+v", got)
		}
		if _, err := os.Stat(socketPath(d.boxDir(attacker))); err != nil {
			t.Errorf("the host's agent socket: %v", err)
		}
		// Runs still land where they are sent.
		for i, id := range ids {
			drivertest.MustExec(t, d, id, "open('/workspace/output/who', 'w').write("+strconv.Quote(id)+")")
			if b, err := os.ReadFile(filepath.Join(dirs[i], "who")); err != nil || string(b) != id {
				t.Errorf("run sent to %s wrote %q (%v) in its dir", id, b, err)
			}
		}
	})
}

// TestUIDsApart: every sandbox runs as host ids of its own, so a per-user kernel limit exhausted
// in one sandbox (here the inotify instances, fs.inotify.max_user_instances) is not exhausted in
// another. (With runc, whose user namespaces are root's, only the first holds: see userns.go.)
func TestUIDsApart(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		specs := [2]driver.Spec{baseSpec(t), baseSpec(t)}
		hog, other := harness.Sandbox(t, d, specs[0]), harness.Sandbox(t, d, specs[1])
		for i, id := range []string{hog, other} {
			b, _ := d.lookup(id)
			st, err := os.ReadFile("/proc/" + strconv.Itoa(b.Pid) + "/status")
			if err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprint(specs[i].HostIDs + sandboxUID)
			if d.rt.gvisor() {
				// The host sees the Sentry, root of the sandbox's user namespace; the sandbox's
				// processes are gVisor's, their uid 10000 is no host uid.
				want = fmt.Sprint(specs[i].HostIDs)
			}
			if f := statusFields(t, string(st), "Uid", "Gid"); f["Uid"] != strings.Repeat(want+"\t", 3)+want || f["Gid"] != f["Uid"] {
				t.Errorf("sandbox %d runs as %v on the host, want uid and gid %s", i, f, want)
			}
		}
		if !d.rt.ownedUserNS() {
			t.Logf("%s makes the user namespaces: the hierarchical limits are shared (see userns.go)", d.rt.name)
			return
		}
		ready := make(chan struct{})
		var once sync.Once
		done := make(chan driver.ExecResult, 1)
		go func() {
			res, err := d.Exec(context.Background(), hog, driver.ExecRequest{Timeout: 30 * time.Second, MaxOutput: 1 << 16,
				Code: `
import ctypes, errno, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while True:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print(len(fds), errno.errorcode[ctypes.get_errno()], flush=True)
time.sleep(3)
`,
				OnOutput: func(driver.Stream, []byte) { once.Do(func() { close(ready) }) }})
			if err != nil {
				t.Error(err)
			}
			done <- res
		}()
		select {
		case <-ready:
		case res := <-done:
			t.Fatalf("the hog ended early: %s %s", res.Stdout, res.Stderr)
		}
		out := drivertest.MustExec(t, d, other, `
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print("ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
`)
		res := <-done
		if !strings.Contains(string(res.Stdout), "EMFILE") {
			t.Fatalf("the hog did not exhaust its inotify instances: %s %s", res.Stdout, res.Stderr)
		}
		if out != "ok\n" {
			t.Errorf("inotify_init1 in another sandbox while one holds all its instances: %s", out)
		}
	})
}

// sentryGone reports whether runsc sandbox id's Sentry (its init's host process) has exited.
func sentryGone(d *Driver, id string) bool {
	b, err := d.lookup(id)
	return err == nil && exited(b.Pid)
}
