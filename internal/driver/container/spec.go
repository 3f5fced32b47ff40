package container

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/moby/profiles/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/driver"
)

// Fixed facts of every sandbox container.
const (
	sandboxUID   = driver.SandboxUser // the unprivileged user every process of a sandbox runs as (in its user namespace)
	sandboxGID   = driver.SandboxUser
	hostname     = "sandbox"
	agentPath    = "/.sandbox/bin/sandbox-agent" // where the agent binary is bound, read-only
	cpuPeriod    = 100000                        // µs
	nofileLimit  = 1024
	devShmSize   = "16m"
	helperTmp    = "64m"   // the /tmp (tmpfs) of the driver's own helper containers (probe, floor)
	ociVersion   = "1.0.2" // the newest spec version both crun 1.8 and runc 1.1 claim
	sandboxesDir = "sandboxes"
	gvisorPids   = 256 // host threads of gVisor's own, beside those it runs the sandbox's on (runsc)
)

// standardEnv is the environment of the agent (and, through it, of the runs).
var standardEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/tmp",
	"LANG=C.UTF-8",
	"TMPDIR=/tmp",
}

// maskedPaths are the runc/Docker defaults under /proc (/sys is an empty tmpfs), plus what tells
// of the host's boot, kernel build, modules, disks and memory layout; readonlyPaths are the
// runc/Docker defaults.
var (
	maskedPaths = []string{
		"/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
		"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
		"/proc/scsi",
		"/proc/cmdline", "/proc/config.gz", "/proc/modules", "/proc/kallsyms", "/proc/partitions",
		"/proc/diskstats", "/proc/swaps", "/proc/vmallocinfo", "/proc/buddyinfo", "/proc/zoneinfo",
		"/proc/pagetypeinfo", "/proc/slabinfo", "/proc/iomem", "/proc/ioports", "/proc/devices",
		"/proc/misc", "/proc/consoles", "/proc/mtrr", "/proc/dma", "/proc/locks", "/proc/fb",
	}
	readonlyPaths = []string{
		"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
	}
)

// blockedTmpfs are the options of the tmpfs that hides a blocked path under runsc where crun and
// runc mask it (maskedPaths): empty, read-only, mode 000 (FINDINGS: EACCES in all three runtimes).
var blockedTmpfs = []string{"ro", "nosuid", "nodev", "noexec", "size=4k", "mode=000"}

// pseudoFS are the standard mounts whose content is not the image's: a blocked path under one of
// them is masked (maskedPaths) instead of mounted over.
var pseudoFS = []string{"/proc", "/sys", "/dev"}

// reserved paths can't be user mounts or blocked.
var reserved = []string{"/.sandbox"}

// within reports whether p is dir or below it (both clean and absolute).
func within(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

func depth(p string) int {
	if p == "/" {
		return 0
	}
	return strings.Count(p, "/")
}

// containerSpec is the input of makeSpec.
type containerSpec struct {
	id     string
	rootfs string   // host path of the container's root (mounted read-only)
	args   []string // process
	cwd    string
	mounts []specs.Mount // after the standard ones, in order
	masked []string      // extra masked paths
	res    driver.Spec   // CPU, MemoryBytes, PidsLimit, TmpDir and HostIDs are used
	netns  string        // network namespace to join ("": a new one, loopback only)
	userns string        // user namespace to join ("": a new one, with res.HostIDs mapped)
	gvisor bool          // for runsc: masked paths become mounts (see makeSpec)
}

// standardMounts are the runc defaults with an empty read-only tmpfs for /sys (in a user
// namespace sysfs can only be mounted for a network namespace of its own, and none of it is
// needed) and without the cgroup mount, plus the sandbox's /tmp: a bind of tmpDir (on its disk),
// or a tmpfs of helperTmp when tmpDir is "".
func standardMounts(tmpDir string) []specs.Mount {
	tmp := specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777", "size=" + helperTmp}}
	if tmpDir != "" {
		tmp = specs.Mount{Destination: "/tmp", Type: "bind", Source: tmpDir, Options: []string{"rbind", "rw", "nosuid", "nodev"}}
	}
	return []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=" + devShmSize}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "noexec", "nodev", "ro", "mode=755", "size=4k"}},
		tmp,
	}
}

