package container

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// startBroker starts sandbox b's agent broker, "sandbox-agent broker" on the host (see
// cmd/sandbox-agent/broker.go): runsc cannot hand a listening socket into gVisor, so the broker
// holds ln (the agent's socket, bound at agent.sock) and passes each connection it accepts to the
// agent over a socketpair, whose other end startBroker returns for the agent (runsc --pass-fd).
// The broker runs as the sandbox's first host id (no capabilities), in a session of its own, with
// its output in the sandbox's log (logw); start moves it into the sandbox's cgroups once runsc
// has made them. It exits when the sandbox's end of the socketpair closes.
func (d *Driver) startBroker(b *box, ln *os.File, ids uint32, logw *os.File) (*os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("broker: socketpair: %w", err)
	}
	host, guest := os.NewFile(uintptr(fds[0]), "broker socket"), os.NewFile(uintptr(fds[1]), "agent's broker socket")
	defer host.Close()
	cmd := exec.Command(d.agentBin, "broker")
	cmd.Env = []string{}
	cmd.Stdout, cmd.Stderr = logw, logw
	cmd.ExtraFiles = []*os.File{ln, host} // agent.ListenFD, agent.BrokerFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: &syscall.Credential{Uid: ids, Gid: ids}}
	if err := cmd.Start(); err != nil {
		guest.Close()
		return nil, fmt.Errorf("broker: %w", err)
	}
	b.Broker = cmd.Process.Pid
	b.broker = cmd.Process
	go cmd.Wait() //nolint:errcheck // reaps it; it ends with the sandbox
	return guest, nil
}
