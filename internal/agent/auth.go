package agent

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// The agent's TCP mode (a sandbox reached over a network, the kubernetes driver's pods): every
// connection starts with a mutual challenge on a secret of the sandbox's own, before the first
// line of the protocol above. Both sides prove they hold the secret, each over a fresh nonce of
// the other's, so neither a recorded handshake nor a pod that later gets the address of a gone
// one can pass for the agent (or the host):
//
//	host → agent: "sandboxd-agent-auth/1 " + hex(nonceH)
//	agent → host: hex(nonceA) + " " + hex(HMAC-SHA256(secret, "agent\x00" + nonceH + nonceA))
//	host → agent: hex(HMAC-SHA256(secret, "host\x00" + nonceA + nonceH))
//
// Each line ends in '\n'. A side that sees a wrong proof closes the connection; the agent answers
// nothing on a connection that failed the challenge.

// AuthHello starts the host's line of the challenge.
const AuthHello = "sandboxd-agent-auth/1"

// SecretBytes is the length of a sandbox's secret (MakeSecret).
const SecretBytes = 32

// authTimeout bounds the whole challenge on either side.
const authTimeout = 10 * time.Second

const nonceBytes = 32

// ErrAuth is wrapped by every failure of the challenge that is the other side's proof being wrong
// (not an I/O error).
var ErrAuth = errors.New("agent authentication failed")

// MakeSecret returns a new random secret.
func MakeSecret() []byte {
	b := make([]byte, SecretBytes)
	rand.Read(b)
	return b
}

func proof(secret []byte, role string, a, b []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(role + "\x00"))
	m.Write(a)
	m.Write(b)
	return m.Sum(nil)
}

// HostAuth runs the host's side of the challenge on conn, a fresh connection to an agent in TCP
// mode; on success conn speaks the agent protocol.
func HostAuth(conn net.Conn, secret []byte) error {
	conn.SetDeadline(time.Now().Add(authTimeout))
	defer conn.SetDeadline(time.Time{})
	nonceH := make([]byte, nonceBytes)
	rand.Read(nonceH)
	if _, err := fmt.Fprintf(conn, "%s %x\n", AuthHello, nonceH); err != nil {
		return fmt.Errorf("agent auth: %w", err)
	}
	// One byte at a time: nothing after the agent's line may be read ahead of the protocol.
	line, err := ReadLine(bufio.NewReaderSize(oneByte{conn}, 16), 4*nonceBytes+8)
	if err != nil {
		return fmt.Errorf("agent auth: reading the agent's proof: %w", err)
	}
	a, p, ok := strings.Cut(string(line), " ")
	nonceA, err1 := hex.DecodeString(a)
	got, err2 := hex.DecodeString(p)
	if !ok || err1 != nil || err2 != nil || len(nonceA) != nonceBytes {
		return fmt.Errorf("%w: malformed answer", ErrAuth)
	}
	if !hmac.Equal(got, proof(secret, "agent", nonceH, nonceA)) {
		return fmt.Errorf("%w: the agent does not hold the sandbox's secret", ErrAuth)
	}
	if _, err := fmt.Fprintf(conn, "%x\n", proof(secret, "host", nonceA, nonceH)); err != nil {
		return fmt.Errorf("agent auth: %w", err)
	}
	return nil
}

// AgentAuth runs the agent's side of the challenge on a connection whose reader is br; on
// success the connection's next line is the protocol's first.
func AgentAuth(conn net.Conn, br *bufio.Reader, secret []byte) error {
	conn.SetDeadline(time.Now().Add(authTimeout))
	defer conn.SetDeadline(time.Time{})
	line, err := ReadLine(br, len(AuthHello)+2*nonceBytes+2)
	if err != nil {
		return fmt.Errorf("agent auth: reading the hello: %w", err)
	}
	h, ok := strings.CutPrefix(string(line), AuthHello+" ")
	nonceH, herr := hex.DecodeString(h)
	if !ok || herr != nil || len(nonceH) != nonceBytes {
		return fmt.Errorf("%w: malformed hello", ErrAuth)
	}
	nonceA := make([]byte, nonceBytes)
	rand.Read(nonceA)
	if _, err := fmt.Fprintf(conn, "%x %x\n", nonceA, proof(secret, "agent", nonceH, nonceA)); err != nil {
		return fmt.Errorf("agent auth: %w", err)
	}
	line, err = ReadLine(br, 2*sha256.Size+1)
	if err != nil {
		return fmt.Errorf("agent auth: reading the host's proof: %w", err)
	}
	got, err := hex.DecodeString(string(line))
	if err != nil || !hmac.Equal(got, proof(secret, "host", nonceA, nonceH)) {
		return fmt.Errorf("%w: the peer does not hold the sandbox's secret", ErrAuth)
	}
	return nil
}

// oneByte reads at most one byte per Read.
type oneByte struct{ c net.Conn }

func (o oneByte) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.c.Read(p)
}

// Dial makes a connection to an agent that speaks the protocol (authenticated, in TCP mode).
type Dial func(ctx context.Context) (net.Conn, error)

// UnixDial dials the agent's unix socket at path.
func UnixDial(path string) Dial {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}

// TCPDial dials an agent in TCP mode at addr (host:port) and authenticates with secret.
func TCPDial(addr string, secret []byte) Dial {
	return func(ctx context.Context) (net.Conn, error) {
		d := net.Dialer{Timeout: 5 * time.Second} // a lost SYN is retried by the caller, not waited on for minutes
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		stop := context.AfterFunc(ctx, func() { conn.Close() })
		err = HostAuth(conn, secret)
		if !stop() {
			err = errors.Join(err, ctx.Err())
		}
		if err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
}
