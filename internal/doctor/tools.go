package doctor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// ociRuntimes are the runtimes serve can drive, in its order of preference (container.Open).
var ociRuntimes = []string{"crun", "runc"}

// ociRuntime checks for the OCI runtime serve would drive — --runtime's, else crun, else runc —
// on PATH, with its version. (serve also proves at start that it runs a container; the doctor
// starts none.) With only runc it warns: crun is faster, and with runc the sandboxes' user
// namespaces are made by the runtime, owned by root.
func (d *doctor) ociRuntime() Result {
	const name = "OCI runtime"
	candidates := ociRuntimes
	if r := d.cfg.Runtime; r != "" {
		if !slices.Contains(ociRuntimes, r) {
			return missing(name, fmt.Sprintf("unknown OCI runtime %q (--runtime)", r), "pass --runtime crun or --runtime runc, or leave it out")
		}
		candidates = []string{r}
	}
	var found, broken []string
	for _, rt := range candidates {
		p, err := d.h.LookPath(rt)
		if err != nil {
			continue
		}
		v, err := d.version(p)
		if err != nil {
			broken = append(broken, err.Error())
			continue
		}
		if d.runtime == "" {
			d.runtime = rt
		}
		found = append(found, rt+" "+v)
	}
	if d.runtime == "" {
		detail := "neither crun nor runc on PATH"
		if d.cfg.Runtime != "" {
			detail = d.cfg.Runtime + " (--runtime) not on PATH"
		}
		if len(broken) > 0 {
			detail = strings.Join(broken, "; ")
		}
		return missing(name, detail, install(candidates[0], ""))
	}
	detail := strings.Join(found, ", ") + ": serve uses " + d.runtime
	if d.runtime == "crun" && d.readCgroups().mode() == "v1 hybrid" {
		detail += " (crun refuses cgroup v1 hybrid hosts: sandboxd runs it in its own mount namespace without the cgroup2 mount, package mountns)"
	}
	if d.runtime == "runc" && d.cfg.Runtime == "" {
		return warn(name, detail+"; crun is faster, and with runc each sandbox's user namespace is root's", install("crun", ""))
	}
	return ok(name, detail)
}

