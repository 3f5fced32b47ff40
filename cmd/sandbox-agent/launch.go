package main

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// The launcher: "sandbox-agent launch <allow-spawn 0|1> <program> <argv0> <args…>", started by the
// agent with these descriptors:
//
//	0 stdin (/dev/null)  1 stdout  2 stderr  3 code  4 result   (all passed on to Python)
//	5 status: close-on-exec here; if anything fails before the exec succeeds, the launcher writes
//	  the reason to it and exits with launchFailed.
//	6 the run's agent channel (pyrunner.AgentFD), passed on to Python
//	7 (the first run process only) where Python writes the compiled runner (see bootstrap)
//
// The environment and working directory are already the ones Python gets.
// launcherGOMAXPROCS is in the launcher's environment: one P is all it needs, and the Go runtime
// starts faster with one (0.4 ms less CPU per run). It does not reach Python.
const launcherGOMAXPROCS = "GOMAXPROCS=1"

const (
	launchCommand = "launch"
	statusFD      = 5
	launchFailed  = 127
)

func launch(args []string) {
	runtime.LockOSThread() // prctl(PR_SET_NO_NEW_PRIVS) is per thread; keep it the seccomp thread
	unix.CloseOnExec(statusFD)
	fail := func(format string, a ...any) {
		msg := fmt.Sprintf(format, a...)
		if _, err := unix.Write(statusFD, []byte(msg)); err != nil {
			fmt.Fprintln(os.Stderr, "sandbox-agent launch:", msg)
		}
		os.Exit(launchFailed)
	}
	if len(args) < 3 || (args[0] != "0" && args[0] != "1") {
		fail("usage: sandbox-agent launch 0|1 PROGRAM ARGV0 [ARG…]")
	}
	allowSpawn, program, argv := args[0] == "1", args[1], args[2:]

	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		fail("setrlimit(RLIMIT_CORE): %v", err)
	}
	// At the memory limit the kernel's OOM killer must pick the run, never the agent (PID 1: its
	// death ends the sandbox). Raising one's own score needs no privilege; children inherit it.
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("1000"), 0); err != nil {
		fail("oom_score_adj: %v", err)
	}
	if !allowSpawn {
		if err := installNoSpawnFilter(); err != nil {
			fail("seccomp: %v", err)
		}
	}
	os.Unsetenv("GOMAXPROCS")
	err := syscall.Exec(program, argv, os.Environ())
	fail("exec %s: %v", program, err)
}

// noSpawnProgram is the BPF program for allow_spawn=false:
//
//	foreign architecture (e.g. i386 int 0x80 on x86_64), x32 ABI → ENOSYS
//	clone3                      → ENOSYS (glibc then falls back to clone)
//	clone without CLONE_THREAD  → EPERM  (threads are clone with CLONE_THREAD: allowed)
//	fork, vfork (x86_64)        → EPERM
//	everything else             → allow
func noSpawnProgram() ([]bpf.Instruction, error) {
	info, err := arch.GetInfo("")
	if err != nil {
		return nil, err
	}
	if info.ID != arch.X86_64.ID && info.ID != arch.AARCH64.ID {
		return nil, fmt.Errorf("unsupported architecture %s", info.Name)
	}
	var forks []string
	for _, name := range []string{"fork", "vfork"} { // aarch64 has neither
		if _, ok := info.SyscallNames[name]; ok {
			forks = append(forks, name)
		}
	}
	policy := seccomp.Policy{
		DefaultAction: seccomp.ActionAllow,
		Syscalls: []seccomp.SyscallGroup{
			{
				Action: seccomp.ActionErrno | seccomp.Action(unix.ENOSYS),
				Names:  []string{"clone3"},
			},
			{
				Action: seccomp.ActionErrno | seccomp.Action(unix.EPERM),
				Names:  forks,
				NamesWithCondtions: []seccomp.NameWithConditions{{
					Name: "clone",
					Conditions: seccomp.ArgumentConditions{{
						Argument: 0, Operation: seccomp.BitsNotSet, Value: unix.CLONE_THREAD,
					}},
				}},
			},
		},
	}
	prog, err := policy.Assemble()
	if err != nil {
		return nil, err
	}
	// The library sends a foreign architecture to the default action (allow); refuse it first.
	return append([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 4, Size: 4}, // seccomp_data.arch
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(info.ID), SkipTrue: 1},
		bpf.RetConstant{Val: uint32(seccomp.ActionErrno) | uint32(unix.ENOSYS)},
	}, prog...), nil
}

// installNoSpawnFilter sets no_new_privs and installs noSpawnProgram on every thread (TSYNC).
func installNoSpawnFilter() error {
	insts, err := noSpawnProgram()
	if err != nil {
		return err
	}
	raw, err := bpf.Assemble(insts)
	if err != nil {
		return err
	}
	return installFilter(rawFilter(agent.FilterBytes(raw)))
}
