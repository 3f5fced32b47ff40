package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// stopBound is how long a stop of a few idle sandboxes may take (the server's grace is 20 s; a
// clean stop of 4 sandboxes takes about half a second on the project's 2-core VM).
const stopBound = 10 * time.Second

// TestStop: however a stop is asked — Ctrl-C (SIGINT to the terminal's whole foreground process
// group), Ctrl-C twice, SIGTERM to the main process (a service manager), SIGTERM to the group —
// the server exits 0 within a bound, having destroyed every sandbox (warm ones too): no process
// of any sandbox left, no cgroup, network namespace, veth, nftables table or mount, and every
// record ended (destroyed, destroyed_at set, runs final) by the stop itself — read from the data
// directory before any restart, so nothing was left to the next start's reconciliation.
func TestStop(t *testing.T) {
	hostOnly(t, "the server's signals and its host processes")
	requireEnv(t)
	group := func(sig syscall.Signal) func(*server, *os.File) {
		return func(s *server, _ *os.File) { _ = syscall.Kill(-s.cmd.Process.Pid, sig) }
	}
	ways := []struct {
		name    string
		tty     bool // the server runs on a terminal of its own (else in a process group of its own)
		ask     func(s *server, tty *os.File)
		wantLog string
	}{
		{"Ctrl-C on its terminal", true, func(_ *server, tty *os.File) { _, _ = tty.Write([]byte{3}) }, "signal=interrupt"},
		{"SIGINT to the group", false, group(syscall.SIGINT), "signal=interrupt"},
		{"SIGINT twice to the group", false, func(s *server, tty *os.File) {
			group(syscall.SIGINT)(s, tty)
			// The second comes once the first has started the stop (the stop of 4 sandboxes
			// takes longer than this).
			waitfor.True(s.t, 30*time.Second, func() bool { return s.logged("sandboxd stopping") })
			group(syscall.SIGINT)(s, tty)
		}, "second signal: killing sandboxes now"},
		{"SIGTERM to the main pid", false, func(s *server, _ *os.File) { _ = s.cmd.Process.Signal(syscall.SIGTERM) }, "signal=terminated"},
		{"SIGTERM to the group", false, group(syscall.SIGTERM), "signal=terminated"},
	}
	for _, w := range ways {
		t.Run(w.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "sbxd-stop-") // short: socket paths have a length limit
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			var extra []string
			if wasmImage != "" {
				extra = append(extra, "--wasm-image", "python:3.11-wasi="+wasmImage)
			}
			// A process group of its own, as a shell gives a foreground job: the test signals that
			// group without signalling itself. Or a terminal: a session whose foreground group
			// the server's first process leads, as a shell without job control would start it.
			var term *os.File
			prep := func(c *exec.Cmd) { c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} }
			if w.tty {
				var tty *os.File
				term, tty = openPTY(t)
				prep = func(c *exec.Cmd) {
					c.Stdin = tty
					c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
				}
				defer tty.Close()
			}
			s, err := launchWith(freeAddr(t), dir, prep, extra...)
			if err != nil {
				t.Fatal(err)
			}
			s.t = t
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("sandboxd logs:\n%s", s.logs.String())
				}
				// Leave nothing behind, also when the server under test did not: stop it if it
				// still runs, and let a server on the same data dir reconcile what it left.
				if s.cmd.ProcessState == nil {
					_ = s.cmd.Process.Signal(syscall.SIGTERM)
					timer := time.AfterFunc(30*time.Second, func() { _ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) })
					_ = s.cmd.Wait()
					timer.Stop()
				}
				if !s.cmd.ProcessState.Success() {
					if s2, err := launch(freeAddr(t), dir); err == nil {
						s2.stop()
					} else {
						t.Errorf("reconcile %s after the test: %v", dir, err)
					}
				}
			})
			key := s.newKey("stop", "pro")
			var ids []string
			for i := range 3 {
				id := s.create(key, map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/out"}}})
				if r := s.run(key, id, fmt.Sprintf("open('/workspace/out/f', 'w').write('x')\nresult = %d", i), 30); r["result"] != float64(i) {
					t.Fatalf("run in %s: %v", id, r)
				}
				ids = append(ids, id)
			}
			// One sandbox is busy when the stop comes: its run must end cancelled.
			status, m := s.do("POST", "/api/sandbox/"+ids[0]+"/run", key, map[string]any{"code": "while True: pass", "async": true, "timeout": 600})
			if status != 202 {
				t.Fatalf("async run: %d %v", status, m)
			}
			busyRun := m["run_id"].(string)
			if wasmImage != "" {
				id := s.createReady(key, map[string]any{"agent_id": "e2e", "mode": "wasm"})
				if r := s.run(key, id, "result = 6*7", 30); r["result"] != float64(42) {
					t.Fatalf("wasm run: %v", r)
				}
				ids = append(ids, id)
			}
			// The busy run is running, and the pool is full (the default 2 warm sandboxes for
			// the one shape asked for), which the stop must destroy too: none is half made.
			s.awaitRun(key, ids[0], busyRun, "running")
			waitWarm(t, s, 2, ids...)
			before := stopSnapshot(t, s.cmd.Process.Pid, dir, ids)

			start := time.Now()
			w.ask(s, term)
			exited := make(chan error, 1)
			go func() { exited <- s.cmd.Wait() }()
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("sandboxd exit after %s: %v (want status 0)", w.name, err)
				}
			case <-time.After(stopBound):
				t.Fatalf("sandboxd still running %v after %s", stopBound, w.name)
			}
			t.Logf("%s: stopped %d sandboxes in %v", w.name, len(ids), time.Since(start).Round(time.Millisecond))
			logs := s.logs.String()
			for _, want := range []string{w.wantLog, "sandboxd stopped"} {
				if !strings.Contains(logs, want) {
					t.Errorf("the log does not say %q", want)
				}
			}
			before.assertGone(t)
			assertRecordsEnded(t, dir, "stop", ids)
			if got := runStatus(t, dir, ids[0], busyRun); got != "cancelled" {
				t.Errorf("the run cut by the stop is %q, want cancelled", got)
			}
		})
	}
}

