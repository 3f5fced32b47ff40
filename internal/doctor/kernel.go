package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// statusField returns a field of /proc/self/status ("" when absent).
func (d *doctor) statusField(key string) string {
	s, _ := readFile(d.h.Proc, "self/status")
	for _, line := range strings.Split(s, "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// euid is the effective uid in /proc/self/status ("" when unreadable).
func (d *doctor) euid() string {
	if f := strings.Fields(d.statusField("Uid")); len(f) > 1 {
		return f[1]
	}
	return ""
}

// rootCaps are the capabilities of root that sandboxd uses most visibly: mounts and namespaces,
// and the network (veth pairs, nftables).
var rootCaps = []struct {
	bit  uint
	name string
}{{unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}, {unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}}

// root checks that sandboxd runs as root (effective uid 0) with CAP_SYS_ADMIN and CAP_NET_ADMIN:
// it creates containers, mounts and network namespaces.
func (d *doctor) root() Result {
	const name = "root"
	uid := d.euid()
	if uid == "" {
		return missing(name, "cannot read the effective uid from /proc/self/status", "mount procfs at /proc")
	}
	if uid != "0" {
		return missing(name, "running as uid "+uid+": sandboxd needs root", "run it as root: sudo make run (or sudo bin/sandboxd …)")
	}
	eff, err := strconv.ParseUint(d.statusField("CapEff"), 16, 64)
	if err != nil {
		return missing(name, "cannot read CapEff from /proc/self/status", "mount procfs at /proc")
	}
	var lack []string
	for _, c := range rootCaps {
		if eff&(1<<c.bit) == 0 {
			lack = append(lack, c.name)
		}
	}
	if len(lack) > 0 {
		return missing(name, "uid 0 without "+strings.Join(lack, ", "), "give it those capabilities (in a container: run it privileged)")
	}
	return ok(name, "uid 0 with CAP_SYS_ADMIN and CAP_NET_ADMIN")
}

// kernelNeeds are the newest kernel features sandboxd's code uses, newest first: the minimum
// kernel is the first one's. (It uses neither pidfds, NS_GET_OWNER_UID nor cgroup.kill.)
var kernelNeeds = []struct {
	major, minor int
	what         string
}{
	{5, 8, "LOOP_CONFIGURE, for each sandbox's disk"},
	{5, 6, "openat2 RESOLVE_BENEATH, for host paths beneath a sandbox's directories"},
	{5, 2, "NAT chains in nftables' inet family, for egress"},
}

// kernel checks the running kernel's version against kernelNeeds.
func (d *doctor) kernel() Result {
	const name = "kernel"
	rel, err := readFile(d.h.Proc, "sys/kernel/osrelease")
	if err != nil {
		return missing(name, fmt.Sprintf("cannot read the kernel's release: %v", err), "mount procfs at /proc")
	}
	rel = strings.TrimSpace(rel)
	major, minor, ok1 := parseRelease(rel)
	if !ok1 {
		return missing(name, fmt.Sprintf("cannot parse the kernel release %q", rel), "")
	}
	need := kernelNeeds[0]
	for _, n := range kernelNeeds {
		if major < n.major || major == n.major && minor < n.minor {
			return missing(name, fmt.Sprintf("%s is older than %d.%d, which %s needs", rel, n.major, n.minor, n.what),
				fmt.Sprintf("boot a kernel ≥ %d.%d (Debian 12 ships 6.1, Ubuntu 22.04 5.15, RHEL 9 5.14)", need.major, need.minor))
		}
	}
	return ok(name, fmt.Sprintf("%s, at least %d.%d: %s", rel, need.major, need.minor, need.what))
}

// parseRelease reads "6.18.44-fc-v1272" as 6, 18.
func parseRelease(rel string) (major, minor int, ok bool) {
	f := strings.FieldsFunc(rel, func(r rune) bool { return r < '0' || r > '9' })
	if len(f) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(f[0])
	minor, err2 := strconv.Atoi(f[1])
	return major, minor, err1 == nil && err2 == nil
}

// userNamespaces checks that a user namespace can be made the way the container driver makes
// each sandbox's: user.max_user_namespaces above 0, and util-linux `unshare --user` really
// making one, run (when root) as the sandboxes' first host id keeping CAP_SYS_ADMIN.
func (d *doctor) userNamespaces() Result {
	const name = "user namespaces"
	s, err := readFile(d.h.Proc, "sys/user/max_user_namespaces")
	if err != nil {
		return missing(name, "the kernel has no user namespaces (no /proc/sys/user/max_user_namespaces)", "boot a kernel built with CONFIG_USER_NS=y (every distribution's is)")
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(s)); n <= 0 {
		return missing(name, "user.max_user_namespaces is "+strings.TrimSpace(s),
			"sysctl -w user.max_user_namespaces=15000, and keep it in /etc/sysctl.d/90-sandboxd.conf")
	}
	unshare, err := d.h.LookPath("unshare")
	if err != nil {
		return missing(name, "cannot try: util-linux's unshare is not on PATH", install("util-linux", ""))
	}
	probe, err := d.probeBinary()
	if err != nil {
		return missing(name, "cannot try: "+err.Error(), install("coreutils", ""))
	}
	ctx, cancel := context.WithTimeout(d.ctx, probeTimeout)
	defer cancel()
	cmd := command(ctx, unshare, "--user", "--", probe)
	as := "this process"
	if d.euid() == "0" {
		first := d.cfg.IDs.First
		if first == 0 {
			first = sandbox.DefaultIDRange().First
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: first, Gid: first},
			AmbientCaps: []uintptr{unix.CAP_SYS_ADMIN},
		}
		as = fmt.Sprintf("uid %d keeping CAP_SYS_ADMIN, as each sandbox's holder", first)
	}
	if out, err := d.h.Exec(cmd); err != nil {
		return missing(name, fmt.Sprintf("unshare --user failed as %s: %v: %s", as, err, strings.TrimSpace(string(out))), d.usernsFix())
	}
	return ok(name, "unshare --user works as "+as)
}

// usernsFix names the sysctl that forbids user namespaces on this host, if one does.
func (d *doctor) usernsFix() string {
	if s, err := readFile(d.h.Proc, "sys/kernel/unprivileged_userns_clone"); err == nil && strings.TrimSpace(s) == "0" {
		return "sysctl -w kernel.unprivileged_userns_clone=1"
	}
	if s, err := readFile(d.h.Proc, "sys/kernel/apparmor_restrict_unprivileged_userns"); err == nil && strings.TrimSpace(s) == "1" {
		return "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
	}
	return "a seccomp or LSM policy forbids unshare(CLONE_NEWUSER): in a container, run it privileged"
}

// probeBinary is the program the namespace probes run in their child: cat (its stdin is empty,
// so it exits at once), else true.
func (d *doctor) probeBinary() (string, error) {
	if p, err := d.h.LookPath("cat"); err == nil {
		return p, nil
	}
	if p, err := d.h.LookPath("true"); err == nil {
		return p, nil
	}
	return "", errors.New("neither cat nor true is on PATH")
}

// mountNamespace checks what mountns.Enter does at every start: re-executing a program with
// CLONE_NEWNS unshared (Go makes "/" private in the child first) and, on a cgroup v1 hybrid host,
// unmounting the cgroup2 mount there (for crun).
func (d *doctor) mountNamespace() Result {
	const name = "mount namespace"
	probe, err := d.probeBinary()
	if err != nil {
		return missing(name, "cannot try: "+err.Error(), install("coreutils", ""))
	}
	ctx, cancel := context.WithTimeout(d.ctx, probeTimeout)
	defer cancel()
	cmd, detail := command(ctx, probe), "a child re-executed with CLONE_NEWNS (sandboxd's private mount namespace)"
	if cg := d.readCgroups(); cg.mode() == "v1 hybrid" {
		if umount, err := d.h.LookPath("umount"); err == nil {
			cmd = command(ctx, umount, cg.v2At)
			detail = "a child with CLONE_NEWNS (sandboxd's private mount namespace) unmounted " + cg.v2At + " there, as sandboxd does on this hybrid host"
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if out, err := d.h.Exec(cmd); err != nil {
		return missing(name, strings.TrimSpace(fmt.Sprintf("%s with CLONE_NEWNS failed: %v %s", strings.Join(cmd.Args, " "), err, out)),
			"needs root with CAP_SYS_ADMIN (in a container: run it privileged)")
	}
	return ok(name, detail)
}

// seccomp checks that the kernel has seccomp (Seccomp: in /proc/self/status) and its filter mode,
// which every sandbox's allow-list needs.
func (d *doctor) seccomp() Result {
	const name = "seccomp"
	const fix = "boot a kernel built with CONFIG_SECCOMP_FILTER=y (every distribution's is)"
	mode := d.statusField("Seccomp")
	if mode == "" {
		return missing(name, "the kernel has no seccomp (no Seccomp: in /proc/self/status)", fix)
	}
	if err := d.h.Seccomp(); err != nil {
		return missing(name, err.Error(), fix)
	}
	return ok(name, "filters supported (this process: mode "+mode+")")
}

// seccompFilters asks the kernel: PR_GET_SECCOMP answers when it has seccomp, and installing a
// filter from a NULL program fails with EFAULT (not EINVAL) when it has filters.
func seccompFilters() error {
	if _, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_GET_SECCOMP): %w", err)
	}
	err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, 0, 0, 0)
	if errors.Is(err, unix.EFAULT) {
		return nil
	}
	return fmt.Errorf("prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL) = %v, not EFAULT: no seccomp filters", err)
}