// standardMountPoints makes sure root has the mount points of standardMounts and the agent's
// (made in the overlay's upper layer when the image lacks them).
func standardMountPoints(root string) error {
	for _, m := range standardMounts("") {
		if path.Dir(m.Destination) != "/" {
			continue // inside /dev, a tmpfs of the container's
		}
		if err := mkdirAllInRoot(root, m.Destination); err != nil {
			return fmt.Errorf("mount point %s: %w", m.Destination, err)
		}
	}
	if ok, err := regularFileInRoot(root, agentPath); err != nil || !ok {
		return fmt.Errorf("mount point %s: not a file (%v)", agentPath, err)
	}
	return nil
}

// makeSpec builds the config.json of a sandbox container. prof is the seccomp profile (nil: none).
func makeSpec(cs containerSpec, prof *specs.LinuxSeccomp) *specs.Spec {
	res := &specs.LinuxResources{
		Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
	}
	if cs.res.CPU > 0 {
		quota := int64(cs.res.CPU * cpuPeriod)
		if quota < 1000 {
			quota = 1000
		}
		period := uint64(cpuPeriod)
		res.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
	}
	if cs.res.MemoryBytes > 0 {
		limit, swap := cs.res.MemoryBytes, cs.res.MemoryBytes
		res.Memory = &specs.LinuxMemory{Limit: &limit, Swap: &swap}
	}
	rlimits := []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: nofileLimit, Soft: nofileLimit}}
	if cs.res.PidsLimit > 0 {
		pids := cs.res.PidsLimit
		if cs.gvisor {
			// The host's pids cgroup counts gVisor's threads (the Sentry's, the gofer's, the
			// systrap stubs'), not the sandbox's processes: the limit of those is RLIMIT_NPROC,
			// which gVisor enforces per user — every task of the sandbox's user, the agent's
			// threads included, as the pids cgroup counts them under crun. The cgroup keeps a
			// bound with room for gVisor's own threads.
			rlimits = append(rlimits, specs.POSIXRlimit{Type: "RLIMIT_NPROC", Hard: uint64(pids), Soft: uint64(pids)})
			pids += gvisorPids
		}
		res.Pids = &specs.LinuxPids{Limit: &pids}
	}
	mounts := append(standardMounts(cs.res.TmpDir), cs.mounts...)
	masked, readonly := append(append([]string(nil), maskedPaths...), cs.masked...), readonlyPaths
	if cs.gvisor {
		// runsc ignores maskedPaths and readonlyPaths. Its /proc and /sys are gVisor's own, made
		// up by the Sentry: nothing of the host's kernel, boot, disks or memory layout to hide,
		// and nothing in /proc/sys a process without capabilities can write. A blocked path there
		// (cs.masked) is hidden by an explicit mount instead: an empty mode-000 tmpfs.
		masked, readonly = nil, nil
		for _, p := range cs.masked {
			mounts = append(mounts, specs.Mount{Destination: p, Type: "tmpfs", Source: "tmpfs", Options: blockedTmpfs})
		}
		mounts = dropCovered(mounts)
		prof = gvisorSeccomp(prof)
	}
	netNS := specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: cs.netns}
	ids := []specs.LinuxIDMapping{{ContainerID: 0, HostID: cs.res.HostIDs, Size: driver.IDsPerSandbox}}
	return &specs.Spec{
		Version: ociVersion,
		Process: &specs.Process{
			User: specs.User{UID: sandboxUID, GID: sandboxGID},
			Args: cs.args,
			Env:  standardEnv,
			Cwd:  cs.cwd,
			// Present and empty: every set is empty, so the process has no capability at all.
			Capabilities:    &specs.LinuxCapabilities{},
			Rlimits:         rlimits,
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: cs.rootfs, Readonly: true},
		Hostname: hostname,
		Mounts:   mounts,
		Linux: &specs.Linux{
			Resources:   res,
			CgroupsPath: cgroup.Path(cgroupGroup(cs.id)),
			// A user namespace of the sandbox's own host ids (made by the driver: userns.go; its
			// mappings are repeated here, as runc wants them): the network namespace, joined by
			// path, stays the host's.
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.UserNamespace, Path: cs.userns}, {Type: specs.PIDNamespace}, netNS, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.CgroupNamespace},
			},
			UIDMappings:   ids,
			GIDMappings:   ids,
			Seccomp:       prof,
			MaskedPaths:   masked,
			ReadonlyPaths: readonly,
		},
	}
}

