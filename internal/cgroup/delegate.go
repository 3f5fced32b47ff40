package cgroup

// Delegation: where, on a cgroup v2 host, sandboxd's groups live.
//
// On cgroup v1 (and the v1 "hybrid" layout) groups are made at the root of each hierarchy, as
// before. On a cgroup v2 host whose process is in the root cgroup (no systemd, or a cgroup
// namespace), the same. Otherwise the process's own cgroup is taken as a delegated subtree, as
// systemd's cgroup delegation rules ask (systemd.io/CGROUP_DELEGATION):
//
//   - EnterScope, called first thing (before the mount namespace re-exec), makes sure that cgroup is
//     delegated: under systemd, if it is not (a unit without Delegate=yes, a login session), it
//     re-executes the program through `systemd-run --scope -p Delegate=yes` in a transient scope
//     named after the data directory, so a restart finds the groups a crashed predecessor left in
//     the same place.
//   - Delegate, called once the process is where it will stay, moves every process of its cgroup
//     (sandboxd, its mount-namespace parent) into a leaf "supervisor" — the "no internal processes"
//     rule: only a cgroup without processes may enable controllers for its children — enables cpu,
//     memory and pids in the cgroup's subtree_control, and makes it the base of every group name:
//     ReadLayout's v2 hierarchy is then rooted there, and Path gives the OCI runtime's cgroupsPath.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	// root is where the unified hierarchy is mounted on a cgroup v2 host.
	root = "/sys/fs/cgroup"
	// supervisorLeaf is the child of the delegated cgroup that holds sandboxd's own processes.
	supervisorLeaf = "supervisor"
	// scopeEnv marks a process EnterScope re-executed; its value is the scope's unit name.
	scopeEnv = "SANDBOXD_CGROUP_SCOPE"
)

var (
	baseMu sync.Mutex
	base   string // the delegated cgroup (relative to the v2 root), "" for the root
)

// Path is group's path relative to the root of the unified hierarchy: the delegated base (see
// Delegate) followed by group. On cgroup v1 (no base) it is group. The OCI runtime's cgroupsPath.
func Path(group string) string {
	baseMu.Lock()
	defer baseMu.Unlock()
	return base + group
}

// Base is the delegated cgroup Delegate chose ("" when groups live at the root).
func Base() string {
	baseMu.Lock()
	defer baseMu.Unlock()
	return base
}

// UnifiedOnly reports whether the host mounts the unified hierarchy only (cgroup v2) at
// /sys/fs/cgroup, as seen in the current mount namespace.
func UnifiedOnly() bool {
	var st unix.Statfs_t
	return unix.Statfs(root, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// Own is the process's cgroup in the unified hierarchy ("0::<path>" in /proc/self/cgroup).
func Own() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	return parseOwn(string(b))
}

func parseOwn(s string) (string, error) {
	for _, line := range strings.Split(s, "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return strings.TrimSuffix(p, " (deleted)"), nil
		}
	}
	return "", errors.New("cgroup: /proc/self/cgroup has no cgroup v2 line")
}

// systemdPID1 reports whether systemd manages the host (its runtime directory exists).
func systemdPID1() bool {
	_, err := os.Stat("/run/systemd/system")
	return err == nil
}

// Delegated reports whether cgroup own (relative to the v2 root) is delegated to this process:
// systemd (≥ 251) marks the cgroups of Delegate=yes units with the trusted.delegate (system
// manager) or user.delegate (user manager) attribute; for older systemd, a unit's Delegate
// property is asked of systemctl. Without systemd, a non-root cgroup is whoever started us giving
// it to us.
func Delegated(own string) bool {
	if own == "/" {
		return false
	}
	if os.Getenv(scopeEnv) != "" && strings.HasSuffix(own, "/"+os.Getenv(scopeEnv)) {
		return true
	}
	if yes, _ := DelegateXattr(filepath.Join(root, own)); yes {
		return true
	}
	if !systemdPID1() {
		return true
	}
	unit := filepath.Base(own)
	if !strings.HasSuffix(unit, ".service") && !strings.HasSuffix(unit, ".scope") {
		return false
	}
	out, err := exec.Command("systemctl", "show", "--property=Delegate", "--value", unit).Output()
	return err == nil && strings.TrimSpace(string(out)) == "yes"
}

// DelegateXattr reads the attribute systemd puts on the cgroup directory dir of a delegated unit:
// trusted.delegate (system manager, systemd 251+) or user.delegate (user manager, 253+).
func DelegateXattr(dir string) (bool, error) {
	var lastErr error
	for _, name := range []string{"trusted.delegate", "user.delegate"} {
		buf := make([]byte, 8)
		n, err := unix.Getxattr(dir, name, buf)
		if err == nil {
			return strings.TrimSpace(string(buf[:n])) == "1", nil
		}
		lastErr = err
	}
	return false, lastErr
}

