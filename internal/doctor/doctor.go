// Package doctor checks that a host has what sandboxd needs, before the first create finds out:
// root, the kernel and its features (user and mount namespaces, seccomp filters, overlayfs,
// nftables, ext4 on loop devices), the cgroup controllers sandboxd's groups get, an OCI runtime
// and the tools the container driver runs, the sandbox-agent binary, the default image (or
// debootstrap to build it), the data directory's space, and WASM mode's python.wasm.
//
// Each check is one small function that says what it checks and returns one Result: OK, Missing
// (sandboxd cannot work: the report fails) or Warn (an optional feature is unavailable), with the
// exact fix for anything not OK. Checks read the host only through a Host — directory roots
// (/proc, /sys, /dev, /run, /lib/modules) and hooks (PATH lookup, statfs, running a command, the
// probes that are system calls) — so tests run them against fake trees. A check never changes the
// host beyond what serve itself would do (it creates the data directory) and cleans up after its
// probes (a sparse file, a child process in a new namespace).
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/config"
)

// Status is a check's verdict.
type Status string

const (
	OK      Status = "ok"
	Missing Status = "missing" // required: sandboxd does not work without it
	Warn    Status = "warn"    // optional: a feature is unavailable or degraded
)

// Result is one check's line.
type Result struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// Report is every check's result, in order.
type Report struct {
	Results []Result `json:"results"`
	OK      bool     `json:"ok"` // no result is Missing
}

// Host is how the checks see the machine. System returns the real one; tests fill it with fake
// trees and hooks.
type Host struct {
	Proc    string // procfs, normally /proc
	Sys     string // sysfs, normally /sys: cgroup mount points under /sys are read beneath it
	Dev     string // normally /dev
	Run     string // normally /run: systemd runs when Run/systemd/system exists
	Modules string // normally /lib/modules
	Sbin    string // where mkfs.ext4 is looked for when PATH lacks it (as package disk does): /sbin

	// Cache is where scripts/build-image.sh and build-python-wasm.sh cache what they build
	// (${SANDBOXD_CACHE:-~/.cache/sandboxd}); Scripts is the directory holding those scripts
	// ("" when not found: any complete build in the cache counts).
	Cache   string
	Scripts string

	LookPath func(file string) (string, error)          // a command on PATH, as exec.LookPath
	Statfs   func(path string, st *unix.Statfs_t) error // as unix.Statfs
	Exec     func(cmd *exec.Cmd) ([]byte, error)        // runs cmd, returns its combined output
	Seccomp  func() error                               // nil when seccomp filters are supported
	Nft      func() (int, error)                        // the number of nftables tables, over netlink
	Loop     func(dev string) (string, error)           // a free loop device from dev/loop-control
	Delegate func(cgroupDir string) (bool, error)       // whether systemd delegated cgroupDir (see delegated)
}

// System returns the Host of the running machine.
func System() *Host {
	cache := os.Getenv("SANDBOXD_CACHE")
	if cache == "" {
		if home, err := os.UserHomeDir(); err == nil {
			cache = filepath.Join(home, ".cache", "sandboxd")
		}
	}
	return &Host{
		Proc: "/proc", Sys: "/sys", Dev: "/dev", Run: "/run", Modules: "/lib/modules", Sbin: "/sbin",
		Cache: cache, Scripts: findScripts(),
		LookPath: exec.LookPath, Statfs: unix.Statfs,
		Exec:    func(cmd *exec.Cmd) ([]byte, error) { return cmd.CombinedOutput() },
		Seccomp: seccompFilters, Nft: listNftables, Loop: freeLoop, Delegate: cgroup.DelegateXattr,
	}
}

// findScripts returns the scripts directory of the checkout the binary was built in (bin/../scripts),
// or of the working directory, or "".
func findScripts() string {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Join(filepath.Dir(exe), "..", "scripts"))
	}
	dirs = append(dirs, "scripts")
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "build-image.sh")); err == nil {
			if abs, err := filepath.Abs(d); err == nil {
				return abs
			}
		}
	}
	return ""
}

// probeTimeout bounds every command a check runs.
const probeTimeout = 10 * time.Second

// command builds a command bounded by ctx.
func command(ctx context.Context, path string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = time.Second
	return cmd
}

// doctor is one run of the checks: the host, the settings serve would use, and facts several
// checks share.
type doctor struct {
	ctx context.Context
	h   *Host
	cfg config.Config

	cg      *cgroups // read once (cgroups.go)
	runtime string   // the OCI runtime serve would pick ("" none)
}

// Run runs every check against h with the settings cfg (from config.ParseDoctor).
func Run(ctx context.Context, h *Host, cfg config.Config) Report {
	d := &doctor{ctx: ctx, h: h, cfg: cfg}
	checks := []func() Result{
		d.root, d.kernel, d.userNamespaces, d.mountNamespace, d.seccomp, d.overlay, d.nftables,
		d.disks, d.cgroups, d.ociRuntime, d.helpers, d.agent, d.image, d.dataDir, d.wasm,
	}
	rep := Report{OK: true}
	for _, c := range checks {
		r := c()
		rep.OK = rep.OK && r.Status != Missing
		rep.Results = append(rep.Results, r)
	}
	return rep
}

// Print writes one line per result — status, name and detail in columns of fixed width, so the
// lines read the same on every host — and a summary line; with asJSON the report as JSON.
func (r Report) Print(w io.Writer, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	counts := map[Status]int{}
	var b strings.Builder
	for _, res := range r.Results {
		counts[res.Status]++
		fmt.Fprintf(&b, "%-8s %-16s %s", res.Status, res.Name, res.Detail)
		if res.Fix != "" {
			fmt.Fprintf(&b, " — fix: %s", res.Fix)
		}
		b.WriteByte('\n')
	}
	verdict := "ready: every requirement is present"
	if !r.OK {
		verdict = "not ready: fix the missing lines, then run sandboxd doctor again"
	}
	fmt.Fprintf(&b, "%d ok, %d warn, %d missing — %s\n", counts[OK], counts[Warn], counts[Missing], verdict)
	_, err := io.WriteString(w, b.String())
	return err
}

// install is the fix that installs a package: Debian's name, and Fedora/RHEL's when it differs
// or needs more than dnf install (rpm: "" when the same command works).
func install(deb, rpm string) string {
	s := "apt-get install " + deb
	if rpm != "" {
		s += " (Fedora/RHEL: " + rpm + ")"
	}
	return s
}

// readFile reads a file under one of the Host's roots.
func readFile(root, rel string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, rel))
	return string(b), err
}

func ok(name, detail string) Result { return Result{Name: name, Status: OK, Detail: detail} }

func missing(name, detail, fix string) Result {
	return Result{Name: name, Status: Missing, Detail: detail, Fix: fix}
}

func warn(name, detail, fix string) Result {
	return Result{Name: name, Status: Warn, Detail: detail, Fix: fix}
}
