package egress

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// recorder collects decisions.
type recorder struct {
	mu sync.Mutex
	ds []Decision
}

func (r *recorder) add(d Decision) {
	r.mu.Lock()
	r.ds = append(r.ds, d)
	r.mu.Unlock()
}

func (r *recorder) all() []Decision {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ds)
}

func (r *recorder) count(f func(Decision) bool) int {
	n := 0
	for _, d := range r.all() {
		if f(d) {
			n++
		}
	}
	return n
}

// wait returns the first decision f accepts, waiting up to 5 s for it.
func (r *recorder) wait(t *testing.T, what string, f func(Decision) bool) Decision {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, d := range r.all() {
			if f(d) {
				return d
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no decision %s among %+v", what, r.all())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeNet is the tests' internet: upstream IP:ports mapped to real listeners on loopback. The
// gateway's dials of anything else fail with "connection refused" (and never leave the host).
type fakeNet struct {
	mu     sync.Mutex
	routes map[netip.AddrPort]string
	dials  []netip.AddrPort
}

func (f *fakeNet) route(ap string, real string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.routes == nil {
		f.routes = map[netip.AddrPort]string{}
	}
	f.routes[netip.MustParseAddrPort(ap)] = real
}

func (f *fakeNet) dial(ctx context.Context, network, address string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(address)
	if err != nil || network != "tcp" {
		return nil, fmt.Errorf("fakeNet: the gateway dialled %s %q, not a literal IP:port", network, address)
	}
	f.mu.Lock()
	f.dials = append(f.dials, ap)
	real, ok := f.routes[ap]
	f.mu.Unlock()
	if !ok {
		return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", real)
}

func (f *fakeNet) dialled(a netip.Addr) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.dials, func(x netip.AddrPort) bool { return x.Addr() == a })
}

// upstream servers: "api" and "evil", over HTTP and HTTPS, and a TCP echo server.
type upstreams struct {
	apiHTTP, apiTLS, evilHTTP, evilTLS *httptest.Server
	echo                               string
}

// named answers "<name> <host> <path>" and, for /headers, the request's headers; for POST, the
// body it got.
func named(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/upgrade" && r.Header.Get("Upgrade") == "echo":
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n" + name + ":")
			brw.Flush()
			io.Copy(c, brw)
		case r.URL.Path == "/early":
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			fmt.Fprintf(w, "%s after hints", name)
		case r.URL.Path == "/headers":
			r.Header.Write(w)
		case r.Method == http.MethodPost:
			b, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s got %d bytes: %s", name, len(b), b)
		default:
			fmt.Fprintf(w, "%s %s %s", name, r.Host, r.URL.Path)
		}
	})
}

func startUpstreams(t *testing.T) *upstreams {
	t.Helper()
	u := &upstreams{
		apiHTTP: httptest.NewServer(named("api")), apiTLS: httptest.NewTLSServer(named("api")),
		evilHTTP: httptest.NewServer(named("evil")), evilTLS: httptest.NewTLSServer(named("evil")),
	}
	t.Cleanup(func() {
		for _, s := range []*httptest.Server{u.apiHTTP, u.apiTLS, u.evilHTTP, u.evilTLS} {
			s.CloseClientConnections()
			s.Close()
		}
	})
	u.echo = startEcho(t)
	return u
}

func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				io.Copy(c, c)
				c.Close()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func hostOf(s *httptest.Server) string {
	return strings.TrimPrefix(strings.TrimPrefix(s.URL, "http://"), "https://")
}

// testResolver stands in for the internet's DNS.
var testResolver = StaticResolver{
	"api.company.com":      {addr("198.51.100.10"), addr("2001:db8::10")},
	"evil.example":         {addr("203.0.113.66")},
	"x.svc.company.com":    {addr("198.51.100.12")},
	"internal.company.com": {addr("10.1.2.3")},
	"loop.company.com":     {addr("127.0.0.1")},
	"mixed.company.com":    {addr("127.0.0.1"), addr("198.51.100.11")},
	"db.company.com":       {addr("198.51.100.20")},
	"meta.company.com":     {addr("169.254.169.254"), addr("fd00:ec2::254")},
	"sandbox.company.com":  {addr("10.213.0.6")},
}

// testPool stands for the sandbox address pool (Config.Denied).
var testPool = pfx("10.213.0.0/16")

func (u *upstreams) routes(f *fakeNet) {
	for _, a := range []string{"198.51.100.10", "[2001:db8::10]", "198.51.100.11", "198.51.100.12", "10.1.2.3"} {
		f.route(a+":80", hostOf(u.apiHTTP))
		f.route(a+":443", hostOf(u.apiTLS))
	}
	f.route("203.0.113.66:80", hostOf(u.evilHTTP))
	f.route("203.0.113.66:443", hostOf(u.evilTLS))
	f.route("198.51.100.20:5432", u.echo)
	f.route("198.51.100.30:7000", u.echo)
}

var nextListen atomic.Uint32

// env is a gateway with one sandbox attached on a loopback address of its own.
type env struct {
	t      *testing.T
	g      *Gateway
	id     string
	listen netip.Addr
	rec    *recorder
	net    *fakeNet
	up     *upstreams
	orig   sync.Map // client local port → the original destination to pretend (no NAT on loopback)
}

