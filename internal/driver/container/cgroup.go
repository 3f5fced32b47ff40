package container

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupParent is the cgroup (relative to every hierarchy's root) under which sandboxes live:
// cgroupsPath in config.json is cgroupParent/<id>, with the cgroupfs driver.
const cgroupParent = "/sandboxd"

// cgroupMount is one cgroup hierarchy mounted in our mount namespace.
type cgroupMount struct {
	dir     string // mount point
	v2      bool
	options string // super options of a v1 mount, e.g. "rw,memory"
}

// hasController reports whether a v1 mount carries controller c.
func (m cgroupMount) hasController(c string) bool {
	for _, o := range strings.Split(m.options, ",") {
		if o == c {
			return true
		}
	}
	return false
}

// cgroupLayout is what the driver needs to know of the host's cgroups.
type cgroupLayout struct {
	mounts []cgroupMount // every cgroup hierarchy (v1 and v2)
	memory cgroupMount   // the hierarchy with the memory controller
}

func (l cgroupLayout) memoryV2() bool { return l.memory.v2 }

// sandboxDir is the sandbox's cgroup directory in hierarchy m.
func sandboxDir(m cgroupMount, id string) string {
	return filepath.Join(m.dir, cgroupParent, id)
}

// memoryDir is the sandbox's memory cgroup directory (also used for its process list).
func (l cgroupLayout) memoryDir(id string) string { return sandboxDir(l.memory, id) }

// readCgroupLayout parses /proc/self/mountinfo for cgroup mounts.
func readCgroupLayout() (cgroupLayout, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return cgroupLayout{}, err
	}
	defer f.Close()
	var l cgroupLayout
	var haveMem, haveV2 bool
	var v2 cgroupMount
	sc := bufio.NewScanner(f)
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
		m := cgroupMount{dir: unescapeMountinfo(pf[4]), options: qf[2]}
		switch qf[0] {
		case "cgroup2":
			m.v2 = true
			v2, haveV2 = m, true
		case "cgroup":
			if m.hasController("memory") {
				l.memory, haveMem = m, true
			}
		default:
			continue
		}
		l.mounts = append(l.mounts, m)
	}
	if err := sc.Err(); err != nil {
		return l, err
	}
	if !haveMem && haveV2 {
		l.memory, haveMem = v2, true
	}
	if !haveMem {
		return l, errors.New("no cgroup hierarchy with the memory controller is mounted")
	}
	return l, nil
}

// unescapeMountinfo decodes the octal escapes (\040 etc.) of a mountinfo path.
func unescapeMountinfo(s string) string {
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

// oomKills returns the sandbox's OOM-kill counter: v1 memory.oom_control "oom_kill", v2
// memory.events "oom_kill".
func (l cgroupLayout) oomKills(id string) (int64, error) {
	name, key := "memory.oom_control", "oom_kill"
	if l.memoryV2() {
		name = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(l.memoryDir(id), name))
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

// procs lists the PIDs (host view) in the sandbox's memory cgroup and its descendants.
func (l cgroupLayout) procs(id string) ([]int, error) {
	return procsUnder(l.memoryDir(id))
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
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
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

// removeCgroups kills whatever is left in the sandbox's cgroups and removes its directories in
// every hierarchy. Missing directories are fine.
func (l cgroupLayout) removeCgroups(id string) error {
	var errs []error
	for _, m := range l.mounts {
		dir := sandboxDir(m, id)
		if _, err := os.Stat(dir); err != nil {
			continue
		}
		if err := removeCgroupTree(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeCgroupTree removes cgroup dir and its children (deepest first), killing any process still
// in them, retrying for up to 3 s while the kernel finishes tearing processes down.
func removeCgroupTree(dir string) error {
	deadline := time.Now().Add(3 * time.Second)
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
