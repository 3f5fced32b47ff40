package e2e

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// fakeInternet is a network namespace of the test's own standing in for the internet:
// api.company.com at 203.0.113.10 and evil.example at 203.0.113.20 (TEST-NET-3: nobody's real
// network, and public as far as the egress rules go). The host reaches it through a veth pair
// (10.217.255.1/30 here, .2 there) and a route to 203.0.113.0/24; the names and ranges differ
// from the driver tests' fake internet so both may run at once.
type fakeInternet struct {
	ns netns.NsHandle
}

const (
	inetNS   = "sbxd-e2e-inet"
	inetHost = "sbxd-e2e-h"
	linkHost = "10.217.255.1"
	linkPeer = "10.217.255.2"
	inetNet  = "203.0.113.0/24"
	apiIP    = "203.0.113.10"
	evilIP   = "203.0.113.20"
)

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

func startFakeInternet(t *testing.T) *fakeInternet {
	t.Helper()
	cleanup := func() {
		_ = exec.Command("ip", "route", "del", inetNet).Run()
		_ = exec.Command("ip", "link", "del", inetHost).Run()
		_ = exec.Command("ip", "netns", "del", inetNS).Run()
	}
	cleanup()
	sh(t, "ip", "netns", "add", inetNS)
	t.Cleanup(cleanup)
	sh(t, "ip", "link", "add", inetHost, "type", "veth", "peer", "name", "eth0", "netns", inetNS)
	sh(t, "ip", "addr", "add", linkHost+"/30", "dev", inetHost)
	sh(t, "ip", "link", "set", inetHost, "up")
	sh(t, "ip", "route", "add", inetNet, "via", linkPeer, "dev", inetHost)
	for _, c := range [][]string{
		{"ip", "addr", "add", linkPeer + "/30", "dev", "eth0"},
		{"ip", "addr", "add", apiIP + "/32", "dev", "lo"},
		{"ip", "addr", "add", evilIP + "/32", "dev", "lo"},
		{"ip", "link", "set", "eth0", "up"},
		{"ip", "link", "set", "lo", "up"},
		{"ip", "route", "add", "default", "via", linkHost},
	} {
		sh(t, append([]string{"ip", "netns", "exec", inetNS}, c...)...)
	}
	// Never dial out for real: the fake internet's addresses must route to it.
	for _, a := range []string{apiIP, evilIP} {
		if out, err := exec.Command("ip", "route", "get", a).Output(); err != nil || !strings.Contains(string(out), "dev "+inetHost) {
			t.Fatalf("%s does not route to %s: %s %v", a, inetHost, out, err)
		}
	}
	h, err := netns.GetFromName(inetNS)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeInternet{ns: h}
	t.Cleanup(func() { h.Close() })
	f.serve(t, apiIP, "hello from api")
	f.serve(t, evilIP, "evil")
	return f
}

// listen opens a listener inside the fake internet (a socket keeps the namespace it was made in).
func (f *fakeInternet) listen(t *testing.T, network, addr string) any {
	t.Helper()
	type res struct {
		v   any
		err error
	}
	c := make(chan res)
	go func() {
		runtime.LockOSThread() // this thread dies with the goroutine: never reused in another netns
		orig, _ := netns.Get()
		defer orig.Close()
		if err := netns.Set(f.ns); err != nil {
			c <- res{nil, err}
			return
		}
		if network == "udp" {
			pc, err := net.ListenPacket(network, addr)
			c <- res{pc, err}
			return
		}
		l, err := net.Listen(network, addr)
		c <- res{l, err}
	}()
	r := <-c
	if r.err != nil {
		t.Fatalf("listen %s %s in the fake internet: %v", network, addr, r.err)
	}
	return r.v
}

// serve runs HTTP on :80, HTTPS on :443 and a TCP sink on :853 at ip, answering body.
func (f *fakeInternet) serve(t *testing.T, ip, body string) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, body) })
	plain := &http.Server{Handler: h}
	go plain.Serve(f.listen(t, "tcp", ip+":80").(net.Listener))
	t.Cleanup(func() { plain.Close() })
	tlsSrv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, body+" (tls)") }))
	tlsSrv.Listener = f.listen(t, "tcp", ip+":443").(net.Listener)
	tlsSrv.TLS = &tls.Config{}
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)
	say(t, f.listen(t, "tcp", ip+":853").(net.Listener), "dot reached\n")
	udp := f.listen(t, "udp", ip+":53").(net.PacketConn)
	t.Cleanup(func() { udp.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, addr, err := udp.ReadFrom(buf)
			if err != nil {
				return
			}
			udp.WriteTo(buf[:n], addr)
		}
	}()
}

// say answers every connection to l with msg, until the test ends.
func say(t *testing.T, l net.Listener, msg string) {
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(msg))
			c.Close()
		}
	}()
}

