package egress

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// tlsGet speaks TLS with sni over c and GETs /; it returns the body or the handshake error.
func tlsGet(c net.Conn, sni string) (string, error) {
	tc := tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		return "", err
	}
	io.WriteString(tc, "GET /tls HTTP/1.1\r\nHost: "+sni+"\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestTransparent: the transparent proxy's decisions, with the original destination pretended
// (TestTransparentNetns does the same through real DNAT).
func TestTransparent(t *testing.T) {
	e := newEnv(t, true, "api.company.com", "db.company.com:5432", "198.51.100.30:7000", "198.51.100.31")

	t.Run("http host", func(t *testing.T) {
		c := e.transparent("198.51.100.10:80")
		io.WriteString(c, "GET /t HTTP/1.1\r\nHost: api.company.com\r\n\r\n")
		br := bufio.NewReader(c)
		if resp, body := readResponse(t, br); resp.StatusCode != 200 || body != "api api.company.com /t" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
		d := e.rec.wait(t, "http allowed", func(d Decision) bool { return d.Allowed && d.Proto == "http" && d.Host == "api.company.com" })
		if d.Addr != addr("198.51.100.10") || d.Port != 80 || d.Detail != "" {
			t.Errorf("decision %+v", d)
		}
		// The next request on the connection is checked on its own.
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
		if resp, body := readResponse(t, br); resp.StatusCode != 403 || !strings.Contains(body, "evil.example is not on the allow list") {
			t.Errorf("second request: %d %q", resp.StatusCode, body)
		}
	})
	t.Run("http denied", func(t *testing.T) {
		c := e.transparent("203.0.113.66:80")
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
		resp, body := readResponse(t, bufio.NewReader(c))
		if resp.StatusCode != 403 || body != "sandboxd egress: denied: evil.example is not on the allow list\n" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
		e.rec.wait(t, "http denied", func(d Decision) bool {
			return !d.Allowed && d.Proto == "http" && d.Host == "evil.example" && d.Port == 80
		})
	})
	t.Run("http host spoofing", func(t *testing.T) {
		c := e.transparent("203.0.113.66:80")
		io.WriteString(c, "GET /spoof HTTP/1.1\r\nHost: api.company.com\r\n\r\n")
		if resp, body := readResponse(t, bufio.NewReader(c)); resp.StatusCode != 200 || body != "api api.company.com /spoof" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
		d := e.rec.wait(t, "spoof", func(d Decision) bool {
			return d.Allowed && strings.Contains(d.Detail, "original destination 203.0.113.66")
		})
		if d.Addr != addr("198.51.100.10") {
			t.Errorf("decision %+v", d)
		}
	})
	t.Run("tls sni", func(t *testing.T) {
		body, err := tlsGet(e.transparent("198.51.100.10:443"), "api.company.com")
		if err != nil || body != "api api.company.com /tls" {
			t.Errorf("%q %v", body, err)
		}
		e.rec.wait(t, "https allowed", func(d Decision) bool {
			return d.Allowed && d.Proto == "https" && d.Host == "api.company.com" && d.Addr == addr("198.51.100.10") && d.Detail == ""
		})
	})
	t.Run("tls sni spoofing", func(t *testing.T) {
		body, err := tlsGet(e.transparent("203.0.113.66:443"), "api.company.com")
		if err != nil || body != "api api.company.com /tls" {
			t.Errorf("%q %v", body, err)
		}
	})
	t.Run("tls denied", func(t *testing.T) {
		_, err := tlsGet(e.transparent("203.0.113.66:443"), "evil.example")
		if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Errorf("handshake: %v, want an unrecognized_name alert", err)
		}
		e.rec.wait(t, "https denied", func(d Decision) bool {
			return !d.Allowed && d.Proto == "https" && d.Host == "evil.example" && d.Port == 443
		})
	})
	t.Run("tls without sni", func(t *testing.T) {
		_, err := tlsGet(e.transparent("203.0.113.66:443"), "")
		if err == nil || !strings.Contains(err.Error(), "handshake failure") {
			t.Errorf("handshake: %v, want a handshake_failure alert", err)
		}
		e.rec.wait(t, "no sni denied", func(d Decision) bool {
			return !d.Allowed && d.Proto == "https" && d.Addr == addr("203.0.113.66") && d.Host == ""
		})
	})
	t.Run("other port denied", func(t *testing.T) {
		expectClosed(t, e.transparent("203.0.113.66:5555"), "203.0.113.66:5555")
		e.rec.wait(t, "tcp denied", func(d Decision) bool {
			return !d.Allowed && d.Proto == "tcp" && d.Addr == addr("203.0.113.66") && d.Port == 5555
		})
	})
	t.Run("reserved destination refused before the client speaks", func(t *testing.T) {
		for _, dst := range []string{"10.213.0.6:80", "169.254.169.254:443", "10.9.9.9:22"} {
			expectClosed(t, e.transparent(dst), dst)
			e.rec.wait(t, dst, func(d Decision) bool {
				return !d.Allowed && d.Proto == "tcp" && netip.AddrPortFrom(d.Addr, d.Port).String() == dst && d.Reason != ""
			})
		}
		// Whatever name it gives: HTTP gets the reason, TLS an alert.
		c := e.transparent("169.254.169.254:80")
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: api.company.com\r\n\r\n")
		if resp, body := readResponse(t, bufio.NewReader(c)); resp.StatusCode != 403 || !strings.Contains(body, "link-local") {
			t.Errorf("http to the metadata address: %d %q", resp.StatusCode, body)
		}
		if _, err := tlsGet(e.transparent("10.213.0.6:443"), "api.company.com"); err == nil || !strings.Contains(err.Error(), "handshake failure") {
			t.Errorf("tls to another sandbox: %v, want a handshake_failure alert", err)
		}
		e.rec.wait(t, "https to another sandbox", func(d Decision) bool {
			return !d.Allowed && d.Proto == "https" && d.Host == "api.company.com" && d.Addr == addr("10.213.0.6")
		})
	})
	t.Run("not http on 80", func(t *testing.T) {
		c := e.transparent("203.0.113.66:80")
		io.WriteString(c, "\x00\x01binary\r\n\r\n")
		expectClosed(t, c, "binary to 203.0.113.66:80")
	})
	t.Run("address rule", func(t *testing.T) {
		c := e.transparent("198.51.100.30:7000")
		io.WriteString(c, "echo me")
		got := make([]byte, 7)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "echo me" {
			t.Errorf("%q %v", got, err)
		}
		expectClosed(t, e.transparent("198.51.100.30:7001"), "198.51.100.30:7001")
		expectClosed(t, e.transparent("198.51.100.31:853"), "198.51.100.31:853")
		e.rec.wait(t, "853", func(d Decision) bool {
			return !d.Allowed && d.Port == 853 && strings.Contains(d.Reason, "DNS over TLS")
		})
	})
	t.Run("pinned by dns", func(t *testing.T) {
		// Before the sandbox resolved db.company.com its address is just an address.
		expectClosed(t, e.transparent("198.51.100.20:5432"), "unpinned 198.51.100.20:5432")
		if got := answers(e.dns("db.company.com", dns.TypeA, "udp")); len(got) != 1 || got[0] != addr("198.51.100.20") {
			t.Fatalf("db.company.com: %v", got)
		}
		c := e.transparent("198.51.100.20:5432")
		io.WriteString(c, "pinned")
		got := make([]byte, 6)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "pinned" {
			t.Errorf("%q %v", got, err)
		}
		e.rec.wait(t, "pinned allowed", func(d Decision) bool {
			return d.Allowed && d.Proto == "tcp" && d.Host == "db.company.com" && d.Port == 5432
		})
		expectClosed(t, e.transparent("198.51.100.20:22"), "pinned name, port not allowed")
		e.rec.wait(t, "pinned denied", func(d Decision) bool {
			return !d.Allowed && d.Host == "db.company.com" && d.Port == 22 && strings.Contains(d.Reason, "port 22 is not allowed for db.company.com")
		})
	})
	t.Run("not redirected", func(t *testing.T) {
		c, err := net.Dial("tcp", e.at(TransparentPort))
		if err == nil {
			expectClosed(t, c, "a direct connection to the transparent port")
			c.Close()
		}
		e.rec.wait(t, "not redirected", func(d Decision) bool { return !d.Allowed && strings.Contains(d.Reason, "not redirected") })
	})
	if e.net.dialled(addr("203.0.113.66")) {
		t.Error("the gateway dialled evil.example's address")
	}
}
