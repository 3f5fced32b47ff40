// Package cgroup is what sandboxd's drivers need of the host's control groups: where the
// hierarchies are mounted (cgroup v1, v2, or the v1 "hybrid" layout with a nearly empty cgroup2
// mount beside the v1 controllers), and, for one group, creating it with CPU, memory and process
// limits, moving a process into it, reading its CPU time and OOM kills, listing its processes, and
// removing it with everything still inside.
//
// A group is named by its path relative to every hierarchy's root, e.g. "/sandboxd/<id>": on v1
// it is a directory of that name in each controller's hierarchy, on v2 one directory in the
// unified hierarchy — below the cgroup delegated to the process when Delegate found one
// (delegate.go: under systemd, the unit's or a transient scope's cgroup). The layout is read from /proc/self/mountinfo, so it reflects the caller's
// mount namespace (sandboxd unmounts the hybrid cgroup2 mount in its own namespace; see package
// container).
//
// Nothing here caches the state of a group: every call reads or writes the cgroup filesystem, so
// groups left by a crashed process are found and removed like any other.
package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sandboxd/sandboxd/internal/pseudofs"
)

// Controllers the package creates groups in. On v1, "cpuacct" may be its own hierarchy or share
// one with "cpu"; on v2 CPU time comes from cpu.stat, which needs no controller.
var controllers = []string{"cpu", "cpuacct", "memory", "pids"}

// Mount is one cgroup hierarchy mounted in the caller's mount namespace.
type Mount struct {
	Dir     string // mount point, e.g. /sys/fs/cgroup/memory
	V2      bool   // the unified (cgroup2) hierarchy
	Options string // super options of a v1 mount, e.g. "rw,memory"
}

// HasController reports whether a v1 mount carries controller c. (For v2 see Layout.)
func (m Mount) HasController(c string) bool {
	for _, o := range strings.Split(m.Options, ",") {
		if o == c {
			return true
		}
	}
	return false
}

// Layout is where the host's cgroup hierarchies are and which one serves each controller.
type Layout struct {
	mounts []Mount          // every cgroup hierarchy (v1 and v2)
	memory Mount            // the hierarchy with the memory controller
	ctrl   map[string]Mount // controller → hierarchy that serves it (see controllers)
	v2ctl  map[string]bool  // controllers the v2 root offers (cgroup.controllers)
	hasV2  bool             // a cgroup2 hierarchy is mounted
	v2     Mount            // it
}

// ReadLayout parses /proc/self/mountinfo for cgroup mounts. It fails when no hierarchy carries
// the memory controller (OOM detection and memory limits depend on it).
func ReadLayout() (Layout, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return Layout{}, err
	}
	defer f.Close()
	return parseLayout(f)
}

// parseLayout reads a mountinfo; on v2 it reads the root's cgroup.controllers.
func parseLayout(r io.Reader) (Layout, error) {
	l := Layout{ctrl: map[string]Mount{}, v2ctl: map[string]bool{}}
	var haveMem bool
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 {
			continue
		}
		m := Mount{Dir: UnescapeMountinfo(pf[4]), Options: qf[2]}
		switch qf[0] {
		case "cgroup2":
			m.V2 = true
			if b := Base(); b != "" {
				m.Dir = filepath.Join(m.Dir, b) // the delegated subtree is this process's root
			}
			l.v2, l.hasV2 = m, true
		case "cgroup":
			if m.HasController("memory") {
				l.memory, haveMem = m, true
			}
			for _, c := range controllers {
				if _, dup := l.ctrl[c]; !dup && m.HasController(c) {
					l.ctrl[c] = m
				}
			}
		default:
			continue
		}
		l.mounts = append(l.mounts, m)
	}
	if err := sc.Err(); err != nil {
		return l, err
	}
	if l.hasV2 {
		if b, err := os.ReadFile(filepath.Join(l.v2.Dir, "cgroup.controllers")); err == nil {
			for _, c := range strings.Fields(string(b)) {
				l.v2ctl[c] = true
			}
		}
		for _, c := range controllers {
			if _, ok := l.ctrl[c]; ok {
				continue
			}
			// CPU time (cpu.stat) needs no controller on v2.
			if l.v2ctl[c] || c == "cpuacct" {
				l.ctrl[c] = l.v2
			}
		}
	}
	if !haveMem && l.hasV2 {
		l.memory, haveMem = l.v2, true
	}
	if !haveMem {
		return l, errors.New("no cgroup hierarchy with the memory controller is mounted")
	}
	return l, nil
}

// UnescapeMountinfo decodes the octal escapes (\040 etc.) of a path in /proc/self/mountinfo.
func UnescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Mounts returns every cgroup hierarchy.
func (l Layout) Mounts() []Mount { return append([]Mount(nil), l.mounts...) }