// gvisorSeccomp returns prof for runsc. runsc turns every SCMP_ACT_ERRNO rule into EPERM, whatever
// its errnoRet: Docker's profile refuses clone3 with ENOSYS, which makes glibc fall back to clone
// (whose flags the profile can check); with EPERM it does not, and no thread starts. gVisor
// implements clone3 in the Sentry, so under runsc the profile allows it (it is not in Docker's allow
// list: the profile's default action refuses it): the namespaces it
// could ask for are gVisor's, and the process has no capability to make any but a user namespace.
func gvisorSeccomp(prof *specs.LinuxSeccomp) *specs.LinuxSeccomp {
	if prof == nil {
		return nil
	}
	out := *prof
	out.Syscalls = nil
	for _, sc := range prof.Syscalls {
		if sc.Action == specs.ActErrno && slices.Contains(sc.Names, "clone3") {
			sc.Names = slices.DeleteFunc(slices.Clone(sc.Names), func(n string) bool { return n == "clone3" })
			if len(sc.Names) == 0 {
				continue
			}
		}
		out.Syscalls = append(out.Syscalls, sc)
	}
	out.Syscalls = append(out.Syscalls, specs.LinuxSyscall{Names: []string{"clone3"}, Action: specs.ActAllow})
	return &out
}

// dropCovered removes each mount that a later one covers (mounted on it or on a directory above
// it): what it would show is hidden anyway. runsc's gofer resolves every mount's destination
// after it has mounted them all, and one beneath a blocked path (a mode-000 directory) cannot be
// resolved: runsc would fail to start the sandbox.
func dropCovered(ms []specs.Mount) []specs.Mount {
	var out []specs.Mount
	for i, m := range ms {
		if !slices.ContainsFunc(ms[i+1:], func(o specs.Mount) bool { return within(m.Destination, o.Destination) }) {
			out = append(out, m)
		}
	}
	return out
}

// defaultSeccomp returns Docker's default seccomp profile for a process without capabilities.
func defaultSeccomp() (*specs.LinuxSeccomp, error) {
	s := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{}}}
	p, err := seccomp.GetDefaultProfile(s)
	if err != nil {
		return nil, fmt.Errorf("seccomp default profile: %w", err)
	}
	if p == nil {
		return nil, fmt.Errorf("seccomp default profile is empty")
	}
	return p, nil
}

// checkPath validates a sandbox path: absolute, clean, no NUL.
func checkPath(what, p string) error {
	if p == "" || !path.IsAbs(p) || path.Clean(p) != p || strings.ContainsRune(p, 0) {
		return fmt.Errorf("%s path %q is not an absolute clean path", what, p)
	}
	for _, r := range reserved {
		if within(p, r) {
			return fmt.Errorf("%s path %q is reserved for the sandbox runtime", what, p)
		}
	}
	return nil
}

// sortMounts orders user mounts so that a mount comes after every mount containing it.
func sortMounts(ms []driver.Mount) []driver.Mount {
	out := append([]driver.Mount(nil), ms...)
	sort.SliceStable(out, func(i, j int) bool {
		if di, dj := depth(out[i].Path), depth(out[j].Path); di != dj {
			return di < dj
		}
		return out[i].Path < out[j].Path
	})
	return out
}

// pruneBlocked returns the blocked paths sorted by depth with every path inside another blocked
// one dropped (it is already inaccessible, and nothing can be mounted in a mode-000 tmpfs).
func pruneBlocked(bs []string) []string {
	in := append([]string(nil), bs...)
	sort.SliceStable(in, func(i, j int) bool {
		if di, dj := depth(in[i]), depth(in[j]); di != dj {
			return di < dj
		}
		return in[i] < in[j]
	})
	var out []string
next:
	for _, b := range in {
		for _, o := range out {
			if within(b, o) {
				continue next
			}
		}
		out = append(out, b)
	}
	return out
}
