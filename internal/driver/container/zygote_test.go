package container

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
)

// zygoteOf returns the host PID of sandbox id's zygote (the process of its cgroup outside its PID
// namespace), waiting for it; it fails the test if there is none or more than one.
func zygoteOf(t *testing.T, d *Driver, id string) int {
	t.Helper()
	pids, err := d.cg.procs(id)
	if err != nil {
		t.Fatal(err)
	}
	var zs []int
	for _, p := range pids {
		if ns, _ := procStatus(p); len(ns) == 1 {
			zs = append(zs, p)
		}
	}
	if len(zs) != 1 {
		t.Fatalf("zygotes in the sandbox's cgroup: %v, want one", zs)
	}
	return zs[0]
}

// fromZygote runs code until a run reports it was forked by the zygote (its parent is outside the
// sandbox: getppid() is 0) and returns that run's stdout after the first line.
func fromZygote(t *testing.T, d *Driver, id, code string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := drivertest.MustExec(t, d, id, "import os; print(os.getppid())\n"+code)
		first, rest, _ := strings.Cut(out, "\n")
		if first == "0" {
			return rest
		}
		if time.Now().After(deadline) {
			t.Fatalf("no run was forked by a zygote in 10 s (parent %s)", first)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func statusFields(t *testing.T, text string, names ...string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	out := map[string]string{}
	for _, n := range names {
		v, ok := m[n]
		if !ok {
			t.Fatalf("no %s in:\n%s", n, text)
		}
		out[n] = v
	}
	return out
}

// TestZygote: runs are forked by a zygote that lives in every namespace and cgroup of the sandbox
// but its PID namespace; a run forked by it has the same credentials, limits, cgroups and seccomp
// profile as the agent the runtime started, sees only the agent and itself, and the zygote goes
// with the sandbox.
func TestZygote(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		if d.rt.gvisor() {
			t.Skip("runsc: no zygote under gVisor (entering the Sentry's namespaces would run Python on the host's kernel, outside gVisor): the agent launches every run")
		}
		for _, spawn := range []bool{false, true} {
			spec := baseSpec(t)
			spec.AllowSpawn = spawn
			ctx := context.Background()
			id := harness.Sandbox(t, d, spec)
			b, err := d.lookup(id)
			if err != nil {
				t.Fatal(err)
			}
			out := fromZygote(t, d, id, `
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()])
print(open("/proc/self/status").read())
print("--")
print(open("/proc/self/cgroup").read())
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def err(r):
    return errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else "ok"
print("unshare", err(libc.unshare(0x10000000)))             # CLONE_NEWUSER: not in the profile
print("personality", err(libc.personality(0x0040000)))     # ADDR_NO_RANDOMIZE: not an allowed value
print("vsock", err(libc.socket(40, 1, 0)))                  # AF_VSOCK: not an allowed family
print("inet", "ok" if libc.socket(2, 1, 0) >= 0 else "fail")
print("clone3", err(libc.syscall(435, 0, 0)))
try:
    pid = os.fork()
except OSError as e:
    print("fork", errno.errorcode[e.errno])
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("fork ok")
`)
			procs, rest, _ := strings.Cut(out, "\n")
			if procs != "True" {
				t.Errorf("allow_spawn=%v: the run sees other processes than the agent and itself", spawn)
			}
			status, rest, _ := strings.Cut(rest, "\n--\n")
			cgroups, calls, _ := strings.Cut(rest, "\n\n")
			agentStatus, err := os.ReadFile("/proc/" + strconv.Itoa(b.Pid) + "/status")
			if err != nil {
				t.Fatal(err)
			}
			same := []string{"Umask", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Cpus_allowed_list"}
			run, agent := statusFields(t, status, append(same, "Uid", "Gid")...), statusFields(t, string(agentStatus), append(same, "Uid", "Gid")...)
			for _, n := range same {
				if run[n] != agent[n] {
					t.Errorf("allow_spawn=%v: %s of a run is %q, of the agent %q", spawn, n, run[n], agent[n])
				}
			}
			// The same user: 10000 in the sandbox's user namespace, its own host id outside.
			inside, outside := strings.Repeat("10000\t", 3)+"10000", strings.Repeat(fmt.Sprint(spec.HostIDs+sandboxUID)+"\t", 3)+fmt.Sprint(spec.HostIDs+sandboxUID)
			for _, n := range []string{"Uid", "Gid"} {
				if run[n] != inside || agent[n] != outside {
					t.Errorf("allow_spawn=%v: %s of a run %q (want %q), of the agent on the host %q (want %q)", spawn, n, run[n], inside, agent[n], outside)
				}
			}
			// Inside, the run sits at the root of the sandbox's cgroup namespace in every hierarchy;
			// from the host, its zygote (hence the run) is in exactly the agent's cgroups.
			for _, l := range strings.Split(strings.TrimSpace(cgroups), "\n") {
				if !strings.HasSuffix(l, ":/") {
					t.Errorf("allow_spawn=%v: run not at its cgroup namespace's root: %q", spawn, l)
				}
			}
			agentCgroups, err := os.ReadFile("/proc/" + strconv.Itoa(b.Pid) + "/cgroup")
			if err != nil {
				t.Fatal(err)
			}
			zygoteCgroups, err := os.ReadFile("/proc/" + strconv.Itoa(zygoteOf(t, d, id)) + "/cgroup")
			if err != nil {
				t.Fatal(err)
			}
			if string(zygoteCgroups) != string(agentCgroups) {
				t.Errorf("the zygote's cgroups:\n%s\nthe agent's:\n%s", zygoteCgroups, agentCgroups)
			}
			want := "unshare EPERM\npersonality EPERM\nvsock EPERM\ninet ok\nclone3 ENOSYS\nfork ok\n"
			if !spawn {
				want = "unshare EPERM\npersonality EPERM\nvsock EPERM\ninet ok\nclone3 ENOSYS\nfork EPERM\n"
			}
			if !strings.HasPrefix(calls, want) {
				t.Errorf("allow_spawn=%v: syscalls:\n%s\nwant:\n%s", spawn, calls, want)
			}

			// The zygote: in the sandbox's cgroups and namespaces but its PID namespace, where its
			// children go; the sandbox's uid, nothing more.
			z := zygoteOf(t, d, id)
			for _, ns := range []string{"user", "mnt", "net", "ipc", "uts", "cgroup", "pid_for_children"} {
				want := ns
				if ns == "pid_for_children" {
					want = "pid"
				}
				zl, err1 := os.Readlink("/proc/" + strconv.Itoa(z) + "/ns/" + ns)
				al, err2 := os.Readlink("/proc/" + strconv.Itoa(b.Pid) + "/ns/" + want)
				if err1 != nil || err2 != nil || zl != al {
					t.Errorf("zygote's %s namespace %q (%v), the agent's %s %q (%v)", ns, zl, err1, want, al, err2)
				}
			}
			zp, _ := os.Readlink("/proc/" + strconv.Itoa(z) + "/ns/pid")
			ap, _ := os.Readlink("/proc/" + strconv.Itoa(b.Pid) + "/ns/pid")
			if zp == ap {
				t.Errorf("the zygote is in the sandbox's PID namespace")
			}
			zs, err := os.ReadFile("/proc/" + strconv.Itoa(z) + "/status")
			if err != nil {
				t.Fatal(err)
			}
			zf := statusFields(t, string(zs), "Uid", "Gid", "Groups", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")
			for k, v := range map[string]string{"Uid": agent["Uid"], "Gid": agent["Gid"], "Groups": "", "CapEff": "0000000000000000",
				"CapBnd": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
				if zf[k] != v {
					t.Errorf("zygote's %s is %q, want %q", k, zf[k], v)
				}
			}
			// Non-dumpable: its /proc files are its user namespace's root's (no process of the
			// sandbox runs as that). Its idle child (the standby) is not dumpable either until its run
			// arrives (a context's run must not write into it): its files are the same root's.
			owner := func(pid int) int {
				st, err := os.Stat("/proc/" + strconv.Itoa(pid) + "/environ")
				if err != nil {
					return -1
				}
				return int(st.Sys().(*syscall.Stat_t).Uid)
			}
			if o := owner(z); o != int(spec.HostIDs) {
				t.Errorf("the zygote's /proc files belong to uid %d, want %d (its namespace's root: not dumpable)", o, spec.HostIDs)
			}
			// The standby is forked after the answer: wait for it.
			var children []int
			for end := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				children = children[:0]
				all, _ := d.cg.procs(id)
				for _, p := range all {
					if _, ppid := procStatus(p); ppid == z {
						children = append(children, p)
					}
				}
				if len(children) == 1 || time.Now().After(end) {
					break
				}
			}
			if len(children) != 1 {
				t.Errorf("the zygote has %d children after a run, want 1 (the standby)", len(children))
			} else if o := owner(children[0]); o != int(spec.HostIDs) {
				t.Errorf("the idle standby's /proc files belong to uid %d, want %d (not dumpable)", o, spec.HostIDs)
			}
			if adj, _ := os.ReadFile("/proc/" + strconv.Itoa(z) + "/oom_score_adj"); strings.TrimSpace(string(adj)) != "1000" {
				t.Errorf("zygote's oom_score_adj %q, want 1000", adj)
			}
			onlyInit(t, d, id)

			if err := d.Destroy(ctx, id); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat("/proc/" + strconv.Itoa(z)); err == nil {
				if ns, _ := procStatus(z); ns != nil {
					t.Errorf("the zygote %d outlives its sandbox", z)
				}
			}
		}
	})
}

// killAndWait kills host process pid with SIGKILL and returns once it has exited.
func killAndWait(t *testing.T, pid int) {
	t.Helper()
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pfd)
	if err := unix.PidfdSendSignal(pfd, unix.SIGKILL, nil, 0); err != nil {
		t.Fatal(err)
	}
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}} // readable once it has exited
	for {
		n, err := unix.Poll(fds, 10_000)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			t.Fatalf("process %d still there 10 s after SIGKILL (%v)", pid, err)
		}
		return
	}
}

