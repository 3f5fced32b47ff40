package doctor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/sandboxd/sandboxd/internal/cgroup"
)

// cgroups is the host's cgroup layout as the checks need it, read from /proc/self/mountinfo.
type cgroups struct {
	v1   map[string]string // v1 controller → its hierarchy's directory
	v2   string            // the unified (cgroup2) hierarchy's directory, "" if none is mounted
	v2At string            // where the host mounts it (v2 is beneath Host.Sys in tests)
	err  error             // mountinfo could not be read
}

// mode names the layout: "v2", "v1", "v1 hybrid" (v1 controllers and a cgroup2 mount), or "".
func (c *cgroups) mode() string {
	switch {
	case len(c.v1) > 0 && c.v2 != "":
		return "v1 hybrid"
	case len(c.v1) > 0:
		return "v1"
	case c.v2 != "":
		return "v2"
	}
	return ""
}

// hostPath maps a mount point of the host's /proc/self/mountinfo to the Host's trees: what is
// under /sys is read beneath h.Sys.
func (h *Host) hostPath(mountPoint string) string {
	if rest, ok := strings.CutPrefix(mountPoint, "/sys/"); ok {
		return filepath.Join(h.Sys, rest)
	}
	return mountPoint
}

// readCgroups parses mountinfo once per run.
func (d *doctor) readCgroups() *cgroups {
	if d.cg != nil {
		return d.cg
	}
	d.cg = &cgroups{v1: map[string]string{}}
	f, err := os.Open(filepath.Join(d.h.Proc, "self/mountinfo"))
	if err != nil {
		d.cg.err = err
		return d.cg
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if !ok || len(pf) < 5 || len(qf) < 3 {
			continue
		}
		dir := d.h.hostPath(cgroup.UnescapeMountinfo(pf[4]))
		switch qf[0] {
		case "cgroup2":
			d.cg.v2, d.cg.v2At = dir, cgroup.UnescapeMountinfo(pf[4])
		case "cgroup":
			for _, o := range strings.Split(qf[2], ",") {
				if _, dup := d.cg.v1[o]; !dup && slices.Contains(cgroupControllers, o) {
					d.cg.v1[o] = dir
				}
			}
		}
	}
	d.cg.err = sc.Err()
	return d.cg
}

// cgroupControllers are the controllers sandboxd limits and accounts with (package cgroup): on
// v2, CPU time comes from cpu.stat, which needs no cpuacct controller.
var cgroupControllers = []string{"cpu", "cpuacct", "memory", "pids"}

// ourCgroup is the cgroup v2 group sandboxd makes its sandboxes' groups under, relative to the
// unified hierarchy's root: the root ("/") when this process is in the root cgroup (the container
// driver's cgroupsPath /sandboxd/<id> today), else this process's own cgroup — what a systemd
// unit with Delegate=yes hands over (package cgroup, Delegate, decides the same way at serve's
// start; this reads the fake roots the tests give).
func (d *doctor) ourCgroup() (string, error) {
	s, err := readFile(d.h.Proc, "self/cgroup")
	if err != nil {
		return "", fmt.Errorf("own cgroup: %w", err)
	}
	for _, line := range strings.Split(s, "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return rest, nil
		}
	}
	return "", errors.New("own cgroup: /proc/self/cgroup has no cgroup v2 line (0::)")
}

// cgroups checks that every controller sandboxd needs is there for its groups: on v1 (and the v1
// side of a hybrid host) a mounted hierarchy each for cpu, cpuacct, memory and pids; on v2 cpu,
// memory and pids in cgroup.controllers of the group ourCgroup names, and under systemd that group
// delegated to sandboxd.
func (d *doctor) cgroups() Result {
	cg := d.readCgroups()
	name := "cgroup " + cg.mode()
	if cg.err != nil {
		return missing("cgroups", fmt.Sprintf("cannot read mountinfo: %v", cg.err), "mount procfs at /proc")
	}
	if cg.mode() == "" {
		return missing("cgroups", "no cgroup hierarchy is mounted", "mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd)")
	}
	var onV2 []string // not on a v1 hierarchy: they must come from cgroup2
	for _, c := range cgroupControllers {
		if _, ok := cg.v1[c]; !ok && (c != "cpuacct" || cg.v2 == "") {
			onV2 = append(onV2, c)
		}
	}
	if len(onV2) == 0 {
		detail := "controllers cpu cpuacct memory pids on v1"
		if cg.v2 != "" {
			detail += ", cgroup2 at " + cg.v2At + " (see OCI runtime)"
		}
		return ok(name, detail)
	}
	if cg.v2 == "" {
		return d.missingControllers(name, onV2, "")
	}
	ours, err := d.ourCgroup()
	if err != nil {
		return missing(name, err.Error(), "mount procfs at /proc")
	}
	// Under systemd, a cgroup not delegated to us is left: serve re-executes itself in a transient
	// scope with Delegate=yes below system.slice (package cgroup, EnterScope), whose controllers
	// are system.slice's.
	var scoped string
	if ours != "/" && d.systemd() {
		if del, how := d.delegated(filepath.Join(cg.v2, ours), ours); !del {
			if _, err := d.h.LookPath("systemd-run"); err != nil {
				return missing(name, fmt.Sprintf("%s is not delegated to sandboxd (%s), and systemd-run is missing", ours, how), delegateFix)
			}
			scoped = fmt.Sprintf(" in a transient scope below /system.slice: %s is not delegated (%s), so serve re-executes itself with systemd-run --scope -p Delegate=yes", ours, how)
			ours = "/system.slice"
		}
	}
	dir := filepath.Join(cg.v2, ours)
	have := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers")); err == nil {
		for _, c := range strings.Fields(string(b)) {
			have[c] = true
		}
	} else {
		return missing(name, fmt.Sprintf("cannot read the controllers of %s: %v", ours, err), "mount cgroup2 at /sys/fs/cgroup")
	}
	var lack []string
	for _, c := range onV2 {
		if !have[c] {
			lack = append(lack, c)
		}
	}
	detail := "controllers " + strings.Join(onV2, " ")
	if len(cg.v1) > 0 {
		detail += " on cgroup2, the rest on v1"
	}
	if len(lack) > 0 {
		return d.missingControllers(name, lack, ours)
	}
	switch {
	case ours == "/":
		return ok(name, detail+" at the root")
	case scoped != "":
		return ok(name, detail+scoped)
	}
	return ok(name, detail+" delegated at "+ours)
}

