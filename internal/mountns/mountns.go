// Package mountns puts sandboxd in a private mount namespace of its own (Enter), so that every
// mount it makes — each sandbox's root, its disk — lives only there and vanishes with the process,
// and gives it directories there that sandboxes' user namespaces can traverse (Dir).
package mountns

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// mountNSEnv marks a process that EnterMountNamespace re-executed in a private mount namespace. Its
// value is the mount namespace the parent was in, so the child can check it really left it.
const mountNSEnv = "SANDBOXD_PARENT_MOUNTNS"

// hybridUnified is where a cgroup v1 "hybrid" host mounts its (nearly empty) cgroup2 hierarchy.
const hybridUnified = "/sys/fs/cgroup/unified"

var (
	nsMu      sync.Mutex
	nsEntered bool
)

// Enter puts the calling process in a private mount namespace of its own, and must be
// called first thing in main (and in TestMain), before any goroutine that matters is started:
//
//   - In the original process it re-executes the running binary (same argv and environment, plus a
//     marker variable) with CLONE_NEWNS unshared and "/" made recursively private, in a process
//     group of its own, forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it, and
//     exits with its status: it does not return unless the re-exec could not start (then it
//     returns the error, e.g. EPERM when not root).
//   - In the re-executed process it checks that its mount namespace differs from the parent's,
//     and, on a cgroup v1 hybrid host (cgroup2 at /sys/fs/cgroup/unified next to v1 controllers),
//     unmounts that cgroup2 mount, since crun refuses hybrid hosts. Then it returns nil.
//
// The effect: every mount sandboxd makes (each sandbox's overlay root and disk) lives only in
// that namespace and disappears with the process, so a crash never leaks a mount on the host; and
// crun works on hybrid hosts. The child runs with PR_SET_PDEATHSIG=SIGKILL, so it does not outlive
// its parent. Because the child has a process group of its own, signals sent to the original
// process's group — a terminal's Ctrl-C, `kill -TERM -PGID` — reach only the original process,
// which forwards each one exactly once: the child (and every helper it starts, in its group or
// their own) sees one signal per signal sent, never the terminal's copy and the forwarded one.
// Calling it again in the same process is a no-op.
func Enter() error {
	nsMu.Lock()
	defer nsMu.Unlock()
	if nsEntered {
		return nil
	}
	own, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	if parent := os.Getenv(mountNSEnv); parent != "" && parent != own {
		// We are the re-executed child, in a namespace of our own.
		os.Unsetenv(mountNSEnv)
		// Go already made "/" MS_REC|MS_PRIVATE after unsharing; make sure, in case a parent other
		// than ours set the variable.
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("mount namespace: make / private: %w", err)
		}
		if err := dropHybridCgroup2(); err != nil {
			return err
		}
		nsEntered = true
		return nil
	}
	return reexecInMountNamespace(own)
}

// Entered reports whether Enter succeeded in this process.
func Entered() bool {
	nsMu.Lock()
	defer nsMu.Unlock()
	return nsEntered
}

// HybridCgroup reports whether the host mounts cgroup v1 controllers and a cgroup2 hierarchy at
// /sys/fs/cgroup/unified (as seen in the current mount namespace).
func HybridCgroup() bool {
	var root, uni unix.Statfs_t
	if unix.Statfs("/sys/fs/cgroup", &root) != nil || unix.Statfs(hybridUnified, &uni) != nil {
		return false
	}
	return root.Type == unix.TMPFS_MAGIC && uni.Type == unix.CGROUP2_SUPER_MAGIC
}

func dropHybridCgroup2() error {
	if !HybridCgroup() {
		return nil
	}
	if err := unix.Unmount(hybridUnified, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("mount namespace: unmount %s (cgroup v1 hybrid host): %w", hybridUnified, err)
	}
	return nil
}

func reexecInMountNamespace(ownNS string) error {
	// The binary's path (not /proc/self/exe) so the child keeps the program's name in ps.
	exe, err := os.Executable()
	if err != nil || strings.HasSuffix(exe, " (deleted)") {
		exe = "/proc/self/exe"
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), mountNSEnv+"="+ownNS)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Unshareflags: syscall.CLONE_NEWNS,
		// Out of the caller's process group: what is sent to that group (Ctrl-C) reaches the
		// child once, through the forwarding below.
		Setpgid: true,
		// Pdeathsig fires when the thread that started the child ends: keep this goroutine on its
		// thread for good (we never return on success).
		Pdeathsig: syscall.SIGKILL,
	}
	runtime.LockOSThread()
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}
	sigc := make(chan os.Signal, 8)
	signal.Notify(sigc, sigs...)
	if err := cmd.Start(); err != nil {
		signal.Stop(sigc)
		runtime.UnlockOSThread()
		return fmt.Errorf("enter a private mount namespace (re-exec with CLONE_NEWNS; needs root): %w", err)
	}
	go func() {
		for s := range sigc {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	signal.Stop(sigc)
	if err == nil {
		os.Exit(0)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			os.Exit(128 + int(ws.Signal()))
		}
		os.Exit(ee.ExitCode())
	}
	fmt.Fprintf(os.Stderr, "sandboxd: private mount namespace child: %v\n", err)
	os.Exit(1)
	return nil
}

// Base is where Dir's directories are: on the host, /run/sandboxd/<hash> stays an empty directory.
const Base = "/run/sandboxd"

var (
	dirMu sync.Mutex
	dirs  = map[string]string{}
)

// Dir returns the directory of this process's mount namespace that belongs to key (a state
// directory's absolute path): Base/<hash of key>, with a tmpfs of mode 0711 mounted on it the
// first time, so that what is mounted or created below it is private to sandboxd and gone with it,
// and the paths to it are traversable by any user — a sandbox's user namespace must reach the
// roots and bind sources of its mounts. Enter must have run.
func Dir(key string) (string, error) {
	if !Entered() {
		return "", errors.New("mountns.Dir: call mountns.Enter() first thing in main")
	}
	dirMu.Lock()
	defer dirMu.Unlock()
	if d, ok := dirs[key]; ok {
		return d, nil
	}
	sum := sha256.Sum256([]byte(key))
	d := filepath.Join(Base, hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(d, 0o711); err != nil {
		return "", fmt.Errorf("mount dir: %w", err)
	}
	if err := os.Chmod(Base, 0o711); err != nil { // whatever the umask made of it
		return "", fmt.Errorf("mount dir: %w", err)
	}
	if err := unix.Mount("tmpfs", d, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0711"); err != nil {
		return "", fmt.Errorf("mount dir: tmpfs on %s: %w", d, err)
	}
	dirs[key] = d
	return d, nil
}
