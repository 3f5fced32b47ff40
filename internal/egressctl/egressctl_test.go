package egressctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"reflect"
	"sync"
	"testing"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/egress"
)

type fakeGateway struct {
	mu  sync.Mutex
	set []egress.Policy
}

func (g *fakeGateway) SetPolicy(p egress.Policy) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.set = append(g.set, p)
	return nil
}

func (g *fakeGateway) policies() []egress.Policy {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]egress.Policy(nil), g.set...)
}

// serve starts srv on a loopback listener for the test's duration.
func serve(t *testing.T, srv *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return ln.Addr().String()
}

func secret() []byte { return []byte(fmt.Sprintf("%x", agent.MakeSecret())) }

func TestPolicyAndDrain(t *testing.T) {
	g := &fakeGateway{}
	rec := &Recorder{}
	key := secret()
	state := filepath.Join(t.TempDir(), "policy.json")
	srv := &Server{Secret: key, SetPolicy: g.SetPolicy, Recorder: rec, StateFile: state}
	c := Client{Addr: serve(t, srv), Secret: key}
	ctx := context.Background()

	want, err := egress.ParsePolicy(true, []string{"api.company.com:443", "*.example.org", "203.0.113.0/24:8080", "[2001:db8::1]:22", "198.51.100.7"})
	if err != nil {
		t.Fatal(err)
	}
	boot, err := c.SetPolicy(ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	if boot != srv.Boot() || boot == "" {
		t.Errorf("boot %q, want %q", boot, srv.Boot())
	}
	if got := g.policies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("the gateway got %+v, want %+v", got, want)
	}

	// A restarted gateway enforces the kept policy at once.
	g2 := &fakeGateway{}
	ok, err := (&Server{Secret: key, SetPolicy: g2.SetPolicy, Recorder: &Recorder{}, StateFile: state}).Restore()
	if err != nil || !ok {
		t.Fatalf("restore: %v %v", ok, err)
	}
	if got := g2.policies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("restored %+v, want %+v", got, want)
	}

	// Decisions: bounded, the excess counted, each handed over once.
	for i := range RecorderSize + 5 {
		rec.Record(egress.Decision{SandboxID: "pod", Host: "h", Port: uint16(i), Proto: "tcp", Reason: "no"})
	}
	ds, dropped, _, err := c.Drain(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != RecorderSize || dropped != 5 || ds[7].Port != 7 || ds[7].Reason != "no" {
		t.Errorf("drain: %d decisions, %d dropped; want %d and 5", len(ds), dropped, RecorderSize)
	}
	if ds, dropped, _, err := c.Drain(ctx); err != nil || len(ds) != 0 || dropped != 0 {
		t.Errorf("second drain: %d, %d, %v", len(ds), dropped, err)
	}
}

// What a peer without the secret, or one that Admit refuses, can do: nothing.
func TestRefusals(t *testing.T) {
	g := &fakeGateway{}
	rec := &Recorder{}
	rec.Record(egress.Decision{Host: "secret.example"})
	key := secret()
	refuse := false
	var mu sync.Mutex
	srv := &Server{Secret: key, SetPolicy: g.SetPolicy, Recorder: rec, Admit: func(net.Conn) error {
		mu.Lock()
		defer mu.Unlock()
		if refuse {
			return errors.New("from inside")
		}
		return nil
	}}
	addr := serve(t, srv)
	ctx := context.Background()
	open, _ := egress.ParsePolicy(false, nil)

	if _, err := (Client{Addr: addr, Secret: secret()}).SetPolicy(ctx, open); !errors.Is(err, agent.ErrAuth) {
		t.Errorf("wrong secret: %v, want ErrAuth", err)
	}
	if _, _, _, err := (Client{Addr: addr, Secret: secret()}).Drain(ctx); !errors.Is(err, agent.ErrAuth) {
		t.Errorf("wrong secret, drain: %v, want ErrAuth", err)
	}
	// A peer that skips the challenge and sends a request gets nothing.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, `{"op":"policy","block_outbound":false}`+"\n")
	line, _ := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if line != "" {
		t.Errorf("a request without the challenge got %q", line)
	}
	mu.Lock()
	refuse = true
	mu.Unlock()
	if _, err := (Client{Addr: addr, Secret: key}).SetPolicy(ctx, open); err == nil {
		t.Error("a refused connection set a policy")
	}
	if got := g.policies(); len(got) != 0 {
		t.Errorf("policies set by refused peers: %+v", got)
	}
	mu.Lock()
	refuse = false
	mu.Unlock()
	// The decision is still there for the driver.
	if ds, _, _, err := (Client{Addr: addr, Secret: key}).Drain(ctx); err != nil || len(ds) != 1 || ds[0].Host != "secret.example" {
		t.Errorf("drain: %+v %v", ds, err)
	}
}

func TestBadRequests(t *testing.T) {
	key := secret()
	g := &fakeGateway{}
	addr := serve(t, &Server{Secret: key, SetPolicy: g.SetPolicy, Recorder: &Recorder{}})
	c := Client{Addr: addr, Secret: key}
	ctx := context.Background()
	for _, req := range []request{{Op: "nope"}, {Op: "policy", Allow: []string{"bad host name!"}}} {
		if _, err := c.call(ctx, req); !errors.Is(err, ErrRefused) {
			t.Errorf("%+v: %v, want ErrRefused", req, err)
		}
	}
	if got := g.policies(); len(got) != 0 {
		t.Errorf("policies set by bad requests: %+v", got)
	}
	if err := (&Server{Secret: []byte("short")}).Serve(ctx, nil); err == nil {
		t.Error("a short secret was accepted")
	}
}