// TestZygoteGone: a sandbox whose zygote was killed keeps running code (the agent launches runs):
// the runs after its death complete, none is given a process the dead zygote forked.
func TestZygoteGone(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		if d.rt.gvisor() {
			t.Skip("runsc: no zygote under gVisor (entering the Sentry's namespaces would run Python on the host's kernel, outside gVisor): the agent launches every run")
		}
		id := harness.Sandbox(t, d, baseSpec(t))
		fromZygote(t, d, id, "")
		killAndWait(t, zygoteOf(t, d, id))
		for i := 0; i < 3; i++ {
			res := drivertest.Exec(t, d, id, "import os; print(os.getppid())", 20*time.Second)
			if res.Status != driver.StatusCompleted {
				t.Fatalf("run %d after the zygote died: %s %s", i, res.Status, res.Stderr)
			}
		}
		if out := drivertest.MustExec(t, d, id, "import os; print(os.getppid())"); out != "1\n" {
			t.Errorf("parent of a run without a zygote: %q, want 1 (the agent)", out)
		}
		onlyInit(t, d, id)
	})
}

// TestZygoteFailureLogged: a sandbox whose zygote cannot start still runs code (the agent launches
// it), and the driver says so through its Options.Logger, naming the sandbox by the attribute
// "sandbox".
func TestZygoteFailureLogged(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		if d.rt.gvisor() {
			t.Skip("runsc: no zygote under gVisor (entering the Sentry's namespaces would run Python on the host's kernel, outside gVisor): the agent launches every run")
		}
		dir := t.TempDir()
		var logs bytes.Buffer
		ld, err := Open(driver.Options{StateDir: filepath.Join(dir, "s"), AgentBin: agentBin, Runtime: d.rt.name, RunscBin: runscBin,
			NetworkPool: testPool, Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ld.Close() }) // after the sandbox's Destroy (cleanups run last first)
		if ld.zygoteFilter == nil {
			t.Fatalf("the driver starts no zygotes: %s", logs.String())
		}
		ld.nsenter = filepath.Join(dir, "no-nsenter") // starting the zygote fails
		id := harness.Sandbox(t, ld, baseSpec(t))
		if err := ld.Warm(context.Background(), id); err != nil { // the zygote's start has ended
			t.Fatal(err)
		}
		var found bool
		for _, line := range bytes.Split(bytes.TrimSpace(logs.Bytes()), []byte("\n")) {
			var rec struct{ Level, Msg, Sandbox, Err string }
			if err := json.Unmarshal(line, &rec); err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			if rec.Sandbox == id {
				found = rec.Level == "WARN" && strings.Contains(rec.Err, "no-nsenter")
				t.Logf("record: %s", line)
			}
		}
		if !found {
			t.Errorf("no warning with sandbox=%s and the cause in the driver's log:\n%s", id, logs.String())
		}
		if out := drivertest.MustExec(t, ld, id, "import os; print(os.getppid())"); out != "1\n" {
			t.Errorf("parent of a run without a zygote: %q, want 1 (the agent)", out)
		}
	})
}

