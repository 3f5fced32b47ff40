package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// The agent's channel under gVisor (runsc). A listening socket cannot be handed into a gVisor
// sandbox: runsc imports a host socket descriptor as a connected endpoint, on which accept fails.
// What it can import is a connected socket, and a descriptor received over it (SCM_RIGHTS) becomes
// a host socket of the sandbox too. So the driver hands the agent one end of a socketpair
// (agent.ListenFD, connected: the broker socket) and gives the other end to a small process on the
// host, "sandbox-agent broker", which holds the listening socket bound at the sandbox's agent.sock
// (as crun's agents do) and passes each connection it accepts over the broker socket. The agent
// accepts by receiving them. The host's side (clients dialling agent.sock) is unchanged, and so is
// the rule that the channel is a descriptor handed in, not a path in the sandbox.

// brokerCommand is the first argument that makes sandbox-agent the host-side broker.
const brokerCommand = "broker"

// brokerListener accepts the connections the host's broker passes over the socket sock.
type brokerListener struct{ sock *net.UnixConn }

// Accept waits for the next connection (a *net.UnixConn). An error is final: the broker socket is
// closed or broken (the host is gone).
func (l *brokerListener) Accept() (net.Conn, error) {
	for {
		buf := make([]byte, 1)
		oob := make([]byte, unix.CmsgSpace(4))
		n, oobn, _, _, err := l.sock.ReadMsgUnix(buf, oob)
		if err != nil {
			return nil, fmt.Errorf("broker socket: %w", err)
		}
		if n == 0 && oobn == 0 {
			return nil, fmt.Errorf("broker socket: %w", io.EOF)
		}
		fds, err := receivedFDs(oob[:oobn])
		if err != nil {
			return nil, fmt.Errorf("broker socket: %w", err)
		}
		if len(fds) != 1 {
			for _, fd := range fds {
				unix.Close(fd)
			}
			continue // nothing usable; wait for the next
		}
		f := os.NewFile(uintptr(fds[0]), "agent connection")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			continue
		}
		if uc, ok := c.(*net.UnixConn); ok {
			return uc, nil
		}
		c.Close()
	}
}

// receivedFDs returns the descriptors of the SCM_RIGHTS messages in oob.
func receivedFDs(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_RIGHTS {
			f, err := unix.ParseUnixRights(&m)
			if err != nil {
				return fds, err
			}
			fds = append(fds, f...)
		}
	}
	return fds, nil
}

// isListening reports whether socket descriptor fd is listening.
func isListening(fd int) (bool, error) {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	return v == 1, err
}

// brokerMain is the host-side broker: it accepts on the listening socket agent.ListenFD and passes
// each connection over the broker socket agent.BrokerFD to the agent in the sandbox, until the
// sandbox's end closes (the sandbox is gone); then it exits. It runs as the sandbox's first host
// id, without capabilities, in the sandbox's cgroups (the driver puts it there).
func brokerMain(args []string) {
	log := newLogger("broker")
	if len(args) != 0 {
		fmt.Fprintf(os.Stderr, "usage: sandbox-agent broker (listening socket on fd %d, broker socket on fd %d)\n", agent.ListenFD, agent.BrokerFD)
		os.Exit(2)
	}
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	if err := runBroker(); err != nil {
		log.Error("broker", "err", err)
		os.Exit(1)
	}
}

func runBroker() error {
	lf := os.NewFile(agent.ListenFD, "agent socket")
	bf := os.NewFile(agent.BrokerFD, "broker socket")
	if lf == nil || bf == nil {
		return fmt.Errorf("want the listening socket on fd %d and the broker socket on fd %d", agent.ListenFD, agent.BrokerFD)
	}
	ln, err := unixListenerOf(lf)
	if err != nil {
		return fmt.Errorf("fd %d: %w", agent.ListenFD, err)
	}
	sock, err := unixConnOf(bf)
	if err != nil {
		return fmt.Errorf("fd %d: %w", agent.BrokerFD, err)
	}
	// The agent never writes: a read that returns is the sandbox's end closing.
	go func() {
		var b [64]byte
		for {
			if _, err := sock.Read(b[:]); err != nil {
				os.Exit(0)
			}
		}
	}()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			continue
		}
		err = passConn(sock, conn)
		conn.Close()
		if err != nil {
			return fmt.Errorf("pass a connection to the agent: %w", err)
		}
	}
}

// passConn sends conn's descriptor over sock with one byte of data.
func passConn(sock, conn *net.UnixConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		_, _, serr = sock.WriteMsgUnix([]byte{'c'}, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return err
	}
	return serr
}

// unixListenerOf makes f, which it closes, a listening unix socket.
func unixListenerOf(f *os.File) (*net.UnixListener, error) {
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	ln, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, errors.New("not a unix socket")
	}
	return ln, nil
}

// unixConnOf makes f, which it closes, a connected unix socket.
func unixConnOf(f *os.File) (*net.UnixConn, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, errors.New("not a unix socket")
	}
	return uc, nil
}