// MemoryV2 reports whether the memory controller is on the unified hierarchy.
func (l Layout) MemoryV2() bool { return l.memory.V2 }

// Dir is group's directory in hierarchy m.
func Dir(m Mount, group string) string { return filepath.Join(m.Dir, group) }

// MemoryDir is group's directory in the memory hierarchy (also used for its process list).
func (l Layout) MemoryDir(group string) string { return Dir(l.memory, group) }

// OOMKills returns group's OOM-kill counter: v1 memory.oom_control "oom_kill", v2 memory.events
// "oom_kill". (v1 does not propagate the counter to parents: read it from the group itself.)
func (l Layout) OOMKills(group string) (int64, error) {
	name, key := "memory.oom_control", "oom_kill"
	if l.MemoryV2() {
		name = "memory.events"
	}
	b, err := pseudofs.ReadFile(filepath.Join(l.MemoryDir(group), name))
	if err != nil {
		return 0, err
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		k, v, ok := bytes.Cut(line, []byte(" "))
		if ok && string(k) == key {
			return strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s has no %s field (kernel too old?)", name, key)
}

// Procs lists the PIDs (host view) in group's memory cgroup and its descendants.
func (l Layout) Procs(group string) ([]int, error) {
	return procsUnder(l.MemoryDir(group))
}

func procsUnder(dir string) ([]int, error) {
	var pids []int
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		b, err := pseudofs.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids, err
}

// Remove kills whatever is left in group and its children and removes their directories in every
// hierarchy. Missing directories are fine; it is idempotent.
func (l Layout) Remove(group string) error {
	var errs []error
	for _, m := range l.mounts {
		dir := Dir(m, group)
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		if err := removeTree(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeTree removes cgroup dir and its children (deepest first), killing any process still in
// them — at once with cgroup.kill where the kernel has it (cgroup v2, Linux 5.14), else by
// SIGKILLing each listed process, which a fork racing the listing can escape, hence the retries —
// retrying for up to 3 s while the kernel finishes tearing processes down.
func removeTree(dir string) error {
	deadline := time.Now().Add(3 * time.Second)
	_ = writeIfExists(dir, "cgroup.kill", "1")
	for {
		var dirs []string
		_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		if len(dirs) == 0 {
			return nil
		}
		pids, _ := procsUnder(dir)
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		var last error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
				last = err
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Children lists the names of the groups directly below parent in any hierarchy (e.g. the
// sandboxes of a driver: Children("/sandboxd-wasm")).
func (l Layout) Children(parent string) ([]string, error) {
	seen := map[string]bool{}
	var names []string
	for _, m := range l.mounts {
		ents, err := os.ReadDir(Dir(m, parent))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, err
		}
		for _, e := range ents {
			if e.IsDir() && !seen[e.Name()] {
				seen[e.Name()] = true
				names = append(names, e.Name())
			}
		}
	}
	return names, nil
}

// Limits are the resource limits of a group. Zero fields are left as they are (a new group's are
// unlimited).
type Limits struct {
	CPU         float64 // cores: CFS quota = CPU × period
	CPUWeight   int     // relative CPU share, 1–10000 (v2 cpu.weight; default 100); v1 cpu.shares = weight × 1024 / 100
	MemoryBytes int64   // memory limit (swap included: the group may not swap)
	Pids        int64   // tasks (processes and threads)
}

// cpuPeriod is the CFS period, in microseconds, of the CPU quota.
const cpuPeriod = 100000

// hierarchies returns the distinct hierarchies of the controllers the package manages.
func (l Layout) hierarchies() []Mount {
	var ms []Mount
	for _, c := range controllers {
		m, ok := l.ctrl[c]
		if !ok {
			continue
		}
		dup := false
		for _, o := range ms {
			dup = dup || o.Dir == m.Dir
		}
		if !dup {
			ms = append(ms, m)
		}
	}
	return ms
}

// Create makes group (and its missing parents) in the hierarchies of the cpu, cpuacct, memory and
// pids controllers and sets lim (see Set). On v2 it first enables those controllers for the
// children of every ancestor. On error the caller removes the group.
func (l Layout) Create(group string, lim Limits) error {
	for _, m := range l.hierarchies() {
		if m.V2 {
			if err := l.enableV2(group); err != nil {
				return err
			}
		}
		if err := os.MkdirAll(Dir(m, group), 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
	}
	return l.Set(group, lim)
}

// Set writes the non-zero limits of lim to group. It fails when a limit cannot be set: a missing
// controller, or (memory) a limit below what the group already uses that the kernel cannot
// reclaim.
func (l Layout) Set(group string, lim Limits) error {
	if lim.CPU > 0 || lim.CPUWeight > 0 {
		m, ok := l.ctrl["cpu"]
		if !ok {
			return errors.New("cgroup: no hierarchy has the cpu controller")
		}
		dir := Dir(m, group)
		if lim.CPU > 0 {
			quota := int64(lim.CPU * cpuPeriod)
			if quota < 1000 {
				quota = 1000
			}
			if m.V2 {
				if err := write(dir, "cpu.max", fmt.Sprintf("%d %d", quota, cpuPeriod)); err != nil {
					return err
				}
			} else {
				if err := write(dir, "cpu.cfs_period_us", strconv.Itoa(cpuPeriod)); err != nil {
					return err
				}
				if err := write(dir, "cpu.cfs_quota_us", strconv.FormatInt(quota, 10)); err != nil {
					return err
				}
			}
		}
		if w := lim.CPUWeight; w > 0 {
			w = min(max(w, 1), 10000)
			if m.V2 {
				if err := write(dir, "cpu.weight", strconv.Itoa(w)); err != nil {
					return err
				}
			} else if err := write(dir, "cpu.shares", strconv.Itoa(max(w*1024/100, 2))); err != nil {
				return err
			}
		}
	}
	if lim.MemoryBytes > 0 {
		dir, v := l.MemoryDir(group), strconv.FormatInt(lim.MemoryBytes, 10)
		if l.MemoryV2() {
			if err := write(dir, "memory.max", v); err != nil {
				return err
			}
			if err := writeIfExists(dir, "memory.swap.max", "0"); err != nil {
				return err
			}
		} else {
			// memsw (memory+swap) exists only with swap accounting and must never be below the
			// memory limit: raise memsw first when the limit grows, lower it last when it shrinks.
			if err := writeIfExists(dir, "memory.memsw.limit_in_bytes", v); err != nil {
				if err := write(dir, "memory.limit_in_bytes", v); err != nil {
					return err
				}
				return writeIfExists(dir, "memory.memsw.limit_in_bytes", v)
			}
			if err := write(dir, "memory.limit_in_bytes", v); err != nil {
				return err
			}
		}
	}
	if lim.Pids > 0 {
		m, ok := l.ctrl["pids"]
		if !ok {
			return errors.New("cgroup: no hierarchy has the pids controller")
		}
		if err := write(Dir(m, group), "pids.max", strconv.FormatInt(lim.Pids, 10)); err != nil {
			return err
		}
	}
	return nil
}

// enableV2 enables the managed controllers the v2 root offers in cgroup.subtree_control of every
// ancestor of group (root included), so that group gets their interface files.
func (l Layout) enableV2(group string) error {
	var want []string
	for _, c := range []string{"cpu", "memory", "pids"} {
		if m, ok := l.ctrl[c]; ok && m.V2 {
			want = append(want, "+"+c)
		}
	}
	if len(want) == 0 {
		return nil
	}
	parts := strings.Split(strings.Trim(filepath.Clean(group), "/"), "/")
	dir := l.v2.Dir
	for i := 0; i < len(parts); i++ {
		if i > 0 {
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("create cgroup: %w", err)
			}
		}
		cur, _ := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
		var missing []string
		for _, w := range want {
			if !strings.Contains(" "+strings.TrimSpace(string(cur))+" ", " "+w[1:]+" ") {
				missing = append(missing, w)
			}
		}
		if len(missing) > 0 {
			if err := write(dir, "cgroup.subtree_control", strings.Join(missing, " ")); err != nil {
				return err
			}
		}
		dir = filepath.Join(dir, parts[i])
	}
	return nil
}

// AddProc moves process pid (all its threads) into group in every hierarchy Create made it in.
func (l Layout) AddProc(group string, pid int) error {
	for _, m := range l.hierarchies() {
		if err := write(Dir(m, group), "cgroup.procs", strconv.Itoa(pid)); err != nil {
			return err
		}
	}
	return nil
}

// CPUUsage returns the CPU time (user+system) consumed so far by every task that was ever in
// group, dead ones included: v1 cpuacct.usage, v2 cpu.stat usage_usec.
func (l Layout) CPUUsage(group string) (time.Duration, error) {
	m, ok := l.ctrl["cpuacct"]
	if !ok {
		return 0, errors.New("cgroup: no hierarchy accounts CPU time")
	}
	if !m.V2 {
		b, err := pseudofs.ReadFile(filepath.Join(Dir(m, group), "cpuacct.usage"))
		if err != nil {
			return 0, err
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		return time.Duration(ns), err
	}
	b, err := pseudofs.ReadFile(filepath.Join(Dir(m, group), "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return time.Duration(us) * time.Microsecond, err
		}
	}
	return 0, errors.New("cgroup: cpu.stat has no usage_usec")
}

func write(dir, name, value string) error {
	if err := os.WriteFile(filepath.Join(dir, name), []byte(value), 0); err != nil {
		return fmt.Errorf("cgroup: %w", err) // the error names the file
	}
	return nil
}

func writeIfExists(dir, name, value string) error {
	if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
		return nil
	}
	return write(dir, name, value)
}