// TestSeccompProgram: what the zygote's profile compiler accepts and refuses (the profile's
// effect on real syscalls is TestZygote's).
func TestSeccompProgram(t *testing.T) {
	docker, err := defaultSeccomp()
	if err != nil {
		t.Fatal(err)
	}
	errno := func(n uint) *uint { return &n }
	allowRead := []specs.LinuxSyscall{{Names: []string{"read", "socketcall"}, Action: specs.ActAllow}}
	for _, tc := range []struct {
		name    string
		prof    *specs.LinuxSeccomp
		wantErr string
		def     uint32 // the default action's return value
	}{
		{name: "Docker's default", prof: docker, def: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		{name: "default errno", prof: &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, DefaultErrnoRet: errno(38), Syscalls: allowRead},
			def: unix.SECCOMP_RET_ERRNO | 38},
		{name: "none", wantErr: "no seccomp profile"},
		{name: "kill", prof: &specs.LinuxSeccomp{DefaultAction: specs.ActKill, Syscalls: allowRead}, wantErr: "not supported"},
		{name: "masked", prof: &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{Names: []string{"clone"},
			Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 0, Value: 1, ValueTwo: 1, Op: specs.OpMaskedEqual}}}}}, wantErr: "not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := seccompProgram(tc.prof)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(b) == 0 || len(b)%8 != 0 {
				t.Fatalf("%d bytes: not a BPF program", len(b))
			}
			rets := map[uint32]bool{}
			for i := 0; i < len(b); i += 8 {
				if code := binary.NativeEndian.Uint16(b[i:]); code == unix.BPF_RET|unix.BPF_K {
					rets[binary.NativeEndian.Uint32(b[i+4:])] = true
				}
			}
			if rets[unix.SECCOMP_RET_KILL_THREAD] {
				t.Errorf("the stand-in default (kill thread) is left in the program")
			}
			if !rets[tc.def] {
				t.Errorf("no return of the default action %#x in %v", tc.def, rets)
			}
		})
	}
}

// TestWarm: once Warm has returned, the very first run is forked by the zygote.
func TestWarm(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, d *Driver) {
		if d.rt.gvisor() {
			t.Skip("runsc: no zygote under gVisor (entering the Sentry's namespaces would run Python on the host's kernel, outside gVisor): the agent launches every run")
		}
		id := harness.Sandbox(t, d, baseSpec(t))
		if err := d.Warm(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		if out := drivertest.MustExec(t, d, id, "import os; print(os.getppid())"); out != "0\n" {
			t.Errorf("parent of the first run after Warm: %q, want 0 (the zygote, outside the sandbox)", out)
		}
		onlyInit(t, d, id)
	})
}