// stopState is what of a server and its sandboxes lives before a stop.
type stopState struct {
	dir      string
	procs    map[int]string // pid → start time: the server's descendants and every sandbox's processes
	ids      []string       // every sandbox the driver has (warm ones included)
	veths    []string
	tables   []string
	netns    map[string]bool
	hostNet  string
	sandboxN int
}

// stopSnapshot records the processes of server mainPid (its descendants: the re-executed child,
// zygotes, WASM workers, helpers) and of every container sandbox of data dir dir (their cgroups:
// a container's init is reparented away from the server), with their network.
func stopSnapshot(t *testing.T, mainPid int, dir string, ids []string) *stopState {
	t.Helper()
	st := &stopState{dir: dir, procs: map[int]string{}, netns: map[string]bool{}, hostNet: hostNet()}
	all := containerIDs(dir)
	for _, id := range ids {
		if !slices.Contains(all, id) && strings.HasPrefix(id, "sbx_") {
			all = append(all, id)
		}
	}
	st.ids = all
	for pid, start := range descendants(mainPid) {
		st.procs[pid] = start
	}
	for _, id := range containerIDs(dir) {
		n := 0
		for pid, start := range cgroupProcs(id) {
			st.procs[pid] = start
			n++
		}
		if n == 0 && slices.Contains(ids, id) {
			t.Fatalf("sandbox %s has no process before the stop: the checks after it would prove nothing", id)
		}
		for ns := range netNamespaces(id) {
			if ns != st.hostNet {
				st.netns[ns] = true
			}
		}
		st.sandboxN++
	}
	if st.sandboxN == 0 {
		t.Fatal("no container sandbox before the stop")
	}
	st.veths = sandboxVeths(t, all...)
	if len(st.veths) < st.sandboxN {
		t.Fatalf("want a veth per container sandbox (%d), found %v", st.sandboxN, st.veths)
	}
	st.tables = nftTables(t, st.veths)
	if len(st.tables) != 1 {
		t.Fatalf("the sandboxes' rules should live in one host table, found %v", st.tables)
	}
	return st
}

