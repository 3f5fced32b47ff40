// Package egressctl is the control channel of an egress gateway (package egress) that runs beside
// its sandbox instead of in the service: the kubernetes driver's sidecar, "sandbox-agent egress",
// in the sandbox's pod. The driver sets the sandbox's policy (SetPolicy) and takes the gateway's
// decisions (Drain) over TCP; every connection is first authenticated by the mutual HMAC
// challenge of package agent (auth.go) on a secret of the gateway's own — not the agent's, which
// the sandbox's code can read — then carries one JSON request line and one JSON answer line.
//
// Guarantees of the server (Serve):
//   - Until a policy is set the gateway it drives enforces "block everything" (the caller attaches
//     it so); a policy set is kept in a file (Server.StateFile: an emptyDir of the sidecar alone)
//     so that a restarted gateway enforces it again at once, never an older one.
//   - Decisions wait in a bounded buffer (Recorder) until drained; past its size they are counted,
//     not kept, and the next Drain says how many were lost. A restart of the gateway loses what it
//     had not handed over: Drain answers with the gateway's boot ID, so the driver tells.
//   - Connections that Admit refuses (the kubernetes sidecar: any from the pod itself) get no
//     answer; at most maxConns are served at once, each within connTimeout.
package egressctl

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/egress"
)

// Limits of the channel.
const (
	maxRequest  = 1 << 20 // bytes of one request line
	maxConns    = 8
	connTimeout = 30 * time.Second
	// RecorderSize is how many decisions a gateway keeps between two drains.
	RecorderSize = 4096
)

// ErrRefused is wrapped by the errors of a request the gateway answered with an error (a bad
// policy), as opposed to one that did not reach it.
var ErrRefused = errors.New("refused by the gateway")

// request is one line a client sends after the challenge.
type request struct {
	Op            string   `json:"op"` // "policy" or "drain"
	BlockOutbound bool     `json:"block_outbound,omitempty"`
	Allow         []string `json:"allow,omitempty"` // egress.Rule.String of each rule
}

// answer is the server's line.
type answer struct {
	Error     string            `json:"error,omitempty"`
	Boot      string            `json:"boot"` // the gateway process's random ID
	Decisions []egress.Decision `json:"decisions,omitempty"`
	Dropped   int               `json:"dropped,omitempty"`
}

// Recorder keeps a gateway's decisions until they are drained: at most RecorderSize, counting
// the ones past that. Its Record is an egress.Config.OnDecision.
type Recorder struct {
	mu      sync.Mutex
	buf     []egress.Decision
	dropped int
}

// Record keeps d, or counts it if the buffer is full. It never blocks for long.
func (r *Recorder) Record(d egress.Decision) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.buf) >= RecorderSize {
		r.dropped++
		return
	}
	r.buf = append(r.buf, d)
}

func (r *Recorder) take() ([]egress.Decision, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b, n := r.buf, r.dropped
	r.buf, r.dropped = nil, 0
	return b, n
}

// Server serves the control channel of one gateway.
type Server struct {
	Secret    []byte                        // the gateway's secret (at least agent.SecretBytes)
	SetPolicy func(p egress.Policy) error   // applies a policy to the gateway
	Recorder  *Recorder                     // where the gateway's decisions wait
	StateFile string                        // where the policy set last is kept ("": nowhere)
	Admit     func(c net.Conn) error        // refuses a connection before the challenge (nil: none)
	Log       func(msg string, args ...any) // nil: nothing is logged

	bootOnce sync.Once
	boot     string
}

// Boot returns the server's boot ID: random, one per process.
func (s *Server) Boot() string {
	s.bootOnce.Do(func() {
		b := make([]byte, 8)
		rand.Read(b)
		s.boot = hex.EncodeToString(b)
	})
	return s.boot
}

// Restore applies the policy StateFile holds, if any (a gateway that restarted): false if there
// is none.
func (s *Server) Restore() (bool, error) {
	if s.StateFile == "" {
		return false, nil
	}
	b, err := os.ReadFile(s.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var req request
	if err := json.Unmarshal(b, &req); err != nil {
		return false, fmt.Errorf("%s: %w", s.StateFile, err)
	}
	p, err := egress.ParsePolicy(req.BlockOutbound, req.Allow)
	if err != nil {
		return false, fmt.Errorf("%s: %w", s.StateFile, err)
	}
	return true, s.SetPolicy(p)
}

// Serve serves ln until it is closed or ctx ends; it waits for the connections it started.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if len(s.Secret) < agent.SecretBytes {
		return fmt.Errorf("egressctl: the secret is %d bytes, want at least %d", len(s.Secret), agent.SecretBytes)
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	slots := make(chan struct{}, maxConns)
	var wg sync.WaitGroup
	defer wg.Wait()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if s.Admit != nil { // before a slot: refused peers cannot crowd out the driver
			if err := s.Admit(c); err != nil {
				c.Close()
				if s.Log != nil {
					s.Log("control connection refused", "remote", c.RemoteAddr().String(), "err", err)
				}
				continue
			}
		}
		select {
		case slots <- struct{}{}:
		default:
			c.Close() // too many at once: the driver retries
			continue
		}
		wg.Go(func() {
			defer func() { <-slots }()
			defer c.Close()
			if err := s.serve(c); err != nil && s.Log != nil {
				s.Log("control connection", "remote", c.RemoteAddr().String(), "err", err)
			}
		})
	}
}

