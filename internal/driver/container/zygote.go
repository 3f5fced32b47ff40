package container

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/pseudofs"
)

// Every sandbox gets a zygote once its agent is ready: a Python that has started once and forks
// the runs' processes (cmd/sandbox-agent/zygote.go has the whole design). It lives in the sandbox's
// namespaces and cgroups but outside its PID namespace, so code in the sandbox can neither see nor
// signal it, and it runs with the sandbox's uid, no capabilities, no_new_privs and the container's
// seccomp profile, which the driver compiles here to the BPF program it installs (crun compiles
// the same profile from config.json). A sandbox whose zygote is missing or gone still runs: the
// agent then launches each run itself.

// startZygote starts sandbox b's zygote: nsenter into every namespace of the agent (b.Pid) but
// the PID namespace (passed on fd 4), then "sandbox-agent zygote" with a connection to the agent
// on fd 5 (made here: the agent's socket is out of the sandbox's reach); it moves the process into
// each of the sandbox's cgroups and sets its oom_score_adj before it hands over the seccomp program
// on fd 3, whose end lets the zygote go on. The zygote's stdout and stderr go to zygote.log in the sandbox dir.
// sandboxd reaps it; it is killed with the sandbox (Destroy) and not with sandboxd. It reports
// whether it started one.
func (d *Driver) startZygote(b *box) (bool, error) {
	if d.nsenter == "" || d.zygoteFilter == nil {
		return false, nil
	}
	if d.runtimeOf(b).gvisor() {
		// The agent's namespaces are the Sentry's, on the host's kernel: a process entering them
		// would run outside gVisor. The agent launches every run itself.
		return false, nil
	}
	logf, err := os.OpenFile(filepath.Join(b.dir, "zygote.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return false, err
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return false, err
	}
	defer w.Close()
	pidns, err := os.Open("/proc/" + strconv.Itoa(b.Pid) + "/ns/pid")
	if err != nil {
		return false, fmt.Errorf("zygote: %w", err)
	}
	defer pidns.Close()
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socketPath(b.dir), Net: "unix"})
	if err != nil {
		return false, fmt.Errorf("zygote: connect to the agent: %w", err)
	}
	connf, err := conn.File()
	conn.Close()
	if err != nil {
		return false, fmt.Errorf("zygote: %w", err)
	}
	defer connf.Close()
	cmd := exec.Command(d.nsenter, "-t", strconv.Itoa(b.Pid), "-U", "-m", "-n", "-i", "-u", "-C", "--",
		agentPath, "zygote", strconv.Itoa(sandboxUID), strconv.Itoa(sandboxGID), strconv.Itoa(nofileLimit), sandboxPython)
	// Its environment is the one the sandbox's runs get when they ask for nothing else (the
	// agent's base and the egress proxy's variables): a forked run then keeps os.environ as it is
	// (zygote.py, _zenv).
	cmd.Env = []string{}
	for k, v := range proxyEnv(b.Gateway) {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{r, pidns, connf}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	r.Close()
	if err != nil {
		return false, fmt.Errorf("zygote: %w", err)
	}
	go cmd.Wait()
	pid := cmd.Process.Pid
	fail := func(err error) (bool, error) {
		cmd.Process.Kill()
		return false, fmt.Errorf("zygote: %w", err)
	}
	if err := d.joinCgroups(b.ID, pid); err != nil {
		return fail(err)
	}
	if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", []byte("1000"), 0); err != nil {
		return fail(err)
	}
	if _, err := w.Write(d.zygoteFilter); err != nil {
		return fail(err)
	}
	return true, nil
}

// joinCgroups moves pid into sandbox id's group in every hierarchy where the group exists (the
// runtime makes it in all of them).
func (d *Driver) joinCgroups(id string, pid int) error {
	n := 0
	for _, m := range d.cg.Mounts() {
		dir := sandboxDir(m, id)
		err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("cgroup %s: %w", dir, err)
		}
		n++
	}
	if n == 0 {
		return fmt.Errorf("sandbox %s has no cgroup", id)
	}
	return nil
}

// procStatus reads host process pid's NSpid line (its PID in each namespace, outermost first:
// one entry for a process outside every sandbox, such as a zygote) and its parent's PID; nil and 0
// if it is gone.
func procStatus(pid int) (nspid []int, ppid int) {
	b, err := pseudofs.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "PPid:"); ok {
			ppid, _ = strconv.Atoi(strings.TrimSpace(v))
		} else if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
			for _, f := range strings.Fields(v) {
				n, _ := strconv.Atoi(f)
				nspid = append(nspid, n)
			}
		}
	}
	return nspid, ppid
}

// zygoteWait bounds Warm's wait for a zygote's standby.
const zygoteWait = 5 * time.Second

// zygoteReady reports whether sandbox id has a zygote with a child (the agent forks its standby
// from the zygote as soon as the zygote has said hello).
func (d *Driver) zygoteReady(id string) bool {
	pids, err := d.cg.procs(id)
	// The agent, the zygote and its child at least: until then no process's status is read (Warm
	// polls this while the zygote starts).
	if err != nil || len(pids) < 3 {
		return false
	}
	procs, zygotes := procsOf(pids)
	for _, p := range procs {
		if zygotes[p.ppid] {
			return true
		}
	}
	return false
}

// sandboxProc is a process of a sandbox's cgroups: host PID, parent's host PID, NSpid (nil: gone).
type sandboxProc struct {
	pid, ppid int
	ns        []int
}

// sandboxProcs lists the processes of sandbox id's cgroups and the set of its zygotes (those
// outside every PID namespace below the host's).
func (d *Driver) sandboxProcs(id string) ([]sandboxProc, map[int]bool, error) {
	pids, err := d.cg.procs(id)
	if err != nil {
		return nil, nil, err
	}
	procs, zygotes := procsOf(pids)
	return procs, zygotes, nil
}