// networkProbe runs inside a sandbox that allows api.company.com only. Each check records what
// happened; a check "passes" when the outcome in want holds.
const networkProbe = `
import json, os, socket, ssl, time, urllib.request, urllib.error
out = {}
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
proxied = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
def check(name, fn):
    t0 = time.monotonic()
    try:
        out[name] = "ok:" + str(fn())
    except urllib.error.HTTPError as e:
        out[name] = "http%d" % e.code
    except Exception as e:
        out[name] = "err:" + type(e).__name__
    out[name + "_s"] = round(time.monotonic() - t0, 2)
def get(opener, url):
    return opener.open(url, timeout=8).read().decode()
def raw(ip, port, payload, tls_name=None):
    s = socket.create_connection((ip, port), timeout=8)
    if tls_name:
        s = ctx.wrap_socket(s, server_hostname=tls_name)
    s.sendall(payload)
    data = b""
    while True:
        b = s.recv(4096)
        if not b: break
        data += b
    return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]
check("proxy_http_allowed", lambda: get(proxied, "http://api.company.com/"))
check("proxy_https_allowed", lambda: get(proxied, "https://api.company.com/"))
check("direct_http_allowed", lambda: get(direct, "http://api.company.com/"))
check("direct_https_allowed", lambda: get(direct, "https://api.company.com/"))
check("proxy_http_denied", lambda: get(proxied, "http://evil.example/"))
check("proxy_https_denied", lambda: get(proxied, "https://evil.example/"))
check("dns_denied", lambda: socket.getaddrinfo("evil.example", 80))
check("direct_ip_denied", lambda: get(direct, "http://EVIL_IP/"))
check("host_spoof", lambda: raw("EVIL_IP", 80, b"GET / HTTP/1.1\r\nHost: api.company.com\r\nConnection: close\r\n\r\n"))
check("sni_spoof", lambda: raw("EVIL_IP", 443, b"GET / HTTP/1.1\r\nHost: api.company.com\r\nConnection: close\r\n\r\n", tls_name="api.company.com"))
check("port_853", lambda: raw("EVIL_IP", 853, b"x"))
check("metadata", lambda: get(direct, "http://169.254.169.254/latest/meta-data/"))
check("ipv6", lambda: socket.create_connection(("2001:db8::1", 80), timeout=5))
def udp(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect((ip, port))
    s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04evil\x07example\x00\x00\x01\x00\x01")
    return s.recv(512)
check("udp_outside_dns", lambda: udp("EVIL_IP", 53))
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
check("host_service", lambda: socket.create_connection(("HOST_IP", HOST_PORT), timeout=5).recv(1))
check("host_service_via_gateway", lambda: socket.create_connection((gateway(), HOST_PORT), timeout=5).recv(1))
check("host_api_via_gateway", lambda: socket.create_connection((gateway(), API_PORT), timeout=5).recv(1))
check("other_sandbox", lambda: socket.create_connection(("OTHER_IP", 80), timeout=5).recv(1))
result = out
`

