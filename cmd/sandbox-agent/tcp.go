package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/sandboxd/sandboxd/internal/agent"
)

// TCP mode: "sandbox-agent --listen ADDR --secret-file PATH --prestart 0|1", the agent of a pod
// (the kubernetes driver), which the host reaches over the pod network instead of a unix socket
// it handed in. What replaces the unix socket's guarantees:
//
//   - Who may connect: every connection must pass agent.AgentAuth, a mutual HMAC challenge on the
//     sandbox's secret (its own, from a per-sandbox Secret mounted at PATH), before the agent reads
//     a request. The agent answers nothing on a connection that fails it.
//   - Nothing inside the sandbox: a connection from one of the pod's own addresses (loopback, or
//     any address of its interfaces — what code in the sandbox connects from) is refused before
//     the challenge, whatever it knows. The secret file is readable by the run uid (the agent and
//     the code share it: no privilege to drop one for the other in a pod without capabilities),
//     so this check, not the secret, is what keeps the code from the agent; with the secret the
//     code can authenticate to no other sandbox's agent (each has its own secret) and, since the
//     host checks the agent's proof too, it is of no use to a pod that later gets this pod's
//     address: the host forgets the secret when it deletes the pod.
//   - allow_spawn is the sandbox's (--prestart), not a request's.
//   - No zygote: the host cannot start a process in a pod's namespaces; runs are launched.

// tcpMode is the agent's TCP listening address and secret file.
type tcpMode struct {
	addr, secretFile string
	spawn            bool
}

func (a *agentServer) listenTCP(m *tcpMode) error {
	secret, err := readSecret(m.secretFile)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", m.addr)
	if err != nil {
		return fmt.Errorf("agent TCP socket: %w", err)
	}
	a.ln, a.secret, a.tcpSpawn = ln, secret, m.spawn
	return nil
}

// readSecret reads the sandbox's secret from file.
func readSecret(file string) ([]byte, error) {
	secret, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("the sandbox's secret: %w", err)
	}
	secret = bytes.TrimSpace(secret)
	if len(secret) < agent.SecretBytes {
		return nil, fmt.Errorf("the sandbox's secret in %s is %d bytes, want at least %d", file, len(secret), agent.SecretBytes)
	}
	return secret, nil
}

// admitTCP refuses a connection from the pod itself, then runs the challenge.
func (a *agentServer) admitTCP(conn net.Conn, br *bufio.Reader) error {
	return admitTCP(conn, br, a.secret)
}

// admitTCP refuses a connection from the pod itself, then runs the challenge on secret (the
// agent's and the files sidecar's).
func admitTCP(conn net.Conn, br *bufio.Reader, secret []byte) error {
	remote, ok := conn.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return errors.New("not a TCP connection")
	}
	own, err := ownAddress(remote.IP)
	if err != nil {
		return err
	}
	if own {
		return fmt.Errorf("a connection from inside the sandbox (%s)", remote.IP)
	}
	return agent.AgentAuth(conn, br, secret)
}

// ownAddress reports whether ip is loopback or an address of one of this network namespace's
// interfaces.
func ownAddress(ip net.IP) (bool, error) {
	if ip.IsLoopback() || ip.IsUnspecified() {
		return true, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false, fmt.Errorf("interface addresses: %w", err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
			return true, nil
		}
	}
	return false, nil
}

// installCommand is "sandbox-agent install DIR [MKDIR...]": the agent image's entrypoint, run by a
// pod's init container, copies this binary to DIR/sandbox-agent (an emptyDir the sandbox's
// container mounts read-only and runs the agent from), makes DIR/blocked (mode 000: what covers
// blocked directories; empty but for the kubelet's /etc mount points) and creates the directories MKDIR and their
// parents (absolute; those of the pod's disk volume that the containers mount, and the mount
// points in them, made here, as the sandbox's user, before any container mounts them).
const installCommand = "install"

// kubeletEtcFiles are the files the kubelet mounts in /etc of every container.
var kubeletEtcFiles = []string{"hosts", "hostname", "resolv.conf"}

func installMain(args []string) {
	if len(args) < 1 || slices.ContainsFunc(args, func(a string) bool { return !filepath.IsAbs(a) }) {
		fmt.Fprintln(os.Stderr, "usage: sandbox-agent install DIR [MKDIR...]")
		os.Exit(2)
	}
	err := install(args[0])
	if err == nil {
		// What covers blocked directories (the kubernetes driver's): empty, mode 000 — but for the
		// mount points of the files the kubelet mounts in /etc of every container (a blocked /etc
		// is this directory, read-only: the runtime could not make them there), files of mode 000
		// the sandbox cannot reach either (it cannot traverse the directory, nor chmod it: the
		// mount is read-only).
		blocked := filepath.Join(args[0], "blocked")
		err = os.Mkdir(blocked, 0o700)
		for _, f := range kubeletEtcFiles {
			if err == nil {
				err = os.WriteFile(filepath.Join(blocked, f), nil, 0)
			}
		}
		if err == nil {
			err = os.Chmod(blocked, 0)
		}
	}
	for _, d := range args[1:] {
		if err == nil {
			err = os.MkdirAll(d, 0o755)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-agent install:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func install(dir string) error {
	src, err := os.Open("/proc/self/exe")
	if err != nil {
		return err
	}
	defer src.Close()
	return installFrom(src, dir)
}

// installFrom copies src to DIR/sandbox-agent through a temporary file, which it removes when the
// copy or the rename fails (a full emptyDir: nothing is left behind).
func installFrom(src io.Reader, dir string) error {
	tmp := filepath.Join(dir, ".sandbox-agent.tmp")
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o555)
	if err != nil {
		return err
	}
	_, err = io.Copy(dst, src)
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, "sandbox-agent"))
	}
	if err != nil {
		if rerr := os.Remove(tmp); rerr != nil {
			err = fmt.Errorf("%w (and removing %s: %v)", err, tmp, rerr)
		}
	}
	return err
}

// oomKills returns how many processes the kernel's OOM killer has killed in the agent's memory
// cgroup (the container's, under a cgroup namespace: cgroup v2's memory.events, v1's
// memory.oom_control), or -1 when it cannot tell.
func oomKills() int64 {
	for _, p := range []string{"/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for line := range bytes.Lines(b) {
			if v, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("oom_kill ")); ok {
				if n, err := strconv.ParseInt(string(v), 10, 64); err == nil {
					return n
				}
			}
		}
	}
	return -1
}
