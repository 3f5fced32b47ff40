// Command sandbox-agent runs inside every container sandbox, normally as its PID 1, as an
// unprivileged user. It serves the unix socket the host bound and passed it as descriptor 3 (see
// package internal/agent for the protocol; the agent never creates a socket, so nothing in the
// sandbox can reach, remove or replace it) and executes each run as a fresh Python process.
//
//	sandbox-agent [--python PATH] [--prestart 0|1]
//	sandbox-agent --listen ADDR --secret-file PATH --prestart 0|1 [--python PATH]   (TCP mode: tcp.go)
//	sandbox-agent install DIR [MKDIR...]                                           (tcp.go)
//	sandbox-agent files --listen ADDR --secret-file PATH --root DIR                (files.go)
//	sandbox-agent netinit PORT[,PORT...] [GATEWAY_UID]                             (netinit.go)
//	sandbox-agent egress --control ADDR --secret-file PATH …                       (egress.go)
//
// Behaviour:
//   - One run at a time. Connections are served strictly in order: a second connection made while
//     a run is in progress waits (in the listen backlog) until the run has ended and its processes
//     are gone, then it is served. A connection closed before it sends a request line is dropped
//     silently; a ping (agent.WaitReady) is answered "ready".
//   - Each run is started through a launcher: the agent re-executes itself as
//     "sandbox-agent launch …", which sets rlimits and, unless allow_spawn, no_new_privs and a
//     seccomp filter that denies creating processes (threads still work), then execs Python with
//     the embedded runner (internal/pyrunner/runner.py).
//   - Once the sandbox's zygote (see zygote.go: a Python outside the sandbox's PID namespace,
//     started by the host) connects and says "zygote", runs are forked by it instead: same
//     descriptors, credentials, seccomp filters and working directory as a launched run, without
//     an interpreter's start-up. Its standby is forked once the run's answer is sent (the host
//     tells the zygote's children apart by their parent, so the result carries no StandbyPID). If
//     the zygote goes away the agent launches runs again.
//   - The next run's process is started ahead: as soon as a run's processes are gone (and at start
//     with --prestart, whose value is the sandbox's allow_spawn), the agent starts a launcher →
//     Python that compiles the runner and waits on fd 3 for a run's environment and code. Its PID
//     goes back with the run's result (StandbyPID) so the host does not take it for a leftover.
//     A run takes it if it was started with the same allow_spawn and output limit, else it is
//     killed and the run starts its own. Its start-up CPU counts in the run's cpu usage.
//   - When PID 1: one reaper reaps every zombie and hands the run's own exit status to the run;
//     after every run, kill(-1, SIGKILL) removes every other process of the sandbox; signals that
//     would stop a Go program (SIGTERM, SIGINT, …) are ignored, so code in the sandbox cannot stop
//     the agent (the host stops a sandbox with SIGKILL); connections from processes inside the
//     sandbox (a peer pid visible in the agent's pid namespace) are refused. The agent is made
//     non-dumpable, so same-uid code cannot ptrace it or read its memory.
//   - When not PID 1 (tests on a host): the agent never uses kill(-1); it kills the run's process
//     group, and becomes a child subreaper so orphans of a run are reaped by it.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == launchCommand {
		launch(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == zygoteCommand {
		zygoteMain(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == brokerCommand {
		brokerMain(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == installCommand {
		installMain(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == filesCommand {
		filesMain(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == netinitCommand {
		netinitMain(os.Args[2:]) // does not return
	}
	if len(os.Args) > 1 && os.Args[1] == egressCommand {
		egressMain(os.Args[2:]) // does not return
	}
	// One P: the agent serves one run at a time and mostly waits on pipes and sockets; with more,
	// each hand-off between its goroutines wakes another thread that spins looking for work —
	// measured at a third of the agent's CPU per print(1) run (1.3–1.8 ms against 2.3–2.5 ms on
	// the 2-core VM). Timers (a run's deadline) and preemption do not need a second P.
	runtime.GOMAXPROCS(1)
	log := newLogger("agent")
	python := flag.String("python", "/usr/bin/python3", "the Python interpreter")
	prestart := flag.String("prestart", "", "start the first run's process at once: 0 (allow_spawn false) or 1 (true)")
	listen := flag.String("listen", "", "TCP mode (tcp.go): serve authenticated connections at this address instead of fd 3")
	secretFile := flag.String("secret-file", "", "TCP mode: the file of the sandbox's secret")
	flag.Parse()
	if flag.NArg() != 0 || (*prestart != "" && *prestart != "0" && *prestart != "1") ||
		(*listen != "") != (*secretFile != "") || (*listen != "" && *prestart == "") {
		fmt.Fprintf(os.Stderr, "usage: sandbox-agent [--python PATH] [--prestart 0|1] (its listening socket on fd 3)\n"+
			"       sandbox-agent --listen ADDR --secret-file PATH --prestart 0|1 [--python PATH]\n")
		os.Exit(2)
	}
	var tcp *tcpMode
	if *listen != "" {
		tcp = &tcpMode{addr: *listen, secretFile: *secretFile, spawn: *prestart == "1"}
	}

	// Same-uid code in the sandbox must not ptrace the agent or read /proc/<agent>/mem.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		log.Warn("prctl(PR_SET_DUMPABLE, 0)", "err", err)
	}
	reserveThreads(16)
	a, err := newAgent(*python, log, tcp)
	if err != nil {
		log.Error("cannot serve", "err", err)
		os.Exit(1)
	}
	if *prestart != "" {
		a.prestart(*prestart == "1", agent.DefaultMaxOutput)
	}
	a.serve()
}

// newLogger returns the logger of one role of the agent ("agent", "zygote"): text records on
// stderr (the container's output, which the driver keeps in agent.log; a zygote's zygote.log),
// each with the attribute "role". The launcher logs nothing: its stderr is the run's.
func newLogger(role string) *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("role", role)
}

// reserveThreads makes the Go runtime start n OS threads now and keep them idle for later. Under a
// fork bomb the sandbox's pids limit (which counts threads) leaves no room for a new thread, and a
// Go program that cannot get one when it needs one dies: the agent must have them beforehand to
// outlive the bomb and kill it. (The runtime parks unlocked threads instead of ending them.)
func reserveThreads(n int) {
	var started, release sync.WaitGroup
	started.Add(n)
	release.Add(1)
	for range n {
		go func() {
			runtime.LockOSThread()
			started.Done()
			release.Wait()
			runtime.UnlockOSThread()
		}()
	}
	started.Wait()
	release.Done()
}