func TestNetworkEgress(t *testing.T) {
	hostOnly(t, "its fake internet, metadata and host addresses are not routed to the test cluster's pods "+
		"(they have no default route); the pods' egress is tested in internal/driver/kubernetes (TestEgress*)")
	requireEnv(t)
	if _, err := exec.LookPath("ip"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("the network tests need iproute2's ip (scripts/install-deps.sh installs it)")
		}
		t.Skip("needs iproute2's ip")
	}
	startFakeInternet(t)
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "sandboxd.json")
	cfg := fmt.Sprintf(`{"egress": {"static_hosts": {"api.company.com": [%q], "evil.example": [%q]}}}`, apiIP, evilIP)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServerWith(t, filepath.Join(dir, "data"), "--config", cfgFile)

	other := s.create(s.key, nil)
	r := s.run(s.key, other, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('10.255.255.255', 9))\nresult = s.getsockname()[0]", 30)
	otherIP, _ := r["result"].(string)
	if otherIP == "" {
		t.Fatalf("other sandbox's address: %v", r)
	}
	hostIP := outboundIP(t)
	// A service on every host address: a sandbox must reach none of them.
	hostSvc, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	say(t, hostSvc, "host service\n")
	_, hostPort, _ := net.SplitHostPort(hostSvc.Addr().String())
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(s.url, "http://"))

	id := s.create(s.key, map[string]any{"network": map[string]any{"allow": []string{"api.company.com"}, "block_outbound": true}})
	code := strings.NewReplacer("EVIL_IP", evilIP, "HOST_IP", hostIP, "API_PORT", port, "HOST_PORT", hostPort, "OTHER_IP", otherIP).Replace(networkProbe)
	r = s.run(s.key, id, code, 120)
	got, ok := r["result"].(map[string]any)
	if !ok {
		t.Fatalf("probe run: %v", r)
	}
	want := map[string]func(string) bool{
		"proxy_http_allowed":       eq("ok:hello from api"),
		"proxy_https_allowed":      eq("ok:hello from api (tls)"),
		"direct_http_allowed":      eq("ok:hello from api"),
		"direct_https_allowed":     eq("ok:hello from api (tls)"),
		"proxy_http_denied":        eq("http403"),
		"proxy_https_denied":       failed,
		"dns_denied":               eq("err:gaierror"),
		"direct_ip_denied":         eq("http403"),
		"host_spoof":               notContains("evil"),
		"sni_spoof":                notContains("evil"),
		"port_853":                 failed,
		"metadata":                 failed,
		"ipv6":                     failed,
		"udp_outside_dns":          failed,
		"host_service":             failed,
		"host_service_via_gateway": failed,
		"host_api_via_gateway":     failed,
		"other_sandbox":            failed,
	}
	for name, ok := range want {
		v, _ := got[name].(string)
		if !ok(v) {
			t.Errorf("%s: got %q", name, v)
		}
		if secs, _ := got[name+"_s"].(float64); secs > 5 {
			t.Errorf("%s took %.1fs: denials must fail fast", name, secs)
		}
	}
	if n, _ := r["network"].(map[string]any)["denied"].(float64); n < 8 {
		t.Errorf("run reports %v denied egress attempts, want at least 8", r["network"])
	}
	_, m := s.do("GET", "/api/audit?type=network.denied&limit=500&sandbox_id="+id, s.key, nil)
	events, _ := m["events"].([]any)
	seen := map[string]bool{}
	for _, e := range events {
		d := e.(map[string]any)["detail"].(map[string]any)
		seen[fmt.Sprint(d["protocol"])] = true
		if d["reason"] == "" || d["reason"] == nil {
			t.Errorf("denial without a reason: %v", d)
		}
	}
	for _, proto := range []string{"dns", "http", "tcp", "udp"} {
		if !seen[proto] {
			t.Errorf("no network.denied event for %s (saw %v)", proto, seen)
		}
	}
	_, m = s.do("GET", "/api/audit?type=network.allowed&sandbox_id="+id, s.key, nil)
	if total, _ := m["total"].(float64); total < 1 {
		t.Errorf("no network.allowed event: %v", m)
	}
	if metrics := s.metrics(); !strings.Contains(metrics, "sandboxd_egress_denied_total ") || strings.Contains(metrics, "sandboxd_egress_denied_total 0\n") {
		t.Errorf("/metrics counts no denied egress")
	}

	// Nothing of the sandbox's network survives its deletion.
	veths := sandboxVeths(t, id, other)
	if len(veths) != 2 {
		t.Errorf("want a veth per sandbox on the host, found %v", veths)
	}
	s.do("DELETE", "/api/sandbox/"+id, s.key, nil)
	s.do("DELETE", "/api/sandbox/"+other, s.key, nil)
	if left := networkLeft(t, veths); len(left) != 0 {
		t.Errorf("left after delete: %v", left)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var left []string
		filepath.WalkDir(filepath.Join(dir, "data"), func(p string, _ fs.DirEntry, _ error) error {
			if strings.Contains(p, id) || strings.Contains(p, other) {
				left = append(left, p)
			}
			return nil
		})
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("left after delete: %v", left)
			break
		}
	}
}

// sandboxVeths names the host-side veths of the given sandboxes (found by their alias, which
// names the sandbox).
func sandboxVeths(t *testing.T, ids ...string) []string {
	t.Helper()
	links, err := netlink.LinkList()
	for i := 0; errors.Is(err, netlink.ErrDumpInterrupted) && i < 10; i++ { // links came or went meanwhile
		links, err = netlink.LinkList()
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		for _, id := range ids {
			if strings.HasSuffix(l.Attrs().Alias, " "+id) {
				out = append(out, l.Attrs().Name)
			}
		}
	}
	return out
}

// nftTables lists the host's nftables tables holding a chain named after one of the veths.
func nftTables(t *testing.T, veths []string) []string {
	t.Helper()
	nc, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	chains, err := nc.ListChains()
	if err != nil {
		t.Fatalf("list nftables chains: %v", err)
	}
	var out []string
	for _, c := range chains {
		for _, v := range veths {
			if strings.Contains(c.Name, v) && !slices.Contains(out, c.Table.Name) {
				out = append(out, c.Table.Name)
			}
		}
	}
	return out
}

// networkLeft lists what of the given veths remains on the host after a few seconds (teardown
// runs off the request path): the links themselves and the nftables chains named after them.
func networkLeft(t *testing.T, veths []string) []string {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		left = left[:0]
		for _, v := range veths {
			if _, err := netlink.LinkByName(v); err == nil {
				left = append(left, "veth "+v)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	nc, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	chains, err := nc.ListChains()
	if err != nil {
		t.Fatalf("list nftables chains: %v", err)
	}
	for _, c := range chains {
		for _, v := range veths {
			if strings.Contains(c.Name, v) {
				left = append(left, "chain "+c.Table.Name+" "+c.Name)
			}
		}
	}
	return left
}

func eq(want string) func(string) bool { return func(v string) bool { return v == want } }

func notContains(bad string) func(string) bool {
	return func(v string) bool { return !strings.Contains(v, bad) }
}

func failed(v string) bool { return strings.HasPrefix(v, "err:") || strings.HasPrefix(v, "http4") }

// outboundIP is one of the host's own addresses outside loopback and the project's links.
func outboundIP(t *testing.T) string {
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 || strings.HasPrefix(ifc.Name, "sbx") {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				return ipn.IP.String()
			}
		}
	}
	return linkHost // the host's end of the fake internet's link is one of its addresses too
}