// procsOf reads the status of processes pids (host PIDs of a sandbox's cgroups): sandboxProcs.
func procsOf(pids []int) ([]sandboxProc, map[int]bool) {
	procs := make([]sandboxProc, len(pids))
	zygotes := map[int]bool{}
	for i, p := range pids {
		ns, ppid := procStatus(p)
		procs[i] = sandboxProc{pid: p, ppid: ppid, ns: ns}
		if len(ns) == 1 {
			zygotes[p] = true
		}
	}
	return procs, zygotes
}

// killZygotes SIGKILLs the processes of sandbox id's cgroup that are outside its PID namespace.
func (d *Driver) killZygotes(id string) {
	_, zygotes, _ := d.sandboxProcs(id)
	for p := range zygotes {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
}

// sandboxPython is the interpreter of every run (the agent's default).
const sandboxPython = "/usr/bin/python3"

// openZygotes finds nsenter and compiles the seccomp profile; without either, sandboxes have no
// zygote (and say why in the log).
func (d *Driver) openZygotes() {
	p, err := exec.LookPath("nsenter")
	if err != nil {
		d.log.Warn("no nsenter (util-linux): runs are started without a zygote", "err", err)
		return
	}
	// The zygote's launcher starts as root inside the sandbox's mount namespace: it must not load
	// anything from the sandbox's files (a dynamic binary would run the image's ld.so as root).
	if err := staticBinary(d.agentBin); err != nil {
		d.log.Warn("runs are started without a zygote", "err", err)
		return
	}
	f, err := seccompProgram(d.seccomp)
	if err != nil {
		d.log.Warn("runs are started without a zygote", "err", err)
		return
	}
	d.nsenter, d.zygoteFilter = p, f
}

// staticBinary checks that the ELF file at path asks for no interpreter (no dynamic loading).
func staticBinary(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (build it with CGO_ENABLED=0)", path)
		}
	}
	return nil
}

// seccompProgram compiles an OCI seccomp profile to a BPF program for this machine's architecture
// (the kernel's struct sock_filter array). Rules for syscalls this architecture does not have are
// left out; other architectures get the profile's default action, the x32 ABI ENOSYS. Supported:
// the actions allow and errno, and the comparisons Docker's profiles use (==, !=, <, <=, >, >=,
// and masked == 0).
func seccompProgram(prof *specs.LinuxSeccomp) ([]byte, error) {
	if prof == nil {
		return nil, errors.New("no seccomp profile")
	}
	info, err := arch.GetInfo("")
	if err != nil {
		return nil, err
	}
	action := func(a specs.LinuxSeccompAction, errno *uint) (seccomp.Action, error) {
		switch a {
		case specs.ActAllow:
			return seccomp.ActionAllow, nil
		case specs.ActErrno:
			e := uint(unix.EPERM)
			if errno != nil {
				e = *errno
			}
			return seccomp.ActionErrno | seccomp.Action(e), nil
		}
		return 0, fmt.Errorf("seccomp action %s is not supported", a)
	}
	def, err := action(prof.DefaultAction, prof.DefaultErrnoRet)
	if err != nil {
		return nil, err
	}
	ops := map[specs.LinuxSeccompOperator]seccomp.Operation{
		specs.OpEqualTo: seccomp.Equal, specs.OpNotEqual: seccomp.NotEqual,
		specs.OpLessThan: seccomp.LessThan, specs.OpLessEqual: seccomp.LessOrEqual,
		specs.OpGreaterThan: seccomp.GreaterThan, specs.OpGreaterEqual: seccomp.GreaterOrEqual,
	}
	// The library takes only a bare action as the default: assemble with a stand-in (an action no
	// rule here has) and put the real one in its returns.
	const standIn = seccomp.ActionKillThread
	policy := seccomp.Policy{DefaultAction: standIn}
	for _, s := range prof.Syscalls {
		act, err := action(s.Action, s.ErrnoRet)
		if err != nil {
			return nil, err
		}
		var conds seccomp.ArgumentConditions
		for _, a := range s.Args {
			c := seccomp.Condition{Argument: uint32(a.Index), Value: a.Value}
			if op, ok := ops[a.Op]; ok {
				c.Operation = op
			} else if a.Op == specs.OpMaskedEqual && a.ValueTwo == 0 {
				c.Operation = seccomp.BitsNotSet
			} else {
				return nil, fmt.Errorf("seccomp comparison %s %d %d is not supported", a.Op, a.Value, a.ValueTwo)
			}
			conds = append(conds, c)
		}
		g := seccomp.SyscallGroup{Action: act}
		for _, name := range s.Names {
			if _, ok := info.SyscallNames[name]; !ok {
				continue
			}
			if len(conds) == 0 {
				g.Names = append(g.Names, name)
			} else {
				g.NamesWithCondtions = append(g.NamesWithCondtions, seccomp.NameWithConditions{Name: name, Conditions: conds})
			}
		}
		if len(g.Names)+len(g.NamesWithCondtions) > 0 {
			policy.Syscalls = append(policy.Syscalls, g)
		}
	}
	insts, err := policy.Assemble()
	if err != nil {
		return nil, err
	}
	for i, in := range insts {
		if r, ok := in.(bpf.RetConstant); ok && r.Val == uint32(standIn) {
			insts[i] = bpf.RetConstant{Val: uint32(def)}
		}
	}
	raw, err := bpf.Assemble(insts)
	if err != nil {
		return nil, err
	}
	return agent.FilterBytes(raw), nil
}
