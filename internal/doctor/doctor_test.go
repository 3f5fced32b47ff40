package doctor

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// Mountinfo lines of the three layouts.
const (
	v2Mounts = "30 22 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
	v1Mounts = "30 22 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n" +
		"31 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n" +
		"32 30 0:29 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n" +
		"34 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n" +
		"38 30 0:35 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n" +
		"39 30 0:36 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
	hybridMounts = v1Mounts + "40 30 0:37 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
	allCgroups   = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\ncpuacct\t2\t1\t1\nmemory\t4\t1\t1\npids\t8\t1\t1\n"
)

// fake is a host made of files in a temporary directory, with hooks that answer as told.
type fake struct {
	t       *testing.T
	root    string
	h       *Host
	cfg     config.Config
	fail    map[string]string // command base name → the output it fails with
	systemd string            // what systemctl show prints
	delegd  bool              // what the delegate xattr says
	free    uint64            // blocks of 4 KiB available on the data dir
	fsType  int64             // the data dir's file system (statfs magic)
}

// newFake is a healthy cgroup v2 host without systemd, sandboxd in the root cgroup, every tool
// on PATH, both images cached.
func newFake(t *testing.T) *fake {
	f := &fake{t: t, root: t.TempDir(), fail: map[string]string{}, free: 10 << 20, fsType: unix.EXT4_SUPER_MAGIC}
	f.write("proc/self/status", "Name:\tsandboxd\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\nSeccomp:\t0\n")
	f.write("proc/sys/kernel/osrelease", "6.1.0-13-amd64\n")
	f.write("proc/sys/user/max_user_namespaces", "15000\n")
	f.write("proc/filesystems", "nodev\tcgroup2\n\text4\nnodev\toverlay\n")
	f.write("proc/cgroups", allCgroups)
	f.write("proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n")
	f.write("proc/self/cgroup", "0::/\n")
	f.write("proc/self/mountinfo", v2Mounts)
	f.write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
	for _, tool := range []string{"crun", "runc", "unshare", "cat", "nsenter", "mkfs.ext4", "debootstrap", "systemctl", "systemd-run", "umount"} {
		f.write("bin/"+tool, "#!/bin/sh\n")
		os.Chmod(filepath.Join(f.root, "bin", tool), 0o755)
	}
	f.write("sbin/.keep", "")
	f.write("scripts/build-image.sh", "image recipe\n")
	f.write("scripts/image/data.packages", "python3=3\n")
	f.write("scripts/build-python-wasm.sh", "wasm recipe\n")
	f.write("scripts/wasm/sqlite-wasi-shim.h", "shim\n")
	f.write("libexec/sandbox-agent", "agent")
	f.h = &Host{
		Proc: f.path("proc"), Sys: f.path("sys"), Dev: f.path("dev"), Run: f.path("run"),
		Modules: f.path("modules"), Sbin: f.path("sbin"), Cache: f.path("cache"), Scripts: f.path("scripts"),
		LookPath: f.lookPath, Statfs: f.statfs, Exec: f.exec,
		Seccomp:  func() error { return nil },
		Nft:      func() (int, error) { return 3, nil },
		Loop:     func(dev string) (string, error) { return filepath.Join(dev, "loop0"), nil },
		Delegate: func(string) (bool, error) { return f.delegd, nil },
	}
	d := &doctor{h: f.h}
	f.write("cache/images/agent-sandbox-data-"+d.recipeHash(imageRecipe...)+"/.complete", "")
	f.write("cache/python-wasm/python-3.11-wasi-"+d.recipeHash(wasmRecipe...)+"/.complete", "")
	f.cfg = config.Config{DataDir: f.path("data"), AgentBin: f.path("libexec/sandbox-agent")}
	return f
}

func (f *fake) path(rel string) string { return filepath.Join(f.root, rel) }

func (f *fake) write(rel, content string) {
	f.t.Helper()
	p := f.path(rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fake) remove(rel string) {
	if err := os.RemoveAll(f.path(rel)); err != nil {
		f.t.Fatal(err)
	}
}

// lookPath finds commands in the fake's bin directory only: its PATH.
func (f *fake) lookPath(file string) (string, error) {
	p := f.path("bin/" + file)
	if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
		return p, nil
	}
	return "", &exec.Error{Name: file, Err: exec.ErrNotFound}
}

func (f *fake) statfs(path string, st *unix.Statfs_t) error {
	*st = unix.Statfs_t{Type: f.fsType, Bsize: 4096, Bavail: f.free}
	return nil
}