// overlay checks overlayfs, every container sandbox's root.
func (d *doctor) overlay() Result {
	const name = "overlayfs"
	how := d.filesystem("overlay", "overlay")
	if how == "" {
		return missing(name, "not in /proc/filesystems, and no overlay module", "modprobe overlay (a kernel built with CONFIG_OVERLAY_FS, as every distribution's)")
	}
	return ok(name, how)
}

// filesystem says how the kernel offers file system fstype (module: its module's name): "" when it
// does not.
func (d *doctor) filesystem(fstype, module string) string {
	s, _ := readFile(d.h.Proc, "filesystems")
	for _, line := range strings.Split(s, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[len(f)-1] == fstype {
			return fstype + " in /proc/filesystems"
		}
	}
	rel, _ := readFile(d.h.Proc, "sys/kernel/osrelease")
	dir := filepath.Join(d.h.Modules, strings.TrimSpace(rel))
	for _, f := range []struct{ file, how string }{
		{"modules.builtin", " built in"},
		{"modules.dep", " module, loaded at the first mount"},
		{"modules.order", " module, loaded at the first mount"}, // before depmod has run
	} {
		b, _ := os.ReadFile(filepath.Join(dir, f.file))
		for _, line := range strings.Split(string(b), "\n") {
			path, _, _ := strings.Cut(line, ":")
			if base := filepath.Base(path); base == module+".ko" || strings.HasPrefix(base, module+".ko.") {
				return fstype + f.how
			}
		}
	}
	return ""
}

