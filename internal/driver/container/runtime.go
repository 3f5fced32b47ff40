package container

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/pseudofs"
)

// knownRuntimes are the OCI runtimes the driver detects, in order of preference. gVisor's runsc
// (runscName) is never detected: an operator chooses it (Options.Runtime, or per image).
var knownRuntimes = []string{"crun", "runc"}

// runscName is gVisor's OCI runtime: each sandbox runs on gVisor's user-space kernel (the Sentry)
// instead of the host's. See runscFlags for how the driver runs it, and RATIONALE.md.
const runscName = "runsc"

const installHint = "install it with scripts/install-deps.sh"

// runscFlags are runsc's global flags for every command (they must be the same for create,
// list, ps, kill and delete, which read the sandbox's state with them):
//   - --platform=systrap: no /dev/kvm here (a Firecracker guest); systrap is the default platform,
//     named so that a newer default cannot change it unnoticed;
//   - --network=sandbox: gVisor's own network stack on the network namespace of config.json
//     (netsetup's): it takes over eth0's addresses and routes; the host's nftables rules on the
//     veth's host side still see and filter every packet (the rules inside the namespace do not);
//   - --oci-seccomp: apply config.json's seccomp profile to the sandbox's processes inside
//     gVisor (without it runsc ignores it; its own host-side filter guards the Sentry);
//   - --overlay2=none: the root is already the driver's overlay, mounted read-only, and /tmp is
//     the sandbox's disk: no gVisor overlay (by default kept in memory or in a file in the root);
//   - --host-uds=none, --host-fifo=none: no unix socket or FIFO of the host is reachable through a
//     mount (the defaults, named).
var runscFlags = []string{"--platform=systrap", "--network=sandbox", "--oci-seccomp", "--overlay2=none", "--host-uds=none", "--host-fifo=none"}

// ociRuntime drives one OCI runtime's CLI with its state under root.
type ociRuntime struct {
	name  string   // "crun", "runc" or "runsc"
	bin   string   // absolute path of the binary
	root  string   // --root: the runtime's state directory, ours alone
	flags []string // global flags after --root (runscFlags for runsc)
}

// newRuntime finds runtime name's binary: bin if set, else name in PATH.
func newRuntime(name, bin, stateDir string) (*ociRuntime, error) {
	if bin == "" {
		var err error
		if bin, err = exec.LookPath(name); err != nil {
			hint := installHint
			if name == runscName {
				hint = "build it with scripts/build-runsc.sh and pass its path (--runsc)"
			}
			return nil, fmt.Errorf("%s not found in PATH: %s", name, hint)
		}
	} else if st, err := os.Stat(bin); err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("%s binary %s is missing or not executable", name, bin)
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return nil, err
	}
	r := &ociRuntime{name: name, bin: bin, root: filepath.Join(stateDir, "runtime", name)}
	if name == runscName {
		r.flags = runscFlags
	}
	return r, nil
}

// gvisor reports whether the runtime is gVisor's: the sandbox's processes are not host processes
// (the host sees the Sentry, its gofer and their helpers), so the driver cannot start a zygote
// in the sandbox, list its processes from its cgroups, nor hand its agent a listening socket.
func (r *ociRuntime) gvisor() bool { return r.name == runscName }

func (r *ociRuntime) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.bin, append(append([]string{"--root", r.root}, r.flags...), args...)...)
	cmd.WaitDelay = 5 * time.Second
	// A process group of its own, like every helper sandboxd starts: a signal sent to sandboxd's
	// group must not cut a create or delete half-way (sandboxd stops its sandboxes itself).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// output runs a runtime command and returns its stdout; errors carry its stderr.