// version runs `path --version` and returns the version its first line names.
func (d *doctor) version(path string) (string, error) {
	ctx, cancel := context.WithTimeout(d.ctx, probeTimeout)
	defer cancel()
	out, err := d.h.Exec(command(ctx, path, "--version"))
	if err != nil {
		return "", fmt.Errorf("%s --version: %v: %s", path, err, strings.TrimSpace(string(out)))
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	f := strings.Fields(first) // "crun version 1.8.1"
	if len(f) == 0 {
		return "", fmt.Errorf("%s --version printed nothing", path)
	}
	return f[len(f)-1], nil
}

// helpers checks the programs the container driver runs beside the runtime: util-linux's unshare
// and coreutils' cat hold each sandbox's user namespace (with crun; runc makes its own), and
// nsenter starts each sandbox's zygote (without it, runs start without one: slower).
func (d *doctor) helpers() Result {
	const name = "helper tools"
	var got, lack, fixes []string
	for _, t := range []struct{ cmd, pkg string }{{"unshare", "util-linux"}, {"cat", "coreutils"}, {"nsenter", "util-linux"}} {
		if p, err := d.h.LookPath(t.cmd); err == nil {
			got = append(got, p)
		} else {
			lack = append(lack, t.cmd)
			if fix := install(t.pkg, ""); !slices.Contains(fixes, fix) {
				fixes = append(fixes, fix)
			}
		}
	}
	fix := strings.Join(fixes, "; ")
	holder := d.runtime != "runc"
	switch {
	case holder && (slices.Contains(lack, "unshare") || slices.Contains(lack, "cat")):
		return missing(name, strings.Join(lack, ", ")+" not on PATH: unshare and cat hold each sandbox's user namespace", fix)
	case slices.Contains(lack, "nsenter"):
		return warn(name, "nsenter not on PATH: runs start without a zygote (slower)", fix)
	}
	return ok(name, strings.Join(got, " "))
}

// agent checks the sandbox-agent binary serve mounts into every container (--agent-bin, default
// next to sandboxd).
func (d *doctor) agent() Result {
	const name = "sandbox-agent"
	if err := config.CheckAgentBin(d.cfg.AgentBin); err != nil {
		return missing(name, d.cfg.AgentBin+" not found", "make build (or pass --agent-bin)")
	}
	return ok(name, d.cfg.AgentBin)
}

// image checks the container images: those the flags or --config approve (each a root file
// system with python3), or, when none is named (make run builds the default one after the
// doctor), the default (data) image in scripts/build-image.sh's cache, or debootstrap to build it.
func (d *doctor) image() Result {
	if r, named := d.named("images", sandbox.ModeContainer); named {
		return r
	}
	const name = "default image"
	fix := install("debootstrap", "dnf install debootstrap, from EPEL on RHEL")
	dir, cached := d.cached("images", "agent-sandbox-data-", d.recipeHash(imageRecipe...))
	_, err := d.h.LookPath("debootstrap")
	switch {
	case cached && err == nil:
		return ok(name, "cached at "+filepath.Join(dir, "rootfs"))
	case cached:
		return warn(name, "cached at "+filepath.Join(dir, "rootfs")+", but debootstrap is not on PATH: a new recipe could not be built", fix)
	case err == nil:
		return ok(name, "not built yet: make run builds it with debootstrap (a few minutes, once)")
	}
	return missing(name, "not built, and debootstrap (which builds it) is not on PATH", fix)
}

// wasm checks WASM mode's python.wasm: the WASM images the flags or --config approve, or
// scripts/build-python-wasm.sh's cache. WASM mode is optional: without it, a warning.
func (d *doctor) wasm() Result {
	if r, named := d.named("WASM images", sandbox.ModeWASM); named {
		return r
	}
	const name = "WASM mode"
	dir, cached := d.cached("python-wasm", "python-3.11-wasi-", d.recipeHash(wasmRecipe...))
	if !cached {
		return warn(name, "python.wasm is not built: WASM sandboxes are unavailable", "make wasm builds it, 4–8 min (make run does it after the doctor)")
	}
	return ok(name, "python.wasm cached at "+dir)
}

// named checks the images of mode that the flags or --config approve (config.CheckImage, as
// serve does); named is false when there are none.
func (d *doctor) named(name, mode string) (r Result, named bool) {
	var got []string
	for _, im := range d.cfg.Images {
		if im.Mode != mode {
			continue
		}
		if err := config.CheckImage(&im); err != nil {
			return missing(name, err.Error(), "build it (make image, make wasm), or fix --image/--wasm-image/--config"), true
		}
		got = append(got, im.Name+"="+im.RootFS)
	}
	return ok(name, strings.Join(got, ", ")), len(got) > 0
}

// cached finds a complete build in the cache (Cache/sub/prefix+hash, with .complete written
// last, as the build scripts do); without the recipe's hash (scripts not found), the newest
// complete build of any recipe.
func (d *doctor) cached(sub, prefix, hash string) (string, bool) {
	base := filepath.Join(d.h.Cache, sub)
	if hash != "" {
		dir := filepath.Join(base, prefix+hash)
		_, err := os.Stat(filepath.Join(dir, ".complete"))
		return dir, err == nil
	}
	var newest string
	var when int64
	ms, _ := filepath.Glob(filepath.Join(base, prefix+"*", ".complete"))
	for _, m := range ms {
		if st, err := os.Stat(m); err == nil && st.ModTime().UnixNano() > when {
			newest, when = filepath.Dir(m), st.ModTime().UnixNano()
		}
	}
	return newest, newest != ""
}

// recipeHash is the name a build script gives its build, from the files of its recipe (paths in
// the scripts directory): the first 12 hex digits of the sha256 of `sha256sum FILES...`'s output,
// as scripts/build-image.sh and build-python-wasm.sh compute it ("" when the scripts are not found).
func (d *doctor) recipeHash(files ...string) string {
	var lines strings.Builder
	for _, f := range files {
		sum, err := d.fileSum(f)
		if err != nil {
			return ""
		}
		fmt.Fprintf(&lines, "%s  %s\n", sum, f)
	}
	sum := sha256.Sum256([]byte(lines.String()))
	return hex.EncodeToString(sum[:])[:12]
}

// The recipes of the default image (scripts/build-image.sh data) and of python.wasm.
var (
	imageRecipe = []string{"build-image.sh", "image/data.packages"}
	wasmRecipe  = []string{"build-python-wasm.sh", "wasm/sqlite-wasi-shim.h"}
)

// fileSum is the sha256 (hex) of a file of the scripts directory.
func (d *doctor) fileSum(rel string) (string, error) {
	if d.h.Scripts == "" {
		return "", errors.New("scripts directory not found")
	}
	b, err := os.ReadFile(filepath.Join(d.h.Scripts, rel))
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// dataDir checks the data directory (created, as serve creates it): the free space of its file
// system against the floor below which serve refuses creates (disk_free_floor_bytes), and sparse
// files on it, which every sandbox's disk image is.
func (d *doctor) dataDir() Result {
	const name = "data dir"
	dir := d.cfg.DataDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return missing(name, fmt.Sprintf("cannot create %s: %v", dir, err), "pass a --data-dir it can create (as root)")
	}
	var st unix.Statfs_t
	if err := d.h.Statfs(dir, &st); err != nil {
		return missing(name, fmt.Sprintf("statfs %s: %v", dir, err), "pass another --data-dir")
	}
	floor := d.cfg.DiskFreeFloor
	if floor == 0 {
		floor = sandbox.DefaultDiskFreeFloor
	}
	free := int64(st.Bavail) * st.Bsize
	if free < floor {
		return missing(name, fmt.Sprintf("%s: %s free, below the floor of %s (disk_free_floor_bytes) under which creates are refused",
			dir, sandbox.FormatBytes(free), sandbox.FormatBytes(floor)),
			"free space on that file system, pass a --data-dir on a larger one, or lower disk_free_floor_bytes in --config")
	}
	fs := fsName(st.Type)
	if st.Type == unix.OVERLAYFS_SUPER_MAGIC {
		// Each container sandbox's root is an overlay whose upper layer is in the data dir, and
		// overlayfs cannot be an upper layer (a container's root file system, a live CD).
		return missing(name, fmt.Sprintf("%s is on overlayfs, which cannot hold the upper layer of each sandbox's root", dir),
			"pass a --data-dir on ext4, xfs, btrfs or tmpfs")
	}
	if err := sparseProbe(dir); err != nil {
		return missing(name, fmt.Sprintf("%s (%s) keeps no sparse files, which sandbox disk images are: %v", dir, fs, err),
			"pass a --data-dir on ext4, xfs or btrfs")
	}
	return ok(name, fmt.Sprintf("%s: %s, %s free (floor %s), sparse files", dir, fs, sandbox.FormatBytes(free), sandbox.FormatBytes(floor)))
}

// sparseProbe writes one block 32 MiB into a new 64 MiB file in dir and checks that the file
// system kept the rest a hole: SEEK_DATA from 0 lands on the block (package disk copies images
// extent by extent with SEEK_DATA/SEEK_HOLE).
func sparseProbe(dir string) error {
	f, err := os.CreateTemp(dir, ".doctor-sparse-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	const size, at = 64 << 20, 32 << 20
	if err := f.Truncate(size); err != nil {
		return err
	}
	block := make([]byte, 4096)
	for i := range block {
		block[i] = 0x5a
	}
	if _, err := f.WriteAt(block, at); err != nil {
		return err
	}
	off, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	if err != nil {
		return fmt.Errorf("SEEK_DATA: %w", err)
	}
	if off != at {
		return fmt.Errorf("its data begins at %d, not at the block written at %d: no holes", off, at)
	}
	return nil
}

// fsName names the file systems a data directory is commonly on.
func fsName(magic int64) string {
	switch magic {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	case unix.NFS_SUPER_MAGIC:
		return "nfs"
	}
	return fmt.Sprintf("file system 0x%x", magic)
}
