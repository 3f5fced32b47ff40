package agent_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// TestAuth: the challenge passes only when both sides hold the same secret, and each side
// detects a peer that does not.
func TestAuth(t *testing.T) {
	secret := agent.MakeSecret()
	for _, tc := range []struct {
		name              string
		hostKey, agentKey []byte
		ok                bool
	}{
		{"same secret", secret, secret, true},
		{"the agent is an impostor", secret, agent.MakeSecret(), false},
		{"the host is an impostor", agent.MakeSecret(), secret, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, a := net.Pipe()
			defer h.Close()
			defer a.Close()
			agentErr := make(chan error, 1)
			go func() {
				err := agent.AgentAuth(a, bufio.NewReader(a), tc.agentKey)
				if err != nil {
					a.Close() // what the agent does: the host's read ends
				}
				agentErr <- err
			}()
			hostErr := agent.HostAuth(h, tc.hostKey)
			if hostErr != nil {
				h.Close()
			}
			aErr := <-agentErr
			if tc.ok && (hostErr != nil || aErr != nil) {
				t.Fatalf("host: %v, agent: %v; want both to pass", hostErr, aErr)
			}
			if !tc.ok && (hostErr == nil && aErr == nil) {
				t.Fatal("both passed with different secrets")
			}
			if !tc.ok && !errors.Is(hostErr, agent.ErrAuth) && !errors.Is(aErr, agent.ErrAuth) {
				t.Fatalf("host: %v, agent: %v; want one to be ErrAuth", hostErr, aErr)
			}
		})
	}
}

// TestTCPRefusesOwnAddress: in TCP mode the agent refuses a connection from its own network
// namespace even with the right secret — what code in a pod, which can read the secret file,
// would try (here the host is the agent's namespace: loopback).
func TestTCPRefusesOwnAddress(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	file := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(file, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(agentBin, "--python", python, "--listen", addr, "--secret-file", file, "--prestart", "0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitfor.True(t, time.Minute, func() bool { // the agent listens
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := agent.RunDial(ctx, agent.TCPDial(addr, secret), agent.RunRequest{Code: "print(1)", TimeoutMS: 5000}, nil, nil); err == nil {
		t.Fatal("a run from the agent's own address was served")
	}
}