func newEnv(t *testing.T, block bool, allow ...string) *env {
	t.Helper()
	return newEnvConfig(t, Config{}, mustPolicy(t, block, allow...))
}

// newEnvConfig fills in what cfg leaves zero: the test resolver, the fake net, a recorder, the
// pool as Denied.
func newEnvConfig(t *testing.T, cfg Config, p Policy, tweaks ...func(*Gateway)) *env {
	t.Helper()
	e := &env{t: t, rec: &recorder{}, net: &fakeNet{}, up: startUpstreams(t), id: fmt.Sprintf("sbx_%s", t.Name())}
	e.up.routes(e.net)
	if cfg.Resolver == nil {
		cfg.Resolver = testResolver
	}
	if cfg.Dial == nil && cfg.ExemptForTests == nil {
		cfg.Dial = e.net.dial
	}
	if cfg.OnDecision == nil {
		cfg.OnDecision = e.rec.add
	}
	if cfg.Denied == nil {
		cfg.Denied = []netip.Prefix{testPool}
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 3 * time.Second
	}
	g, err := NewGateway(cfg)
	if err != nil {
		t.Fatal(err)
	}
	unprivileged(g)
	for _, f := range tweaks {
		f(g)
	}
	g.origDst = func(c *net.TCPConn) (netip.AddrPort, error) {
		if v, ok := e.orig.Load(c.RemoteAddr().(*net.TCPAddr).Port); ok {
			return v.(netip.AddrPort), nil
		}
		return netip.AddrPort{}, syscall.ENOENT
	}
	e.g = g
	n := nextListen.Add(1)
	e.listen = netip.AddrFrom4([4]byte{127, 211, byte(n >> 8), byte(n)})
	if err := g.Attach(e.id, e.listen, p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return e
}

// unprivileged moves the DNS port above 1023 when the test cannot bind port 53.
func unprivileged(g *Gateway) {
	if os.Geteuid() != 0 {
		g.ports[0] = 10053
	}
}

func (e *env) at(port uint16) string {
	switch port {
	case DNSPort:
		port = e.g.ports[0]
	}
	return netip.AddrPortFrom(e.listen, port).String()
}

func (e *env) dns(name string, qtype uint16, network string) *dns.Msg {
	e.t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Net: network, Timeout: 3 * time.Second}
	r, _, err := c.Exchange(m, e.at(DNSPort))
	if err != nil {
		e.t.Fatalf("dns %s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	return r
}

// proxyClient is a proxy-aware HTTP client using the sandbox's proxy.
func (e *env) proxyClient() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		Proxy:           http.ProxyURL(&url.URL{Scheme: "http", User: url.UserPassword("user", "secret"), Host: e.at(ProxyPort)}),
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
}

// raw sends raw bytes to a gateway port and returns the connection with a reader.
func (e *env) raw(port uint16, data string) (net.Conn, *bufio.Reader) {
	e.t.Helper()
	c, err := net.DialTimeout("tcp", e.at(port), 3*time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, data); err != nil {
		e.t.Fatal(err)
	}
	return c, bufio.NewReader(c)
}

// transparent connects to the transparent port pretending the connection was DNATed from orig.
func (e *env) transparent(orig string) net.Conn {
	e.t.Helper()
	d := net.Dialer{Timeout: 3 * time.Second}
	// Bind first so that the local port is known before the gateway accepts.
	la := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}
	d.LocalAddr = la
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0") // find a free port
		if err != nil {
			e.t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		la.Port = port
		e.orig.Store(port, netip.MustParseAddrPort(orig))
		c, err := d.Dial("tcp", e.at(TransparentPort))
		if err == nil {
			e.t.Cleanup(func() { c.Close() })
			c.SetDeadline(time.Now().Add(5 * time.Second))
			return c
		}
		if errors.Is(err, syscall.ECONNRESET) { // accepted and reset before the dial returned
			return failedConn{err}
		}
		e.orig.Delete(port)
	}
	e.t.Fatal("cannot connect to the transparent port")
	return nil
}

// failedConn is a connection that was reset while it was being made.
type failedConn struct{ err error }

func (f failedConn) Read([]byte) (int, error)         { return 0, f.err }
func (f failedConn) Write([]byte) (int, error)        { return 0, f.err }
func (f failedConn) Close() error                     { return nil }
func (f failedConn) LocalAddr() net.Addr              { return nil }
func (f failedConn) RemoteAddr() net.Addr             { return nil }
func (f failedConn) SetDeadline(time.Time) error      { return nil }
func (f failedConn) SetReadDeadline(time.Time) error  { return nil }
func (f failedConn) SetWriteDeadline(time.Time) error { return nil }

func readResponse(t *testing.T, br *bufio.Reader) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("reading a body: %v", err)
	}
	return resp, string(b)
}

// expectClosed checks that c fails (reset, or closed without data) quickly.
func expectClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n > 0 || err == nil {
		t.Fatalf("%s: the connection carried data", what)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: the connection hung instead of failing fast", what)
	}
}

// checkNoGatewayGoroutines fails if goroutines of a gateway are still running (call it after
// every gateway of the test was closed).
func checkNoGatewayGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "internal/egress.(*sandbox)") || strings.Contains(g, "miekg/dns.(*Server)") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the gateway outlived it:\n%s", len(leaked), strings.Join(leaked, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
