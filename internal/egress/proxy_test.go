package egress

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

func TestProxyConnect(t *testing.T) {
	e := newEnv(t, true, "api.company.com:443", "loop.company.com", "198.51.100.20:5432", "db.company.com:5432")
	c := e.proxyClient()

	// Allowed: a tunnel to the address the gateway resolved, TLS end to end.
	if code, body := get(t, c, "https://api.company.com/x"); code != 200 || body != "api api.company.com /x" {
		t.Errorf("https://api.company.com/x: %d %q", code, body)
	}
	d := e.rec.wait(t, "connect allowed", func(d Decision) bool { return d.Allowed && d.Host == "api.company.com" })
	if d.Proto != "https" || d.Port != 443 || d.Addr != addr("198.51.100.10") || d.SandboxID != e.id {
		t.Errorf("allowed decision %+v", d)
	}

	// Denied: 403 with a one-line reason before any tunnel, and a decision.
	cases := []struct {
		target, why, host string
		addr              netip.Addr
		port              uint16
	}{
		{"evil.example:443", "evil.example is not on the allow list", "evil.example", netip.Addr{}, 443},
		{"api.company.com:8443", "port 8443 is not allowed for api.company.com", "api.company.com", netip.Addr{}, 8443},
		{"api.company.com", "port 443", "", netip.Addr{}, 0}, // default port 443: allowed, see below
		{"198.51.100.10:443", "198.51.100.10:443 is not on the allow list", "", addr("198.51.100.10"), 443},
		{"203.0.113.66:443", "203.0.113.66:443 is not on the allow list", "", addr("203.0.113.66"), 443},
		{"[2001:db8::10]:443", "is not on the allow list", "", addr("2001:db8::10"), 443},
		{"loop.company.com:443", "resolves only to always-denied addresses", "loop.company.com", addr("127.0.0.1"), 443},
		{"127.0.0.1:80", "loopback", "", addr("127.0.0.1"), 80},
		{"169.254.169.254:80", "link-local", "", addr("169.254.169.254"), 80},
		{"db.company.com:853", "853", "db.company.com", netip.Addr{}, 853},
		{"198.51.100.20:22", "is not on the allow list", "", addr("198.51.100.20"), 22},
	}
	for _, tc := range cases {
		if tc.port == 0 {
			continue
		}
		conn, br := e.raw(ProxyPort, fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", tc.target, tc.target))
		resp, body := readResponse(t, br)
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, tc.why) || strings.Count(body, "\n") != 1 {
			t.Errorf("CONNECT %s: %d %q, want 403 with %q", tc.target, resp.StatusCode, body, tc.why)
		}
		expectClosed(t, conn, "CONNECT "+tc.target)
		e.rec.wait(t, "denied "+tc.target, func(d Decision) bool {
			return !d.Allowed && d.Port == tc.port && strings.Contains(d.Reason, tc.why) && d.Host == tc.host && d.Addr == tc.addr
		})
	}

	// An allowed IP:port and a name allowed by port: bytes flow both ways.
	for _, target := range []string{"198.51.100.20:5432", "db.company.com:5432"} {
		conn, br := e.raw(ProxyPort, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\nearly bytes|")
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT %s: %v %v", target, resp, err)
		}
		io.WriteString(conn, "hello")
		got := make([]byte, len("early bytes|hello"))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != "early bytes|hello" {
			t.Errorf("CONNECT %s: echoed %q, %v", target, got, err)
		}
		conn.(*net.TCPConn).CloseWrite() // a half-close goes through; the echo server closes
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("CONNECT %s: after the half-close: %v, want EOF", target, err)
		}
	}
	e.rec.wait(t, "tcp allowed", func(d Decision) bool {
		return d.Allowed && d.Proto == "tcp" && d.Addr == addr("198.51.100.20") && d.Port == 5432
	})

	// An upstream that refuses: 502, not 200.
	e.net.route("198.51.100.20:5432", "127.0.0.1:1")
	_, br := e.raw(ProxyPort, "CONNECT 198.51.100.20:5432 HTTP/1.1\r\n\r\n")
	if resp, body := readResponse(t, br); resp.StatusCode != http.StatusBadGateway {
		t.Errorf("refused upstream: %d %q", resp.StatusCode, body)
	}
}