func (s *Server) serve(c net.Conn) error {
	c.SetDeadline(time.Now().Add(connTimeout))
	br := bufio.NewReaderSize(c, 4096)
	if err := agent.AgentAuth(c, br, s.Secret); err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(connTimeout)) // AgentAuth clears it
	line, err := agent.ReadLine(br, maxRequest)
	if err != nil {
		return fmt.Errorf("reading the request: %w", err)
	}
	var req request
	a := answer{Boot: s.Boot()}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	switch err := dec.Decode(&req); {
	case err != nil:
		a.Error = "malformed request: " + err.Error()
	case req.Op == "policy":
		if err := s.setPolicy(req); err != nil {
			a.Error = err.Error()
		}
	case req.Op == "drain":
		a.Decisions, a.Dropped = s.Recorder.take()
	default:
		a.Error = fmt.Sprintf("unknown op %q", req.Op)
	}
	b, _ := json.Marshal(a)
	_, err = c.Write(append(b, '\n'))
	return err
}

// setPolicy parses, keeps and applies a policy: kept first, so that a gateway restarting at any
// moment afterwards enforces it, never the one before.
func (s *Server) setPolicy(req request) error {
	p, err := egress.ParsePolicy(req.BlockOutbound, req.Allow)
	if err != nil {
		return err
	}
	if s.StateFile != "" {
		b, _ := json.Marshal(request{Op: "policy", BlockOutbound: req.BlockOutbound, Allow: req.Allow})
		tmp := s.StateFile + ".tmp"
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			return fmt.Errorf("keeping the policy: %w", err)
		}
		if err := os.Rename(tmp, s.StateFile); err != nil {
			return fmt.Errorf("keeping the policy: %w", err)
		}
		_ = syncDir(filepath.Dir(s.StateFile))
	}
	return s.SetPolicy(p)
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Client reaches one gateway's control channel.
type Client struct {
	Addr   string // host:port
	Secret []byte
}

// SetPolicy makes the gateway enforce p from its next decision on. It returns the gateway's boot ID.
func (c Client) SetPolicy(ctx context.Context, p egress.Policy) (boot string, err error) {
	req := request{Op: "policy", BlockOutbound: p.BlockOutbound}
	for _, r := range p.Rules {
		req.Allow = append(req.Allow, r.String())
	}
	a, err := c.call(ctx, req)
	return a.Boot, err
}

// Drain takes the decisions the gateway holds, how many it could not keep, and its boot ID.
func (c Client) Drain(ctx context.Context) (ds []egress.Decision, dropped int, boot string, err error) {
	a, err := c.call(ctx, request{Op: "drain"})
	return a.Decisions, a.Dropped, a.Boot, err
}

func (c Client) call(ctx context.Context, req request) (answer, error) {
	conn, err := agent.TCPDial(c.Addr, c.Secret)(ctx)
	if err != nil {
		return answer{}, fmt.Errorf("egress gateway %s: %w", c.Addr, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	conn.SetDeadline(time.Now().Add(connTimeout))
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return answer{}, fmt.Errorf("egress gateway %s: %w", c.Addr, err)
	}
	// An answer holds at most RecorderSize decisions: bounded.
	line, err := agent.ReadLine(bufio.NewReader(conn), 64<<20)
	if err != nil {
		return answer{}, fmt.Errorf("egress gateway %s: reading the answer: %w", c.Addr, errors.Join(err, ctx.Err()))
	}
	var a answer
	if err := json.Unmarshal(line, &a); err != nil {
		return answer{}, fmt.Errorf("egress gateway %s: malformed answer: %w", c.Addr, err)
	}
	if a.Error != "" {
		return a, fmt.Errorf("egress gateway %s: %w: %s", c.Addr, ErrRefused, a.Error)
	}
	return a, nil
}