// delegateFix is what hands sandboxd a cgroup of its own under systemd.
const delegateFix = "run it in a unit with Delegate=yes (deploy/sandboxd.service carries it), or let serve start itself in a delegated scope: it needs systemd-run (Debian: apt-get install systemd)"

// systemd reports whether systemd manages the host (as sd_booted does).
func (d *doctor) systemd() bool {
	_, err := os.Stat(filepath.Join(d.h.Run, "systemd/system"))
	return err == nil
}

// delegated reports whether systemd delegated cgroup dir (ours, relative to the root) to this
// process: the delegate xattr systemd 251+ sets, else the Delegate property of the unit the
// group is named after (systemctl show). how says what answered.
func (d *doctor) delegated(dir, ours string) (bool, string) {
	if yes, err := d.h.Delegate(dir); err == nil && yes {
		return true, "delegate xattr"
	}
	unit := filepath.Base(ours)
	if !strings.HasSuffix(unit, ".service") && !strings.HasSuffix(unit, ".scope") {
		return false, "no delegate xattr, and " + unit + " is not a systemd unit"
	}
	sc, err := d.h.LookPath("systemctl")
	if err != nil {
		return false, "no delegate xattr, and no systemctl to ask"
	}
	ctx, cancel := context.WithTimeout(d.ctx, probeTimeout)
	defer cancel()
	out, err := d.h.Exec(command(ctx, sc, "show", "--property=Delegate", "--value", unit))
	if err != nil {
		return false, fmt.Sprintf("systemctl show %s: %v", unit, err)
	}
	if strings.TrimSpace(string(out)) == "yes" {
		return true, unit + " has Delegate=yes"
	}
	return false, unit + " has Delegate=" + strings.TrimSpace(string(out))
}

// missingControllers is the result for controllers the host does not give sandboxd, with each
// one's fix: a kernel parameter when the kernel has it disabled, a mount on v1, the parent's
// subtree_control (or systemd's Delegate=yes) when a v2 group below the root lacks it.
func (d *doctor) missingControllers(name string, lack []string, ours string) Result {
	enabled := d.kernelControllers()
	cmdline, _ := readFile(d.h.Proc, "cmdline")
	var fixes []string
	for _, c := range lack {
		on, known := enabled[c]
		switch {
		case !known:
			fixes = append(fixes, fmt.Sprintf("%s: a kernel built with the %s controller (the distribution's kernel has it)", c, c))
		case !on && strings.Contains(" "+cmdline+" ", " cgroup_disable="+c):
			fixes = append(fixes, fmt.Sprintf("%s: remove cgroup_disable=%s from the kernel command line", c, c))
		case !on && c == "memory":
			fixes = append(fixes, "memory: add the kernel parameter cgroup_enable=memory (Raspberry Pi OS: cgroup_enable=memory cgroup_memory=1) and reboot")
		case !on:
			fixes = append(fixes, fmt.Sprintf("%s: add the kernel parameter cgroup_enable=%s and reboot", c, c))
		case ours == "":
			fixes = append(fixes, fmt.Sprintf("%s: mount -t cgroup -o %s cgroup /sys/fs/cgroup/%s", c, c, c))
		case ours != "/" && d.systemd():
			fixes = append(fixes, c+": "+delegateFix)
		case ours != "/":
			fixes = append(fixes, fmt.Sprintf("%s: echo +%s > %s", c, c, filepath.Join(d.readCgroups().v2At, filepath.Dir(ours), "cgroup.subtree_control")))
		default:
			fixes = append(fixes, fmt.Sprintf("%s: it is bound to a cgroup v1 hierarchy: unmount it, or boot with cgroup_no_v1=%s", c, c))
		}
	}
	where := "mounted"
	if ours != "" {
		where = "in cgroup.controllers of " + ours
	}
	return missing(name, fmt.Sprintf("controller %s not %s", strings.Join(lack, ", "), where), strings.Join(fixes, "; "))
}

// kernelControllers reads /proc/cgroups: controller → enabled.
func (d *doctor) kernelControllers() map[string]bool {
	s, _ := readFile(d.h.Proc, "cgroups")
	m := map[string]bool{}
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) == 4 && !strings.HasPrefix(f[0], "#") {
			m[f[0]] = f[3] == "1"
		}
	}
	return m
}