// assertGone fails unless nothing of the snapshot is left on the host.
func (st *stopState) assertGone(t *testing.T) {
	t.Helper()
	var left []string
	// A container's init SIGKILLed a moment ago may still be exiting — its memory released, a
	// SIGKILL pending, it waits for the rest of its PID namespace to be reaped — which takes
	// seconds on a loaded 2-core host: give it time to be a zombie or gone.
	start := time.Now()
	for end := start.Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		left = left[:0]
		for pid, start := range st.procs {
			if s, state, ok := procStart(pid); ok && s == start && state != "Z" && state != "X" {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
				cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				f := procStatFields(pid)
				left = append(left, fmt.Sprintf("%d %s state %s ppid %s (%s)", pid, bytes.TrimSpace(comm), state, f[1],
					bytes.ReplaceAll(bytes.TrimRight(cmd, "\x00"), []byte{0}, []byte{' '})))
			}
		}
		if len(left) == 0 || time.Now().After(end) {
			break
		}
	}
	if el := time.Since(start); el > time.Second {
		t.Logf("the sandboxes' last processes took %v more to end", el.Round(time.Millisecond))
	}
	if len(left) != 0 {
		t.Errorf("%d of the %d processes of the server and its sandboxes outlive the stop: %v", len(left), len(st.procs), left)
	}
	for _, id := range st.ids {
		if n := sandboxProcesses(t, id); n != 0 {
			t.Errorf("sandbox %s: %d processes left in its cgroup", id, n)
		}
	}
	if d := cgroupDirs(st.ids...); len(d) != 0 {
		t.Errorf("cgroups outlive the stop: %v", d)
	}
	if left := networkLeft(t, st.veths); len(left) != 0 {
		t.Errorf("network outlives the stop: %v", left)
	}
	held := netNamespaces("")
	for ns := range st.netns {
		if held[ns] {
			t.Errorf("a sandbox's network namespace %s outlives the stop", ns)
		}
	}
	if left := tablesLeft(t, st.tables); len(left) != 0 {
		t.Errorf("host tables outlive the stop: %v", left)
	}
	// (Below the data dir: the dir itself may be a mount point, as in TestSystemdService.)
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(st.dir+"/")) {
		t.Errorf("mounts of the data dir outlive the stop:\n%s", mi)
	}
	if runtimes, _ := filepath.Glob(filepath.Join(st.dir, "container", "runtime", "*", "sbx_*")); len(runtimes) != 0 {
		t.Errorf("containers outlive the stop: %v", runtimes)
	}
}

// assertRecordsEnded opens the data dir's records (the server is gone) and fails unless every
// sandbox of account is destroyed with its destroyed_at set, by the stop (reason server_restart,
// one sandbox.destroyed event each), with no run left queued or running.
func assertRecordsEnded(t *testing.T, dir, account string, ids []string) {
	t.Helper()
	ctx := context.Background()
	st := openRecords(t, dir)
	if live, err := st.LiveSandboxes(ctx); err != nil || len(live) != 0 {
		t.Fatalf("sandboxes still live in the records after the stop (left to the next start's reconciliation): %v %v", live, err)
	}
	acct, err := st.AccountByName(ctx, account)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		sb, err := st.GetSandbox(ctx, acct.ID, id)
		if err != nil {
			t.Fatalf("record of %s: %v", id, err)
		}
		if sb.Status != store.SandboxDestroyed || sb.DestroyedAt == nil || sb.DestroyReason != "server_restart" {
			t.Errorf("record of %s after the stop: status %q destroyed_at %v reason %q", id, sb.Status, sb.DestroyedAt, sb.DestroyReason)
		}
		runs, _, err := st.ListRuns(ctx, id, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range runs {
			if r.Status == "queued" || r.Status == "running" || r.FinishedAt == nil {
				t.Errorf("run %s of %s left %q by the stop", r.ID, id, r.Status)
			}
		}
		evs, _, err := st.ListEvents(ctx, store.EventFilter{AccountID: acct.ID, SandboxID: id, Type: "sandbox.destroyed"})
		if err != nil || len(evs) != 1 {
			t.Errorf("sandbox %s: %d sandbox.destroyed events (%v), want 1", id, len(evs), err)
		}
	}
}

