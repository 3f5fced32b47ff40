package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// writeFile creates a file (and its directory) of a fake cgroup filesystem.
func writeFile(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestLayouts: the three layouts (v1, v1 hybrid, v2) parsed from mountinfo, and what Create,
// AddProc and CPUUsage write and read in each, on fake cgroup filesystems (plain directories).
func TestLayouts(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mountinfo  func(root string) string
		v2ctl      string // the v2 root's cgroup.controllers
		memoryV2   bool
		files      map[string]string // after Create("/p/g", limits): path below root → content
		cpuacct    string            // file below root holding CPU time, and its content
		cpuContent string
		wantCPU    time.Duration
	}{
		{
			name: "v1 hybrid",
			mountinfo: func(root string) string {
				return fmt.Sprintf(`31 23 0:28 / %[1]s rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / %[1]s/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / %[1]s/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / %[1]s/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / %[1]s/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / %[1]s/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / %[1]s/unified rw,relatime - cgroup2 cgroup2 rw
`, root)
			},
			files: map[string]string{
				"cpu/p/g/cpu.cfs_period_us": "100000", "cpu/p/g/cpu.cfs_quota_us": "50000", "cpu/p/g/cpu.shares": "1024",
				"memory/p/g/memory.limit_in_bytes": "1048576", "pids/p/g/pids.max": "64",
			},
			cpuacct: "cpuacct/p/g/cpuacct.usage", cpuContent: "1500000000", wantCPU: 1500 * time.Millisecond,
		},
		{
			name: "v1 cpu,cpuacct together",
			mountinfo: func(root string) string {
				return fmt.Sprintf(`32 31 0:29 / %[1]s/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / %[1]s/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / %[1]s/pids rw,relatime - cgroup cgroup rw,pids
`, root)
			},
			files: map[string]string{
				"cpu,cpuacct/p/g/cpu.cfs_quota_us": "50000", "memory/p/g/memory.limit_in_bytes": "1048576", "pids/p/g/pids.max": "64",
			},
			cpuacct: "cpu,cpuacct/p/g/cpuacct.usage", cpuContent: "2000", wantCPU: 2 * time.Microsecond,
		},
		{
			name: "v2",
			mountinfo: func(root string) string {
				return fmt.Sprintf("35 24 0:30 / %s rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n", root)
			},
			v2ctl:    "cpuset cpu io memory hugetlb pids rdma misc",
			memoryV2: true,
			files: map[string]string{
				"cgroup.subtree_control":   "+cpu +memory +pids",
				"p/cgroup.subtree_control": "+cpu +memory +pids",
				"p/g/cpu.max":              "50000 100000", "p/g/cpu.weight": "100", "p/g/memory.max": "1048576", "p/g/pids.max": "64",
			},
			cpuacct: "p/g/cpu.stat", cpuContent: "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n", wantCPU: 2500 * time.Microsecond,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.v2ctl != "" {
				writeFile(t, filepath.Join(root, "cgroup.controllers"), tc.v2ctl)
			}
			l, err := parseLayout(strings.NewReader(tc.mountinfo(root)))
			if err != nil {
				t.Fatal(err)
			}
			if l.MemoryV2() != tc.memoryV2 {
				t.Fatalf("MemoryV2 %v", l.MemoryV2())
			}
			if err := l.Create("/p/g", Limits{CPU: 0.5, CPUWeight: 100, MemoryBytes: 1 << 20, Pids: 64}); err != nil {
				t.Fatal(err)
			}
			for rel, want := range tc.files {
				if got := readFile(t, filepath.Join(root, rel)); got != want {
					t.Errorf("%s = %q, want %q", rel, got, want)
				}
			}
			if err := l.AddProc("/p/g", 1234); err != nil {
				t.Fatal(err)
			}
			for _, m := range l.hierarchies() {
				if got := readFile(t, filepath.Join(Dir(m, "/p/g"), "cgroup.procs")); got != "1234" {
					t.Errorf("%s cgroup.procs = %q", m.Dir, got)
				}
			}
			writeFile(t, filepath.Join(root, tc.cpuacct), tc.cpuContent)
			if cpu, err := l.CPUUsage("/p/g"); err != nil || cpu != tc.wantCPU {
				t.Errorf("CPUUsage = %v, %v; want %v", cpu, err, tc.wantCPU)
			}
		})
	}
	if _, err := parseLayout(strings.NewReader("32 31 0:29 / /x rw - cgroup cgroup rw,cpu\n")); err == nil {
		t.Error("a layout without the memory controller was accepted")
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/x\134y`: `/x\y`} {
		if got := UnescapeMountinfo(in); got != want {
			t.Errorf("%q → %q, want %q", in, got, want)
		}
	}
}

// TestReal: a group on this host's real cgroups (root only): limits, a process in it, its CPU
// time and OOM counter, listing, and removal with the process killed.
func TestReal(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("cgroup tests must run as root under CI")
		}
		t.Skip("needs root")
	}
	l, err := ReadLayout()
	if err != nil {
		t.Fatal(err)
	}
	parent := fmt.Sprintf("/sandboxd-cgroup-test-%d", os.Getpid())
	group := parent + "/g"
	defer l.Remove(parent)
	if err := l.Create(group, Limits{CPU: 0.5, CPUWeight: 50, MemoryBytes: 64 << 20, Pids: 16}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 100")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if err := l.AddProc(group, cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if pids, err := l.Procs(group); err != nil || !slices.Contains(pids, cmd.Process.Pid) {
		t.Fatalf("Procs = %v, %v", pids, err)
	}
	if n, err := l.OOMKills(group); err != nil || n != 0 {
		t.Errorf("OOMKills = %d, %v", n, err)
	}
	waitfor.True(t, 10*time.Second, func() bool { // the process has used some CPU time
		cpu, err := l.CPUUsage(group)
		return err == nil && cpu > 0
	})
	if names, err := l.Children(parent); err != nil || !slices.Equal(names, []string{"g"}) {
		t.Errorf("Children = %v, %v", names, err)
	}
	if err := l.Set(group, Limits{MemoryBytes: 128 << 20}); err != nil {
		t.Errorf("raising the memory limit: %v", err)
	}
	if err := l.Remove(parent); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Error("the process in the removed group was not killed")
	}
	for _, m := range l.Mounts() {
		if _, err := os.Stat(Dir(m, parent)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there", Dir(m, parent))
		}
	}
}

// TestParseOwn: the process's cgroup v2 path from /proc/self/cgroup, on v2 and hybrid hosts.
func TestParseOwn(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"0::/system.slice/sandboxd.service\n", "/system.slice/sandboxd.service"},
		{"12:memory:/x\n1:name=systemd:/y\n0::/\n", "/"},
		{"0::/gone (deleted)\n", "/gone"},
	} {
		if got, err := parseOwn(tc.in); err != nil || got != tc.want {
			t.Errorf("parseOwn(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	if _, err := parseOwn("4:memory:/x\n"); err == nil {
		t.Error("parseOwn without a 0:: line: no error")
	}
	if a, b := ScopeName("/var/lib/sandboxd"), ScopeName("/var/lib/sandboxd/"); a != b || !strings.HasSuffix(a, ".scope") {
		t.Errorf("ScopeName: %q and %q, want one .scope name per directory", a, b)
	}
}

// v2Scratch is a fresh cgroup in a real cgroup2 hierarchy (the host's unified hierarchy, or the
// hybrid host's nearly empty one), removed at the end.
func v2Scratch(t *testing.T) string {
	t.Helper()
	var dir string
	for _, d := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if b, err := os.ReadFile(filepath.Join(d, "cgroup.procs")); err == nil && len(b) >= 0 {
			if _, err := os.Stat(filepath.Join(d, "cgroup.subtree_control")); err == nil {
				dir = d
				break
			}
		}
	}
	if dir == "" || os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but no writable cgroup2 hierarchy is mounted (needs root)")
		}
		t.Skip("needs root and a cgroup2 hierarchy")
	}
	d := filepath.Join(dir, fmt.Sprintf("sandboxd-test-%d", os.Getpid()))
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = removeTree(d) })
	return d
}

// TestMoveAllAndKill, on a real cgroup2 hierarchy: moveAll empties a cgroup into its leaf (the
// "no internal processes" rule Delegate obeys), and removeTree ends a process tree that forks
// (cgroup.kill) and removes the groups.
func TestMoveAllAndKill(t *testing.T) {
	d := v2Scratch(t)
	var cmds []*exec.Cmd
	for range 3 {
		c := exec.Command("sleep", "60")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		writeFile(t, filepath.Join(d, "cgroup.procs"), fmt.Sprint(c.Process.Pid))
	}
	leaf := filepath.Join(d, supervisorLeaf)
	if err := moveAll(d, leaf); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(d, "cgroup.procs")); got != "" {
		t.Errorf("after moveAll the cgroup still holds %q", got)
	}
	if got := strings.Fields(readFile(t, filepath.Join(leaf, "cgroup.procs"))); len(got) != 3 {
		t.Errorf("the leaf holds %v, want the 3 processes", got)
	}
	// A shell that keeps forking, in a child group: removeTree must end it and remove both.
	sh := exec.Command("sh", "-c", "while :; do sleep 0.01 & wait; done")
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(leaf, "cgroup.procs"), fmt.Sprint(sh.Process.Pid))
	if err := removeTree(d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("removeTree left %s: %v", d, err)
	}
	_ = sh.Wait()
	for _, c := range append(cmds, sh) {
		if c.ProcessState == nil {
			_ = c.Wait()
		}
		if ws := c.ProcessState.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("%v ended %v, want killed", c.Args, c.ProcessState)
		}
	}
}

// TestDelegateXattr reads the xattr systemd puts on a delegated group (user.delegate here: a
// test that is not root cannot write trusted.*).
func TestDelegateXattr(t *testing.T) {
	dir := t.TempDir()
	if yes, _ := DelegateXattr(dir); yes {
		t.Fatal("a plain directory reads as delegated")
	}
	if err := unix.Setxattr(dir, "user.delegate", []byte("1"), 0); err != nil {
		t.Skipf("no user xattrs on %s: %v", dir, err)
	}
	if yes, err := DelegateXattr(dir); !yes || err != nil {
		t.Errorf("delegated %v, %v", yes, err)
	}
}