func TestProxyAbsoluteURI(t *testing.T) {
	e := newEnv(t, true, "api.company.com:80", "x.svc.company.com:443")
	c := e.proxyClient()
	if code, body := get(t, c, "http://api.company.com/hello?a=b"); code != 200 || body != "api api.company.com /hello" {
		t.Errorf("GET http://api.company.com/hello: %d %q", code, body)
	}
	d := e.rec.wait(t, "http allowed", func(d Decision) bool { return d.Allowed && d.Proto == "http" })
	if d.Host != "api.company.com" || d.Addr != addr("198.51.100.10") || d.Port != 80 {
		t.Errorf("decision %+v", d)
	}
	for url, why := range map[string]string{
		"http://evil.example/":                "evil.example is not on the allow list",
		"http://x.svc.company.com/":           "port 80 is not allowed for x.svc.company.com",
		"http://api.company.com:8080/":        "port 8080 is not allowed",
		"http://198.51.100.10/":               "198.51.100.10:80 is not on the allow list",
		"http://internal.company.com/":        "is not on the allow list",
		"http://[2001:db8::10]/":              "is not on the allow list",
		"http://api.company.com.evil.example": "not on the allow list",
	} {
		code, body := get(t, c, url)
		if code != http.StatusForbidden || !strings.Contains(body, why) {
			t.Errorf("GET %s: %d %q, want 403 with %q", url, code, body, why)
		}
	}

	// Hop-by-hop and Proxy-* headers are not forwarded; others are; the connection is kept
	// alive and each request is checked on its own; a POST body goes through.
	conn, br := e.raw(ProxyPort, "GET http://api.company.com/headers HTTP/1.1\r\nHost: api.company.com\r\n"+
		"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n"+
		"Proxy-Foo: bar\r\nX-Keep: yes\r\n\r\n")
	resp, body := readResponse(t, br)
	if resp.StatusCode != 200 || !strings.Contains(body, "X-Keep: yes") {
		t.Errorf("headers: %d %q", resp.StatusCode, body)
	}
	for _, h := range []string{"X-Hop", "Proxy-Authorization", "Proxy-Foo", "Keep-Alive", "Go-Http-Client"} {
		if strings.Contains(body, h) {
			t.Errorf("the upstream got %s: %q", h, body)
		}
	}
	if resp.Close {
		t.Error("the client's keep-alive connection was closed")
	}
	io.WriteString(conn, "POST http://api.company.com/post HTTP/1.1\r\nHost: api.company.com\r\nContent-Length: 5\r\n\r\nhello")
	if resp, body := readResponse(t, br); resp.StatusCode != 200 || body != "api got 5 bytes: hello" {
		t.Errorf("POST: %d %q", resp.StatusCode, body)
	}
	io.WriteString(conn, "POST http://api.company.com/post HTTP/1.1\r\nHost: api.company.com\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusContinue {
		t.Fatalf("Expect: 100-continue: %v %v", resp, err)
	}
	io.WriteString(conn, "3\r\nabc\r\n0\r\n\r\n")
	if resp, body := readResponse(t, br); resp.StatusCode != 200 || body != "api got 3 bytes: abc" {
		t.Errorf("chunked POST: %d %q", resp.StatusCode, body)
	}
	io.WriteString(conn, "GET http://api.company.com/early HTTP/1.1\r\nHost: api.company.com\r\n\r\n")
	if resp, body := readResponse(t, br); resp.StatusCode != 200 || body != "api after hints" {
		t.Errorf("after 103 Early Hints: %d %q", resp.StatusCode, body)
	}
	io.WriteString(conn, "GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
	if resp, body := readResponse(t, br); resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "evil.example") {
		t.Errorf("evil on a kept-alive connection: %d %q", resp.StatusCode, body)
	}
	expectClosed(t, conn, "after a 403")

	// A connection upgrade (websockets and the like) becomes a tunnel.
	conn, br = e.raw(ProxyPort, "GET http://api.company.com/upgrade HTTP/1.1\r\nHost: api.company.com\r\n"+
		"Connection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "echo" {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(conn, "ws frame")
	got := make([]byte, len("api:ws frame"))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "api:ws frame" {
		t.Errorf("upgraded: %q %v", got, err)
	}

	// Requests the proxy does not take.
	for req, code := range map[string]int{
		"GET / HTTP/1.1\r\nHost: api.company.com\r\n\r\n":                        http.StatusBadRequest,
		"GET https://api.company.com/ HTTP/1.1\r\nHost: api.company.com\r\n\r\n": http.StatusBadRequest,
		"BLAH\r\n\r\n": http.StatusBadRequest,
		"GET http://api.company.com/ HTTP/1.1\r\nX: " + strings.Repeat("a", 70000): http.StatusRequestHeaderFieldsTooLarge,
	} {
		_, br := e.raw(ProxyPort, req)
		if resp, body := readResponse(t, br); resp.StatusCode != code {
			t.Errorf("%.40q: %d %q, want %d", req, resp.StatusCode, body, code)
		}
	}
}

// TestProxyOpen: block_outbound false allows any public name and address, not the always-denied.
func TestProxyOpen(t *testing.T) {
	e := newEnv(t, false)
	c := e.proxyClient()
	if code, body := get(t, c, "http://evil.example/"); code != 200 || body != "evil evil.example /" {
		t.Errorf("open egress: %d %q", code, body)
	}
	for _, url := range []string{"http://loop.company.com/", "http://127.0.0.1/", "http://10.1.2.3/", "http://internal.company.com/", "http://169.254.169.254/latest/meta-data/"} {
		if code, body := get(t, c, url); code != http.StatusForbidden {
			t.Errorf("GET %s with open egress: %d %q, want 403", url, code, body)
		}
	}
	// A listed private range opens with open egress too.
	e2 := newEnv(t, false, "10.1.2.3")
	if code, body := get(t, e2.proxyClient(), "http://internal.company.com/"); code != 200 || !strings.HasPrefix(body, "api") {
		t.Errorf("listed private address: %d %q", code, body)
	}
}

// TestExemptForTests: the default dialer, upstreams on loopback, exempted for the test.
func TestExemptForTests(t *testing.T) {
	up := startUpstreams(t)
	tlsPort := up.apiTLS.Listener.Addr().(*net.TCPAddr).Port
	res := StaticResolver{"local.test": {addr("127.0.0.1")}}
	p := mustPolicy(t, true, "local.test")
	for _, exempt := range []bool{true, false} {
		cfg := Config{Resolver: res}
		if exempt {
			cfg.ExemptForTests = []netip.Prefix{pfx("127.0.0.0/8")}
		} else {
			cfg.Dial = (&net.Dialer{}).DialContext
		}
		e := newEnvConfig(t, cfg, p)
		c := e.proxyClient()
		resp, err := c.Get(fmt.Sprintf("https://local.test:%d/x", tlsPort))
		switch {
		case exempt && (err != nil || resp.StatusCode != 200):
			t.Errorf("exempt loopback: %v %v", resp, err)
		case !exempt && err == nil:
			t.Errorf("loopback without exemption: %v, want a refused CONNECT", resp.Status)
		}
		if resp != nil {
			resp.Body.Close()
		}
	}
}

func TestDetach(t *testing.T) {
	e := newEnv(t, true, "198.51.100.20:5432", "api.company.com")
	conn, br := e.raw(ProxyPort, "CONNECT 198.51.100.20:5432 HTTP/1.1\r\n\r\n")
	if resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	io.WriteString(conn, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(br, buf); err != nil {
		t.Fatal(err)
	}
	idle, _ := e.raw(ProxyPort, "") // a connection that has sent nothing yet
	e.g.Detach(e.id)
	expectClosed(t, conn, "a live tunnel after Detach")
	expectClosed(t, idle, "an idle proxy connection after Detach")
	for _, port := range []uint16{ProxyPort, TransparentPort, DNSPort} {
		if c, err := net.DialTimeout("tcp", e.at(port), time.Second); err == nil {
			c.Close()
			t.Errorf("port %d still listening after Detach", port)
		}
	}
	e.g.Detach(e.id) // idempotent
	e.g.Detach("sbx_unknown")

	// The same sandbox can be attached again, then Close ends it.
	if err := e.g.Attach(e.id, e.listen, mustPolicy(t, true, "api.company.com")); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(t, e.proxyClient(), "http://api.company.com/"); code != 200 {
		t.Errorf("after re-attach: %d", code)
	}
	if err := e.g.Attach(e.id, e.listen, Policy{}); err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Errorf("double attach: %v", err)
	}
	e.g.Close()
	if err := e.g.Attach("sbx_other", e.listen, Policy{}); !errors.Is(err, ErrClosed) {
		t.Errorf("attach after Close: %v", err)
	}
	if _, err := net.DialTimeout("tcp", e.at(ProxyPort), time.Second); err == nil {
		t.Error("still listening after Close")
	}
	checkNoGatewayGoroutines(t)
}

func TestAttachErrors(t *testing.T) {
	g, err := NewGateway(Config{Resolver: testResolver})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	unprivileged(g)
	for _, a := range []netip.Addr{{}, addr("0.0.0.0"), addr("::"), addr("224.0.0.1")} {
		if err := g.Attach("sbx_x", a, Policy{}); err == nil {
			t.Errorf("Attach on %v: no error", a)
		}
	}
	if err := g.Attach("", addr("127.211.255.1"), Policy{}); err == nil {
		t.Error("empty sandbox id: no error")
	}
	// 198.51.100.1 is no address of this host: the listen fails, and nothing stays behind.
	if err := g.Attach("sbx_x", addr("198.51.100.1"), Policy{}); err == nil {
		t.Error("Attach on a foreign address: no error")
	}
	// A port taken: the listeners opened before it are closed again.
	ln, err := net.Listen("tcp", "127.211.255.2:15001")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := g.Attach("sbx_x", addr("127.211.255.2"), Policy{}); err == nil {
		t.Error("Attach with the transparent port taken: no error")
	}
	if err := g.Attach("sbx_x", addr("127.211.255.3"), Policy{}); err != nil {
		t.Errorf("Attach after failed attempts: %v", err)
	}
	if c, err := net.Dial("tcp", "127.211.255.2:3128"); err == nil {
		c.Close()
		t.Error("a failed Attach left its proxy listener open")
	}
}

func TestConnLimit(t *testing.T) {
	e := newEnvConfig(t, Config{MaxConns: 2}, mustPolicy(t, true, "api.company.com"))
	s := e.g.sandboxes[e.id]
	a, _ := e.raw(ProxyPort, "")
	b, _ := e.raw(ProxyPort, "")
	waitfor.True(t, 10*time.Second, func() bool { return len(s.slots) == 2 })         // both accepted
	if c, err := net.DialTimeout("tcp", e.at(ProxyPort), 3*time.Second); err == nil { // else reset already
		expectClosed(t, c, "a third connection over the limit")
		c.Close()
	}
	e.rec.wait(t, "limit", func(d Decision) bool {
		return !d.Allowed && strings.Contains(d.Reason, "too many concurrent connections")
	})
	a.Close()
	b.Close()
	waitfor.True(t, 10*time.Second, func() bool { return len(s.slots) == 0 }) // their slots freed
	if code, _ := get(t, e.proxyClient(), "http://api.company.com/"); code != 200 {
		t.Errorf("after the others closed: %d", code)
	}
}

// TestHeadTimeout: clients that send half a request head or ClientHello, or nothing, are cut off.
func TestHeadTimeout(t *testing.T) {
	e := newEnvConfig(t, Config{}, mustPolicy(t, true, "api.company.com"), func(g *Gateway) { g.headTimeout = 300 * time.Millisecond })
	for _, tc := range []struct {
		port       uint16
		orig, data string
	}{
		{ProxyPort, "", "GET http://api.company.com/ HTTP/1.1\r\n"},
		{ProxyPort, "", ""},
		{TransparentPort, "198.51.100.10:80", "GET / HTTP/1.1\r\nHost: api.co"},
		{TransparentPort, "198.51.100.10:443", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"},
		{TransparentPort, "203.0.113.66:443", ""},
	} {
		var conn net.Conn
		if tc.orig == "" {
			conn, _ = e.raw(tc.port, tc.data)
		} else {
			conn = e.transparent(tc.orig)
			io.WriteString(conn, tc.data)
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(conn)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%d %s %.20q: not cut off (the test's read deadline ended the read)", tc.port, tc.orig, tc.data)
		}
		if tc.orig != "" && (len(b) > 0 && !strings.Contains(string(b), "HTTP/1.1 40") && b[0] != 21) {
			t.Errorf("%s %.20q: %q, err %v", tc.orig, tc.data, b, err)
		}
	}
}

func TestPeekClientHello(t *testing.T) {
	cases := []struct {
		name    string
		send    func(c net.Conn)
		sni     string
		isTLS   bool
		prefix  string
		minRead int
	}{
		{"sni", func(c net.Conn) { tls.Client(c, &tls.Config{ServerName: "api.company.com"}).Handshake() }, "api.company.com", true, "\x16\x03", 100},
		{"no sni", func(c net.Conn) { tls.Client(c, &tls.Config{InsecureSkipVerify: true}).Handshake() }, "", true, "\x16\x03", 100},
		{"http", func(c net.Conn) { io.WriteString(c, "GET / HTTP/1.1\r\nHost: api.company.com\r\n\r\n") }, "", false, "GET /", 5},
		{"garbage", func(c net.Conn) { c.Write([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0}) }, "", false, "\x16\x03", 9},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			go tc.send(client)
			server.SetReadDeadline(time.Now().Add(3 * time.Second))
			sni, raw, isTLS, _ := peekClientHello(server)
			server.Close()
			if sni != tc.sni || isTLS != tc.isTLS || !strings.HasPrefix(string(raw), tc.prefix) || len(raw) < tc.minRead {
				t.Errorf("got %q %v %d bytes %.8q", sni, isTLS, len(raw), raw)
			}
		})
	}
}

func TestSplitHostPortDefault(t *testing.T) {
	cases := []struct {
		in   string
		host string
		port uint16
		ok   bool
	}{
		{"api.company.com", "api.company.com", 80, true},
		{"api.company.com:8080", "api.company.com", 8080, true},
		{"1.2.3.4", "1.2.3.4", 80, true},
		{"[2001:db8::1]", "2001:db8::1", 80, true},
		{"[2001:db8::1]:443", "2001:db8::1", 443, true},
		{"2001:db8::1", "", 0, false},
		{"api.company.com:0", "", 0, false},
		{"api.company.com:x", "", 0, false},
		{":80", "", 0, false},
		{"", "", 0, false},
	}
	for _, tc := range cases {
		h, p, err := splitHostPortDefault(tc.in, 80)
		if (err == nil) != tc.ok || h != tc.host || p != tc.port {
			t.Errorf("%q: %q %d %v", tc.in, h, p, err)
		}
	}
}