// ScopeName is the transient scope EnterScope puts a server with data directory dataDir in: one
// name per data directory, so the groups of a crashed server are found by the next one.
func ScopeName(dataDir string) string {
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		abs = dataDir
	}
	sum := sha256.Sum256([]byte(abs))
	return "sandboxd-" + hex.EncodeToString(sum[:6]) + ".scope"
}

// EnterScope makes sure, on a cgroup v2 host under systemd, that the process runs in a cgroup
// delegated to it. When its cgroup is not (see Delegated), it re-executes the running program
// (same arguments and environment) through `systemd-run --scope -p Delegate=yes` in the transient
// scope ScopeName(dataDir), in place (the PID stays the same): it does not return unless the
// re-exec could not start. A scope of that name left by a server that died (its data directory is
// no longer locked: lock is that lock file) is stopped first: what it still holds are that
// server's orphaned sandboxes, which the new server's reconciliation records and cleans up.
// Elsewhere (cgroup v1, no systemd, the root cgroup, already delegated) it returns nil at once.
func EnterScope(dataDir, lock string) error {
	if !UnifiedOnly() || !systemdPID1() {
		return nil
	}
	own, err := Own()
	if err != nil {
		return err
	}
	if own == "/" || Delegated(own) {
		return nil
	}
	systemdRun, err := exec.LookPath("systemd-run")
	if err != nil {
		return fmt.Errorf("cgroup v2 under systemd: %s is not delegated and systemd-run is missing (run sandboxd as a unit with Delegate=yes: deploy/sandboxd.service)", own)
	}
	unit := ScopeName(dataDir)
	if free, err := lockFree(lock); err != nil {
		return err
	} else if !free {
		return fmt.Errorf("data dir %s is in use by another sandboxd (stop it first)", dataDir)
	}
	// An orphaned scope: stop it (systemd kills what is left in it). Absent is fine.
	_ = exec.Command("systemctl", "stop", unit).Run()
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	args := append([]string{systemdRun, "--scope", "--quiet", "--collect", "--unit=" + unit,
		"--property=Delegate=yes", "--description=sandboxd (" + dataDir + ")", "--", exe}, os.Args[1:]...)
	env := append(os.Environ(), scopeEnv+"="+unit)
	if err := syscall.Exec(systemdRun, args, env); err != nil {
		return fmt.Errorf("re-exec in a delegated systemd scope (%s): %w", strings.Join(args[:6], " "), err)
	}
	return nil
}

// lockFree reports whether nobody holds the flock on path (a missing file is free).
func lockFree(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil
		}
		return false, err
	}
	return true, nil // closing f releases it
}

// Delegate makes the process's own cgroup v2 the base of its groups when it is delegated (see
// the package comment): it moves every process of that cgroup into its "supervisor" leaf and
// enables the cpu, memory and pids controllers below it. It returns the base ("" when groups stay
// at the root: cgroup v1, the root cgroup, or a cgroup not delegated to us — then the root is used
// as before, which works for root but is not what systemd wants: doctor says so). Call it once,
// after the process is in the cgroup it will stay in (after mountns.Enter), before any driver
// reads the layout.
func Delegate() (string, error) {
	if !UnifiedOnly() {
		return "", nil
	}
	own, err := Own()
	if err != nil {
		return "", err
	}
	// A re-executed child of ours (mountns) may already be in the leaf.
	if parent, leaf := filepath.Split(own); leaf == supervisorLeaf && parent != "/" {
		own = filepath.Clean(parent)
	}
	if !Delegated(own) {
		return "", nil
	}
	dir := filepath.Join(root, own)
	if err := moveAll(dir, filepath.Join(dir, supervisorLeaf)); err != nil {
		return "", err
	}
	avail, _ := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	var want []string
	for _, c := range []string{"cpu", "memory", "pids"} {
		if !strings.Contains(" "+strings.TrimSpace(string(avail))+" ", " "+c+" ") {
			return "", fmt.Errorf("cgroup v2: the %s controller is not available in %s (its parent does not delegate it: with systemd, Delegate=yes gives all)", c, own)
		}
		want = append(want, "+"+c)
	}
	if err := write(dir, "cgroup.subtree_control", strings.Join(want, " ")); err != nil {
		return "", err
	}
	baseMu.Lock()
	base = own
	baseMu.Unlock()
	return own, nil
}

// moveAll moves every process of cgroup dir into its child leaf (made if missing), until dir has
// none: a process being forked while it moves others may land in dir, so it loops.
func moveAll(dir, leaf string) error {
	if err := os.Mkdir(leaf, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("cgroup: %w", err)
	}
	for range 100 {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil {
			return fmt.Errorf("cgroup: %w", err)
		}
		pids := strings.Fields(string(b))
		if len(pids) == 0 {
			return nil
		}
		for _, p := range pids {
			if _, err := strconv.Atoi(p); err != nil {
				continue
			}
			if err := write(leaf, "cgroup.procs", p); err != nil && !errors.Is(err, unix.ESRCH) {
				return err
			}
		}
	}
	return fmt.Errorf("cgroup: %s keeps getting new processes; cannot empty it into %s", dir, leaf)
}