// openRecords opens the records of data dir dir (its server stopped) until the test ends.
func openRecords(t *testing.T, dir string) store.Store {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(dir, "sandboxd.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// runStatus reads a run's status from the data dir's records.
func runStatus(t *testing.T, dir, sandboxID, runID string) string {
	t.Helper()
	r, err := openRecords(t, dir).GetRun(context.Background(), sandboxID, runID)
	if err != nil {
		t.Fatal(err)
	}
	return r.Status
}

// containerIDs lists the containers the data dir's driver has runtime state for (warm sandboxes
// included).
func containerIDs(dir string) []string {
	var ids []string
	m, _ := filepath.Glob(filepath.Join(dir, "container", "runtime", "*", "sbx_*"))
	for _, p := range m {
		ids = append(ids, filepath.Base(p))
	}
	return ids
}

// descendants returns every live process below pid (and pid), with its start time.
func descendants(pid int) map[int]string {
	children := processChildren()
	out := map[int]string{}
	for todo := []int{pid}; len(todo) > 0; {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if s, _, ok := procStart(p); ok {
			out[p] = s
		}
		todo = append(todo, children[p]...)
	}
	return out
}

// processChildren maps every process of the host to its children, by their parent's PID (a
// child forked by any thread of a process has the process's PID as its parent).
func processChildren() map[int][]int {
	children := map[int][]int{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		p, _ := strconv.Atoi(filepath.Base(d))
		if f := procStatFields(p); len(f) > 1 {
			pp, _ := strconv.Atoi(f[1])
			children[pp] = append(children[pp], p)
		}
	}
	return children
}

// cgroupProcs returns the processes in sandbox id's cgroup, with their start times.
func cgroupProcs(id string) map[int]string {
	out := map[int]string{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(d + "/cgroup")
		if err != nil || !strings.Contains(string(b), "/sandboxd/"+id) {
			continue
		}
		p, _ := strconv.Atoi(filepath.Base(d))
		if s, _, ok := procStart(p); ok {
			out[p] = s
		}
	}
	return out
}

// procStart returns process pid's start time (clock ticks since boot: with the pid, it names
// one process) and state.
func procStart(pid int) (start, state string, ok bool) {
	f := procStatFields(pid)
	if len(f) < 20 {
		return "", "", false
	}
	return f[19], f[0], true
}

// procStatFields returns /proc/pid/stat's fields after the command name (state first).
func procStatFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// tablesLeft returns which of the nftables tables named exist on the host.
func tablesLeft(t *testing.T, names []string) []string {
	t.Helper()
	nc, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tbls, err := nc.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, tb := range tbls {
		if slices.Contains(names, tb.Name) {
			left = append(left, tb.Name)
		}
	}
	return left
}

// openPTY opens a pseudo-terminal: its master (the test's side, closed when the test ends) and its
// terminal (given to the server as its controlling terminal; ISIG on, so ^C is SIGINT to the
// foreground process group).
func openPTY(t *testing.T) (master, tty *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("pty number: %v", err)
	}
	tty, err = os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Nothing reads the master: its output would fill the pty's buffer and block the server's
	// writes to the terminal. Keep reading it.
	go func() { _, _ = io.Copy(io.Discard, m) }()
	return m, tty
}