// nftables checks that nftables answers over netlink (listing the tables), as egress needs.
func (d *doctor) nftables() Result {
	const name = "nftables"
	n, err := d.h.Nft()
	if err != nil {
		return missing(name, fmt.Sprintf("netlink: %v", err), rootOr(err, "modprobe nf_tables (a kernel built with CONFIG_NF_TABLES, as every distribution's)"))
	}
	return ok(name, fmt.Sprintf("netlink answers (%d tables)", n))
}

// listNftables lists the host's nftables tables.
func listNftables() (int, error) {
	c, err := nftables.New()
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	ts, err := c.ListTables()
	if err != nil {
		return 0, fmt.Errorf("list tables: %w", err)
	}
	return len(ts), nil
}

// disks checks what package disk needs for each sandbox's disk: ext4, mkfs.ext4 (on PATH or in
// /sbin) and a free loop device from /dev/loop-control.
func (d *doctor) disks() Result {
	const name = "sandbox disks"
	var got, lack, fixes []string
	if how := d.filesystem("ext4", "ext4"); how != "" {
		got = append(got, how)
	} else {
		lack, fixes = append(lack, "ext4 is not in /proc/filesystems, and no ext4 module"), append(fixes, "modprobe ext4")
	}
	if mkfs, err := d.mkfs(); err == nil {
		got = append(got, mkfs)
	} else {
		lack, fixes = append(lack, "no mkfs.ext4"), append(fixes, install("e2fsprogs", ""))
	}
	if dev, err := d.h.Loop(d.h.Dev); err == nil {
		got = append(got, "free loop device "+dev)
	} else {
		lack, fixes = append(lack, "no loop device: "+err.Error()), append(fixes, rootOr(err, "modprobe loop (in a container: give it /dev/loop-control and /dev/loop*)"))
	}
	if len(lack) > 0 {
		return missing(name, strings.Join(lack, "; "), strings.Join(fixes, "; "))
	}
	return ok(name, strings.Join(got, ", "))
}

// mkfs finds mkfs.ext4 as package disk does: on PATH, else in /sbin.
func (d *doctor) mkfs() (string, error) {
	p, err := d.h.LookPath("mkfs.ext4")
	if err == nil {
		return p, nil
	}
	if _, serr := os.Stat(filepath.Join(d.h.Sbin, "mkfs.ext4")); serr == nil {
		return filepath.Join(d.h.Sbin, "mkfs.ext4"), nil
	}
	return "", err
}

// rootOr is the fix for err: running as root when it is a permission error, else fix.
func rootOr(err error, fix string) string {
	if errors.Is(err, fs.ErrPermission) {
		return "run it as root"
	}
	return fix
}

// freeLoop asks dev/loop-control for a free loop device (the kernel creates it if need be).
func freeLoop(dev string) (string, error) {
	ctl, err := os.OpenFile(filepath.Join(dev, "loop-control"), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer ctl.Close()
	n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return "", fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
	}
	p := filepath.Join(dev, "loop"+strconv.Itoa(n))
	if _, err := os.Stat(p); err != nil {
		return "", err
	}
	return p, nil
}