// exec answers --version with "<name> version 1.8.1", systemctl with f.systemd, fails the
// commands in f.fail, and runs nothing.
func (f *fake) exec(cmd *exec.Cmd) ([]byte, error) {
	base := filepath.Base(cmd.Path)
	if out, bad := f.fail[base]; bad {
		return []byte(out), errors.New("exit status 1")
	}
	switch {
	case len(cmd.Args) > 1 && cmd.Args[1] == "--version":
		return []byte(base + " version 1.8.1\ncommit: x\n"), nil
	case base == "systemctl":
		return []byte(f.systemd + "\n"), nil
	}
	return nil, nil
}

// result runs every check and returns the one whose name starts with name.
func (f *fake) result(name string) Result {
	f.t.Helper()
	rep := Run(context.Background(), f.h, f.cfg)
	for _, r := range rep.Results {
		if strings.HasPrefix(r.Name, name) {
			return r
		}
	}
	f.t.Fatalf("no result named %q in %+v", name, rep.Results)
	return Result{}
}

func TestHealthyHost(t *testing.T) {
	f := newFake(t)
	rep := Run(context.Background(), f.h, f.cfg)
	for _, r := range rep.Results {
		if r.Status != OK {
			t.Errorf("%s: %s %s (fix: %s)", r.Name, r.Status, r.Detail, r.Fix)
		}
	}
	if !rep.OK {
		t.Error("report not OK")
	}
}