func (r *ociRuntime) output(ctx context.Context, args ...string) ([]byte, error) {
	cmd := r.command(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", r.name, args[0], err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// ownedUserNS reports whether the runtime can join a user namespace the driver made (see
// userns.go) together with the network namespace netsetup made. runc (1.1) joins the user
// namespace first, after which the network namespace, the host's, is out of its reach; with runc
// the runtime makes the user namespace (same ids), owned by root. runsc joins a namespace given
// by path with setns(2) from its own (multi-threaded Go) process, which the kernel refuses for a
// user namespace (EINVAL): it makes the namespace itself too (RATIONALE.md).
func (r *ociRuntime) ownedUserNS() bool { return r.name == "crun" }

// exists reports whether the runtime has state for container id.
func (r *ociRuntime) exists(id string) bool {
	if r.gvisor() { // <root>/<container>_sandbox:<sandbox>.state (ids have no glob metacharacters: statedir.CheckID)
		m, _ := filepath.Glob(filepath.Join(r.root, id+"_sandbox:*.state"))
		return len(m) > 0
	}
	_, err := os.Stat(filepath.Join(r.root, id))
	return err == nil
}

// delete kills (SIGKILL) and deletes container id; a container that does not exist is fine.
func (r *ociRuntime) delete(ctx context.Context, id string) error {
	if !r.exists(id) {
		return nil
	}
	if r.name == "runc" && r.killAndWait(ctx, id) {
		if _, err := r.output(ctx, "delete", id); err == nil || !r.exists(id) {
			return nil
		}
	}
	_, err := r.output(ctx, "delete", "--force", id)
	if err != nil && !r.exists(id) {
		return nil // gone anyway (e.g. "does not exist" after a concurrent delete)
	}
	return err
}

// killAndWait SIGKILLs the container's init (and so its whole PID namespace) and waits until it
// has exited. runc's own `delete --force` polls at 100 ms; this takes a few ms. It reports false
// when it could not tell, and the caller falls back to `delete --force`.
func (r *ociRuntime) killAndWait(ctx context.Context, id string) bool {
	b, err := os.ReadFile(filepath.Join(r.root, id, "state.json"))
	if err != nil {
		return false
	}
	var st struct {
		Pid int `json:"init_process_pid"`
	}
	if json.Unmarshal(b, &st) != nil || st.Pid <= 0 {
		return false
	}
	if !exited(st.Pid) {
		if _, err := r.output(ctx, "kill", id, "KILL"); err != nil && !exited(st.Pid) {
			return false
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for !exited(st.Pid) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// exited reports whether process pid is gone or a zombie.
func exited(pid int) bool {
	b, err := pseudofs.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && (b[i+2] == 'Z' || b[i+2] == 'X')
}

// list returns the IDs of the containers under our root.
func (r *ociRuntime) list(ctx context.Context) ([]string, error) {
	if _, err := os.Stat(r.root); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	out, err := r.output(ctx, "list", "--format", "json")
	if err != nil {
		return nil, err
	}
	var cs []struct {
		ID string `json:"id"`
	}
	if s := bytes.TrimSpace(out); len(s) > 0 && !bytes.Equal(s, []byte("null")) {
		if err := json.Unmarshal(s, &cs); err != nil {
			return nil, fmt.Errorf("%s list: %w", r.name, err)
		}
	}
	ids := make([]string, 0, len(cs))
	for _, c := range cs {
		ids = append(ids, c.ID)
	}
	return ids, nil
}

// probe proves the runtime can create a container on this host with the sandbox's settings
// (namespaces, a user namespace, cgroups with limits, seccomp, read-only root, no capabilities): it creates one from
// an empty root with the agent binary bound in, then deletes it without ever starting it.
func (r *ociRuntime) probe(ctx context.Context, stateDir, mnt, agentBin string, prof *specs.LinuxSeccomp) error {
	if _, err := r.output(ctx, "--version"); err != nil {
		return err
	}
	id := probePrefix + statedir.RandomHex(6)
	dir := filepath.Join(stateDir, "probe", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The root, like a sandbox's, where the container's user namespace can reach it.
	rootfs := filepath.Join(mnt, id, "root")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(filepath.Join(mnt, id))
	if err := standardMountPoints(rootfs); err != nil {
		return err
	}
	cs := containerSpec{
		id: id, rootfs: rootfs, args: []string{agentPath}, cwd: "/",
		mounts: []specs.Mount{{Destination: agentPath, Type: "bind", Source: agentBin, Options: []string{"bind", "ro", "nosuid", "nodev"}}},
		res:    probeResources,
		gvisor: r.gvisor(),
	}
	if err := statedir.WriteJSON(filepath.Join(dir, "config.json"), makeSpec(cs, prof)); err != nil {
		return err
	}
	// The created container keeps its stdio open: give it a file, not a pipe we would wait on.
	logf, err := os.Create(filepath.Join(dir, "create.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := r.command(ctx, "create", "--bundle", dir, id)
	cmd.Stdout, cmd.Stderr = logf, logf
	runErr := cmd.Run()
	delErr := r.delete(context.WithoutCancel(ctx), id)
	if cl, err := readCgroupLayout(); err == nil {
		_ = cl.removeCgroups(id)
	}
	if runErr != nil {
		out, _ := os.ReadFile(logf.Name())
		return fmt.Errorf("%s create: %w: %s", r.name, runErr, strings.TrimSpace(string(out)))
	}
	return delErr
}

// guestTimeout bounds runsc ps and kill.
const guestTimeout = 10 * time.Second

// guestPIDs lists the PIDs, inside gVisor, of container id's processes (runsc ps).
func (r *ociRuntime) guestPIDs(id string) ([]int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()
	out, err := r.output(ctx, "ps", "--format", "json", id)
	if err != nil {
		return nil, err
	}
	var pids []int
	if err := json.Unmarshal(bytes.TrimSpace(out), &pids); err != nil {
		return nil, fmt.Errorf("%s ps: %w", r.name, err)
	}
	return pids, nil
}

// killGuest SIGKILLs process pid (a PID inside gVisor) of container id.
func (r *ociRuntime) killGuest(id string, pid int) error {
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()
	_, err := r.output(ctx, "kill", "--pid", strconv.Itoa(pid), id, "KILL")
	return err
}

// close releases what the runtime keeps in this process's mount namespace: runsc bind-mounts an
// empty network namespace for its gofers at <root>/null-netns (possibly more than once), which
// would keep the state dir from being removed.
func (r *ociRuntime) close() {
	if r.gvisor() {
		for unix.Unmount(filepath.Join(r.root, "null-netns"), unix.MNT_DETACH) == nil {
		}
	}
}