func TestChecks(t *testing.T) {
	const delegate = "run it in a unit with Delegate=yes (deploy/sandboxd.service carries it), or let serve start itself in a delegated scope: it needs systemd-run (Debian: apt-get install systemd)"
	for _, tc := range []struct {
		name   string
		setup  func(f *fake)
		check  string // the result's name prefix
		status Status
		detail string // a part of the detail
		fix    string // the exact fix
	}{
		{"not root", func(f *fake) {
			f.write("proc/self/status", "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\nSeccomp:\t0\n")
		}, "root", Missing, "running as uid 1000", "run it as root: sudo make run (or sudo bin/sandboxd …)"},
		{"root without CAP_SYS_ADMIN", func(f *fake) {
			f.write("proc/self/status", "Uid:\t0\t0\t0\t0\nCapEff:\t00000000a80425fb\nSeccomp:\t2\n")
		}, "root", Missing, "without CAP_SYS_ADMIN", "give it those capabilities (in a container: run it privileged)"},
		{"old kernel", func(f *fake) { f.write("proc/sys/kernel/osrelease", "5.4.0-150-generic\n") },
			"kernel", Missing, "5.4.0-150-generic is older than 5.8, which LOOP_CONFIGURE",
			"boot a kernel ≥ 5.8 (Debian 12 ships 6.1, Ubuntu 22.04 5.15, RHEL 9 5.14)"},
		{"no user namespaces allowed", func(f *fake) { f.write("proc/sys/user/max_user_namespaces", "0\n") },
			"user namespaces", Missing, "user.max_user_namespaces is 0",
			"sysctl -w user.max_user_namespaces=15000, and keep it in /etc/sysctl.d/90-sandboxd.conf"},
		{"unshare refused by apparmor", func(f *fake) {
			f.fail["unshare"] = "unshare: unshare failed: Operation not permitted"
			f.write("proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1\n")
		}, "user namespaces", Missing, "Operation not permitted", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"},
		{"no unshare", func(f *fake) { f.remove("bin/unshare") },
			"user namespaces", Missing, "unshare is not on PATH", "apt-get install util-linux"},
		{"no mount namespace", func(f *fake) { f.fail["cat"] = "fork/exec: operation not permitted" },
			"mount namespace", Missing, "CLONE_NEWNS failed", "needs root with CAP_SYS_ADMIN (in a container: run it privileged)"},
		{"hybrid: the cgroup2 mount unmounted in a new mount namespace", func(f *fake) {
			f.write("proc/self/mountinfo", hybridMounts)
			f.fail["umount"] = "umount: /sys/fs/cgroup/unified: not mounted."
		}, "mount namespace", Missing, "umount /sys/fs/cgroup/unified with CLONE_NEWNS failed", "needs root with CAP_SYS_ADMIN (in a container: run it privileged)"},
		{"no seccomp", func(f *fake) { f.write("proc/self/status", "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n") },
			"seccomp", Missing, "no Seccomp:", "boot a kernel built with CONFIG_SECCOMP_FILTER=y (every distribution's is)"},
		{"overlay as a module", func(f *fake) {
			f.write("proc/filesystems", "\text4\n")
			f.write("modules/6.1.0-13-amd64/modules.dep", "kernel/fs/overlayfs/overlay.ko.xz:\n")
		}, "overlayfs", OK, "overlay module, loaded at the first mount", ""},
		{"overlay as a module before depmod ran", func(f *fake) {
			f.write("proc/filesystems", "\text4\n")
			f.write("modules/6.1.0-13-amd64/modules.order", "kernel/fs/ext4/ext4.ko\nkernel/fs/overlayfs/overlay.ko\n")
		}, "overlayfs", OK, "overlay module", ""},
		{"no overlay", func(f *fake) { f.write("proc/filesystems", "\text4\n") },
			"overlayfs", Missing, "no overlay module", "modprobe overlay (a kernel built with CONFIG_OVERLAY_FS, as every distribution's)"},
		{"no nftables", func(f *fake) { f.h.Nft = func() (int, error) { return 0, errors.New("protocol not supported") } },
			"nftables", Missing, "protocol not supported", "modprobe nf_tables (a kernel built with CONFIG_NF_TABLES, as every distribution's)"},
		{"nftables refused", func(f *fake) { f.h.Nft = func() (int, error) { return 0, os.ErrPermission } },
			"nftables", Missing, "permission denied", "run it as root"},
		{"no loop devices", func(f *fake) { f.h.Loop = func(string) (string, error) { return "", os.ErrNotExist } },
			"sandbox disks", Missing, "no loop device", "modprobe loop (in a container: give it /dev/loop-control and /dev/loop*)"},
		{"mkfs.ext4 in /sbin only", func(f *fake) {
			f.remove("bin/mkfs.ext4")
			f.write("sbin/mkfs.ext4", "")
		}, "sandbox disks", OK, "sbin/mkfs.ext4", ""},
		{"no mkfs.ext4", func(f *fake) { f.remove("bin/mkfs.ext4") },
			"sandbox disks", Missing, "no mkfs.ext4", "apt-get install e2fsprogs"},
		{"cgroup v2 without the memory controller", func(f *fake) {
			f.write("sys/fs/cgroup/cgroup.controllers", "cpu io pids\n")
			f.write("proc/cgroups", strings.Replace(allCgroups, "memory\t4\t1\t1", "memory\t0\t1\t0", 1))
		}, "cgroup v2", Missing, "controller memory not in cgroup.controllers of /",
			"memory: add the kernel parameter cgroup_enable=memory (Raspberry Pi OS: cgroup_enable=memory cgroup_memory=1) and reboot"},
		{"cgroup v2, memory disabled on the command line", func(f *fake) {
			f.write("sys/fs/cgroup/cgroup.controllers", "cpu io pids\n")
			f.write("proc/cgroups", strings.Replace(allCgroups, "memory\t4\t1\t1", "memory\t0\t1\t0", 1))
			f.write("proc/cmdline", "root=/dev/sda1 cgroup_disable=memory quiet\n")
		}, "cgroup v2", Missing, "controller memory not", "memory: remove cgroup_disable=memory from the kernel command line"},
		{"cgroup v2 under systemd, not delegated", func(f *fake) {
			f.write("run/systemd/system/.keep", "")
			f.write("proc/self/cgroup", "0::/system.slice/sandboxd.service\n")
			f.write("sys/fs/cgroup/system.slice/sandboxd.service/cgroup.controllers", "cpu memory pids\n")
			f.write("sys/fs/cgroup/system.slice/cgroup.controllers", "cpu memory pids\n")
			f.systemd = "no"
		}, "cgroup v2", OK, "in a transient scope below /system.slice: /system.slice/sandboxd.service is not delegated (sandboxd.service has Delegate=no)", ""},
		{"cgroup v2 under systemd, not delegated, no systemd-run", func(f *fake) {
			f.write("run/systemd/system/.keep", "")
			f.write("proc/self/cgroup", "0::/system.slice/sandboxd.service\n")
			f.systemd = "no"
			os.Remove(f.path("bin/systemd-run"))
		}, "cgroup v2", Missing, "not delegated to sandboxd (sandboxd.service has Delegate=no), and systemd-run is missing", delegate},
		{"cgroup v2 under systemd, delegated", func(f *fake) {
			f.write("run/systemd/system/.keep", "")
			f.write("proc/self/cgroup", "0::/system.slice/sandboxd.service\n")
			f.write("sys/fs/cgroup/system.slice/sandboxd.service/cgroup.controllers", "cpu memory pids\n")
			f.delegd = true
		}, "cgroup v2", OK, "controllers cpu memory pids delegated at /system.slice/sandboxd.service", ""},
		{"cgroup v2 under systemd, a session scope without memory", func(f *fake) {
			f.write("run/systemd/system/.keep", "")
			f.write("proc/self/cgroup", "0::/user.slice/user-0.slice/session-3.scope\n")
			f.write("sys/fs/cgroup/user.slice/user-0.slice/session-3.scope/cgroup.controllers", "pids\n")
			f.write("sys/fs/cgroup/system.slice/cgroup.controllers", "pids\n")
		}, "cgroup v2", Missing, "controller cpu, memory not in cgroup.controllers of /system.slice",
			"cpu: " + delegate + "; memory: " + delegate},
		{"cgroup v2, a nested group without systemd", func(f *fake) {
			f.write("proc/self/cgroup", "0::/jobs/sandboxd\n")
			f.write("sys/fs/cgroup/jobs/sandboxd/cgroup.controllers", "cpu pids\n")
		}, "cgroup v2", Missing, "controller memory not", "memory: echo +memory > /sys/fs/cgroup/jobs/cgroup.subtree_control"},
		{"cgroup v2, a group right below the root", func(f *fake) {
			f.write("proc/self/cgroup", "0::/sandboxd\n")
			f.write("sys/fs/cgroup/sandboxd/cgroup.controllers", "\n")
		}, "cgroup v2", Missing, "controller cpu, memory, pids not", "cpu: echo +cpu > /sys/fs/cgroup/cgroup.subtree_control; " +
			"memory: echo +memory > /sys/fs/cgroup/cgroup.subtree_control; pids: echo +pids > /sys/fs/cgroup/cgroup.subtree_control"},
		{"cgroup v1", func(f *fake) { f.write("proc/self/mountinfo", v1Mounts) },
			"cgroup v1", OK, "controllers cpu cpuacct memory pids on v1", ""},
		{"cgroup v1 without pids mounted", func(f *fake) {
			f.write("proc/self/mountinfo", strings.Replace(v1Mounts, "38 30 0:35 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n", "", 1))
		}, "cgroup v1", Missing, "controller pids not mounted", "pids: mount -t cgroup -o pids cgroup /sys/fs/cgroup/pids"},
		{"cgroup v1 hybrid", func(f *fake) { f.write("proc/self/mountinfo", hybridMounts) },
			"cgroup v1 hybrid", OK, "cgroup2 at " + "", ""},
		{"hybrid host with crun only", func(f *fake) {
			f.write("proc/self/mountinfo", hybridMounts)
			f.remove("bin/runc")
		}, "OCI runtime", OK, "crun 1.8.1: serve uses crun (crun refuses cgroup v1 hybrid hosts: sandboxd runs it in its own mount namespace", ""},
		{"no crun nor runc on PATH", func(f *fake) { f.remove("bin/crun"); f.remove("bin/runc") },
			"OCI runtime", Missing, "neither crun nor runc on PATH", "apt-get install crun"},
		{"runc only", func(f *fake) { f.remove("bin/crun") },
			"OCI runtime", Warn, "runc 1.8.1: serve uses runc", "apt-get install crun"},
		{"--runtime runc, not on PATH", func(f *fake) { f.remove("bin/runc"); f.cfg.Runtime = "runc" },
			"OCI runtime", Missing, "runc (--runtime) not on PATH", "apt-get install runc"},
		{"no cat", func(f *fake) { f.remove("bin/cat") },
			"helper tools", Missing, "cat not on PATH", "apt-get install coreutils"},
		{"no cat with runc", func(f *fake) { f.remove("bin/cat"); f.cfg.Runtime = "runc" },
			"helper tools", OK, "", ""},
		{"no nsenter", func(f *fake) { f.remove("bin/nsenter") },
			"helper tools", Warn, "without a zygote", "apt-get install util-linux"},
		{"no sandbox-agent", func(f *fake) { f.cfg.AgentBin = f.path("nowhere/sandbox-agent") },
			"sandbox-agent", Missing, "not found", "make build (or pass --agent-bin)"},
		{"image not built, no debootstrap", func(f *fake) { f.remove("cache/images"); f.remove("bin/debootstrap") },
			"default image", Missing, "not built", "apt-get install debootstrap (Fedora/RHEL: dnf install debootstrap, from EPEL on RHEL)"},
		{"image cached, no debootstrap", func(f *fake) { f.remove("bin/debootstrap") },
			"default image", Warn, "cached at", "apt-get install debootstrap (Fedora/RHEL: dnf install debootstrap, from EPEL on RHEL)"},
		{"image not built, debootstrap there", func(f *fake) { f.remove("cache/images") },
			"default image", OK, "make run builds it", ""},
		{"image of an older recipe only", func(f *fake) {
			f.write("scripts/build-image.sh", "a new recipe\n")
			f.remove("bin/debootstrap")
		}, "default image", Missing, "not built", "apt-get install debootstrap (Fedora/RHEL: dnf install debootstrap, from EPEL on RHEL)"},
		{"image of older pins only", func(f *fake) {
			f.write("scripts/image/data.packages", "python3=4\n")
			f.remove("bin/debootstrap")
		}, "default image", Missing, "not built", "apt-get install debootstrap (Fedora/RHEL: dnf install debootstrap, from EPEL on RHEL)"},
		{"scripts unknown: any cached image", func(f *fake) { f.h.Scripts = "" },
			"default image", OK, "cached at " + "", ""},
		{"--image without python3", func(f *fake) {
			f.write("img/rootfs/etc/os-release", "")
			f.cfg.Images = append(f.cfg.Images, imageOf(f.path("img/rootfs"), "container"))
		}, "images", Missing, "has no usr/bin/python3", "build it (make image, make wasm), or fix --image/--wasm-image/--config"},
		{"full data dir", func(f *fake) { f.free = 100 },
			"data dir", Missing, "400 KiB free, below the floor of 1 GiB",
			"free space on that file system, pass a --data-dir on a larger one, or lower disk_free_floor_bytes in --config"},
		{"data dir above a lowered floor", func(f *fake) { f.free = 100; f.cfg.DiskFreeFloor = 100 << 10 },
			"data dir", OK, "ext4, 400 KiB free (floor 100 KiB), sparse files", ""},
		{"data dir on overlayfs", func(f *fake) { f.fsType = unix.OVERLAYFS_SUPER_MAGIC },
			"data dir", Missing, "is on overlayfs, which cannot hold the upper layer", "pass a --data-dir on ext4, xfs, btrfs or tmpfs"},
		{"no python.wasm", func(f *fake) { f.remove("cache/python-wasm") },
			"WASM mode", Warn, "python.wasm is not built", "make wasm builds it, 4–8 min (make run does it after the doctor)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			tc.setup(f)
			r := f.result(tc.check)
			if r.Status != tc.status || !strings.Contains(r.Detail, tc.detail) || r.Fix != tc.fix {
				t.Errorf("got %s %q %q\n  fix %q\nwant %s, detail with %q\n  fix %q", r.Status, r.Name, r.Detail, r.Fix, tc.status, tc.detail, tc.fix)
			}
		})
	}
}

// TestPrint: aligned lines, the fix after the detail, the summary; exit status from OK.
func TestPrint(t *testing.T) {
	f := newFake(t)
	f.remove("bin/crun")
	f.remove("bin/runc")
	rep := Run(context.Background(), f.h, f.cfg)
	if rep.OK {
		t.Fatal("report OK without an OCI runtime")
	}
	var b strings.Builder
	if err := rep.Print(&b, false); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"ok       root             uid 0 with CAP_SYS_ADMIN and CAP_NET_ADMIN\n",
		"missing  OCI runtime      neither crun nor runc on PATH — fix: apt-get install crun\n",
		"14 ok, 0 warn, 1 missing — not ready: fix the missing lines, then run sandboxd doctor again\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	if err := rep.Print(&b, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"fix": "apt-get install crun"`) || !strings.Contains(b.String(), `"ok": false`) {
		t.Errorf("JSON: %s", b.String())
	}
}

// TestThisHost runs every check against the machine the test runs on: every requirement is
// present here (as root); as another user the root check must say missing.
func TestThisHost(t *testing.T) {
	agent := filepath.Join(t.TempDir(), "sandbox-agent")
	if dir := os.Getenv("SANDBOXD_BIN"); dir != "" {
		agent = filepath.Join(dir, "sandbox-agent")
	} else if err := os.WriteFile(agent, []byte("stand-in: the agent check only looks for the file"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ParseDoctor([]string{"--data-dir", t.TempDir(), "--agent-bin", agent})
	if err != nil {
		t.Fatal(err)
	}
	rep := Run(context.Background(), System(), cfg)
	var b strings.Builder
	rep.Print(&b, false)
	t.Logf("\n%s", b.String())
	for _, r := range rep.Results {
		switch {
		case r.Name == "root" && os.Geteuid() != 0:
			if r.Status != Missing {
				t.Errorf("root as uid %d: %s", os.Geteuid(), r.Status)
			}
		case os.Geteuid() != 0:
			// The other checks need root: nothing to require of them.
		case r.Status == Missing:
			t.Errorf("%s: missing: %s (fix: %s)", r.Name, r.Detail, r.Fix)
		}
	}
}

func imageOf(dir, mode string) sandbox.Image {
	return sandbox.Image{Name: "img", Mode: mode, RootFS: dir}
}
