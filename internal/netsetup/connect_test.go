package netsetup

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"

	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// The connect check with the real egress gateway attached the way the container driver attaches
// it (its DNS answers pinned through Manager.Pin), on the fake internet.

var connectNames = func() egress.StaticResolver {
	r := egress.StaticResolver{
		"api.company.com": {netip.MustParseAddr(inetAPI)},
		"db.company.com":  {netip.MustParseAddr(inetEvil)},
	}
	for i := range 32 {
		r[fmt.Sprintf("n%d.pool.company.com", i)] = []netip.Addr{inetMany(i)}
	}
	return r
}()

// withGateway attaches a real gateway to sandbox sb, pinning its answers through m.Pin; its own
// decisions go to the returned recorder (the manager's refusals to the manager's).
func withGateway(t *testing.T, m *Manager, sb *Sandbox, p egress.Policy, pinTTL time.Duration) (*egress.Gateway, *decisions) {
	t.Helper()
	ds := &decisions{}
	g, err := egress.NewGateway(egress.Config{Resolver: connectNames, OnDecision: ds.add, Denied: []netip.Prefix{m.Pool()},
		OnAnswer: m.Pin, PinTTL: pinTTL, DialTimeout: 2 * time.Second, Dial: dialFakeInternet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	if err := g.Attach(sb.ID, sb.Gateway, p); err != nil {
		t.Fatal(err)
	}
	return g, ds
}

// inetPrefix is the fake internet's network: the only upstreams the tests' gateways dial.
var inetPrefix = netip.MustParsePrefix("198.51.100.0/24")

// dialFakeInternet is the tests' gateways' upstream dialer: it connects within the fake internet
// and treats every other address as unreachable (it waits out the dial's deadline), so that no
// test sends a packet beyond the host — what the host's real network does with an address such
// as 10.9.1.1 differs between machines (one answered every port at once).
func dialFakeInternet(ctx context.Context, network, address string) (net.Conn, error) {
	if ap, err := netip.ParseAddrPort(address); err != nil || !inetPrefix.Contains(ap.Addr()) {
		<-ctx.Done()
		return nil, fmt.Errorf("dial %s: outside the fake internet: %w", address, ctx.Err())
	}
	var d net.Dialer
	return d.DialContext(ctx, network, address)
}

func mustPolicy(t *testing.T, block bool, allow ...string) egress.Policy {
	t.Helper()
	p, err := egress.ParsePolicy(block, allow)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// resolve asks the sandbox's DNS server (its gateway) for name's A records from inside it.
func resolve(t *testing.T, sb *Sandbox, name string) []netip.Addr {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	var r *dns.Msg
	var err error
	inNS(t, sb.NSPath, func() {
		r, _, err = (&dns.Client{Net: "udp", Timeout: 2 * time.Second}).Exchange(q, netip.AddrPortFrom(sb.Gateway, DNSPort).String())
	})
	if err != nil {
		t.Fatalf("dns %s: %v", name, err)
	}
	var out []netip.Addr
	for _, rr := range r.Answer {
		if a, ok := rr.(*dns.A); ok {
			x, _ := netip.AddrFromSlice(a.A)
			out = append(out, x.Unmap())
		}
	}
	if r.Rcode != dns.RcodeSuccess || len(out) == 0 {
		t.Fatalf("dns %s: %s %v", name, dns.RcodeToString[r.Rcode], out)
	}
	return out
}

// greeting connects from the sandbox to dst and returns the fake internet's greeting.
func greeting(t *testing.T, sb *Sandbox, dst string) string {
	t.Helper()
	c, err, took := tcpFrom(t, sb.NSPath, dst)
	if err != nil {
		t.Fatalf("tcp to %s: %v after %v, want it connected", dst, err, took)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("tcp to %s: connected, then %v (read %q)", dst, err, line)
	}
	return strings.TrimSpace(line)
}

// refusedAtConnect checks that a connection from sb to dst is refused at connect() — a reset to
// its SYN, never a handshake with the gateway — and reported as a denied decision with its
// destination, host and reason (it returns the decision).
func refusedAtConnect(t *testing.T, sb *Sandbox, ds, gw *decisions, dst, reason, host string) egress.Decision {
	t.Helper()
	ap := netip.MustParseAddrPort(dst)
	seen := func(d egress.Decision) bool {
		return d.SandboxID == sb.ID && d.Addr == ap.Addr() && d.Port == ap.Port()
	}
	before, gwBefore := len(ds.all()), 0
	if gw != nil {
		gwBefore = len(gw.all())
	}
	c, err, took := tcpFrom(t, sb.NSPath, dst)
	if err == nil {
		c.Close()
		t.Fatalf("tcp to %s: connected, want connection refused at connect", dst)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) { // a dropped SYN would time out instead
		t.Fatalf("tcp to %s: %v after %v, want connection refused at once", dst, err, took)
	}
	d := ds.waitFrom(t, dst, before, seen)
	if d.Allowed || d.Proto != "tcp" || !strings.Contains(d.Reason, reason) || d.Host != host {
		t.Errorf("tcp to %s: decision %+v, want denied, tcp, host %q, reason containing %q", dst, d, host, reason)
	}
	if gw != nil {
		// Proves an absence (the gateway got no connection): the sleep is the period watched;
		// the gateway reports a connection it got at once.
		time.Sleep(20 * time.Millisecond)
		if i := slices.IndexFunc(gw.all()[gwBefore:], seen); i >= 0 {
			t.Errorf("tcp to %s: the gateway saw it: %+v", dst, gw.all()[gwBefore+i])
		}
	}
	return d
}

// TestConnectCheck: connections to ports other than 80 and 443 are decided before the DNAT —
// refused at connect unless an address rule or a pinned DNS answer allows them — while 80 and
// 443 still go to the gateway, which decides them by name.
func TestConnectCheck(t *testing.T) {
	m, ds := newManager(t, Config{ReportPerSecond: 1000})
	other := setup(t, m, "t-conn-other", allowAPI)

	type step struct {
		name    string
		resolve string // first ask the sandbox's DNS server for this name
		dst     string // then connect here
		greet   bool   // connected through the gateway to the fake internet, which greets
		refused string // refused at connect; the decision's reason contains this…
		host    string // …and names this host
	}
	cases := []struct {
		name   string
		policy egress.Policy
		steps  []step
	}{
		{"allow list", mustPolicy(t, true, "api.company.com", "db.company.com:5432", "*.pool.company.com:7000",
			inetAPI+":7000", "10.9.0.0/16:5432", "0.0.0.0/0:5433"), []step{
			{name: "address rule", dst: inetAPI + ":7000", greet: true},
			{name: "address rule, other port", dst: inetAPI + ":7001", refused: inetAPI + ":7001 is not on the allow list"},
			{name: "DNS over TLS", dst: inetAPI + ":853", refused: "DNS over TLS"},
			{name: "name:port before its answer", dst: inetEvil + ":5432", refused: "is not on the allow list"},
			{name: "name:port after its answer", resolve: "db.company.com", dst: inetEvil + ":5432", greet: true},
			{name: "answered address, other port", dst: inetEvil + ":6543", refused: "port 6543 is not allowed for db.company.com", host: "db.company.com"},
			{name: "name on any port after its answer", resolve: "api.company.com", dst: inetAPI + ":7001", greet: true},
			{name: "wildcard:port", resolve: "n3.pool.company.com", dst: inetMany(3).String() + ":7000", greet: true},
			{name: "wildcard, other port", dst: inetMany(3).String() + ":5432", refused: "port 5432 is not allowed for n3.pool.company.com", host: "n3.pool.company.com"},
			{name: "0.0.0.0/0:5433 is public only", dst: inetMany(5).String() + ":5433", greet: true},
			{name: "0.0.0.0/0 does not list 10/8", dst: "10.1.2.3:5433", refused: "always denied"},
			{name: "listed private range", dst: "10.9.1.1:5432"}, // to the gateway, which cannot reach it
			{name: "unlisted private range", dst: "10.1.2.3:5432", refused: "always denied"},
			{name: "another sandbox", dst: other.Addr.String() + ":5433", refused: "always denied"},
			{name: "another sandbox's gateway", dst: other.Gateway.String() + ":5433", refused: "always denied"},
			{name: "the host", dst: inetHost + ":5433", refused: "always denied"},
			{name: "metadata", dst: "169.254.169.254:5433", refused: "always denied"},
			{name: "443: the gateway decides by name", dst: "203.0.113.9:443"},
			{name: "443 of an always-denied address: the gateway refuses with a reason", dst: "10.1.2.3:443"},
		}},
		{"unrestricted", egress.Policy{BlockOutbound: false}, []step{
			{name: "public address, any port", dst: inetEvil + ":6543", greet: true},
			{name: "DNS over TLS", dst: inetEvil + ":853", refused: "DNS over TLS"},
			{name: "private range", dst: "10.1.2.3:5432", refused: "always denied"},
			{name: "the host", dst: inetHost + ":22", refused: "always denied"},
			{name: "metadata", dst: "169.254.169.254:8080", refused: "always denied"},
			{name: "another sandbox", dst: other.Addr.String() + ":7001", refused: "always denied"},
			{name: "80: the gateway", dst: "169.254.169.254:80"},
		}},
		{"unrestricted, private range listed", mustPolicy(t, false, "10.9.0.0/16:5432"), []step{
			{name: "listed", dst: "10.9.1.1:5432"},
			{name: "listed range, other port", dst: "10.9.1.1:5433", refused: "always denied"},
			{name: "public", dst: inetMany(7).String() + ":7001", greet: true},
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb := setup(t, m, fmt.Sprintf("t-conn-%d", i), tc.policy)
			_, gw := withGateway(t, m, sb, tc.policy, 0)
			for _, s := range tc.steps {
				if s.resolve != "" {
					resolve(t, sb, s.resolve)
				}
				switch {
				case s.refused != "":
					refusedAtConnect(t, sb, ds, gw, s.dst, s.refused, s.host)
				case s.greet:
					if got, want := greeting(t, sb, s.dst), "hello from "+s.dst; got != want {
						t.Errorf("%s: %s greeted %q, want %q", s.name, s.dst, got, want)
					}
					ap := netip.MustParseAddrPort(s.dst)
					gw.wait(t, s.name, func(d egress.Decision) bool { return d.Allowed && d.Addr == ap.Addr() && d.Port == ap.Port() })
				default: // the gateway takes the connection
					c, err, _ := tcpFrom(t, sb.NSPath, s.dst)
					if err != nil {
						t.Fatalf("%s: tcp to %s: %v, want it connected to the gateway", s.name, s.dst, err)
					}
					c.Close()
				}
			}
		})
	}
}

// TestConnectPort80Unchanged: port 80 still goes to the gateway whatever the address, which
// decides by the Host header and dials the address it resolved itself.
func TestConnectPort80Unchanged(t *testing.T) {
	m, _ := newManager(t, Config{})
	p := mustPolicy(t, true, "api.company.com")
	sb := setup(t, m, "t-conn-80", p)
	withGateway(t, m, sb, p, 0)
	for _, c := range []struct{ dst, host, want string }{
		{inetEvil + ":80", "api.company.com", "200 OK hello api.company.com from " + inetAPI + ":80"},
		{inetEvil + ":80", "evil.example", "403 Forbidden sandboxd egress: denied: evil.example is not on the allow list"},
		{"10.1.2.3:80", "api.company.com", "403 Forbidden sandboxd egress: denied: 10.1.2.3 is in a private range"},
	} {
		conn, err, _ := tcpFrom(t, sb.NSPath, c.dst)
		if err != nil {
			t.Fatalf("tcp to %s: %v", c.dst, err)
		}
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", c.host)
		b, _ := io.ReadAll(conn)
		conn.Close()
		status, rest, _ := strings.Cut(string(b), "\r\n")
		_, body, _ := strings.Cut(rest, "\r\n\r\n")
		got := strings.TrimPrefix(status, "HTTP/1.1 ") + " " + strings.TrimSpace(body)
		if !strings.HasPrefix(got, c.want) {
			t.Errorf("GET %s Host %s: %q, want %q…", c.dst, c.host, got, c.want)
		}
	}
}

// TestConnectRightAfterTheAnswer: a client that connects the moment it has the answer finds the
// way open — the element is in the kernel before the answer leaves the gateway.
func TestConnectRightAfterTheAnswer(t *testing.T) {
	m, ds := newManager(t, Config{})
	p := mustPolicy(t, true, "*.pool.company.com:5432")
	sb := setup(t, m, "t-conn-race", p)
	_, gw := withGateway(t, m, sb, p, 0)
	for i := range 32 {
		name := fmt.Sprintf("n%d.pool.company.com", i)
		var got []netip.Addr
		var conn net.Conn
		var err error
		q := new(dns.Msg)
		q.SetQuestion(name+".", dns.TypeA)
		inNS(t, sb.NSPath, func() {
			var r *dns.Msg
			if r, _, err = (&dns.Client{Net: "udp", Timeout: 2 * time.Second}).Exchange(q, netip.AddrPortFrom(sb.Gateway, DNSPort).String()); err != nil {
				return
			}
			for _, rr := range r.Answer {
				if a, ok := rr.(*dns.A); ok {
					x, _ := netip.AddrFromSlice(a.A)
					got = append(got, x)
				}
			}
			if len(got) == 1 {
				conn, err = net.DialTimeout("tcp4", netip.AddrPortFrom(got[0], 5432).String(), 2*time.Second)
			}
		})
		if err != nil || len(got) != 1 {
			t.Fatalf("%s: answer %v, connect: %v", name, got, err)
		}
		conn.Close()
	}
	refusedAtConnect(t, sb, ds, gw, inetMany(31).String()+":5433", "port 5433 is not allowed for n31.pool.company.com", "n31.pool.company.com")
}

// TestConnectPinsExpire: an answer's addresses are reachable while the gateway pins them; an
// answer for longer than a pin has left renews it (the kernel element is replaced, with the new
// lifetime); one for less leaves it; once the kernel expires an element, its address is refused at
// connect again, and a new answer opens it again. What is waited for is the kernel's state (an
// element's timeout, its expiry), never a guess of how long a step takes: a slow machine makes the
// test slower, not wrong.
func TestConnectPinsExpire(t *testing.T) {
	m, ds := newManager(t, Config{})
	p := mustPolicy(t, true, "db.company.com:5432")
	sb := setup(t, m, "t-conn-ttl", p)
	const ttl = time.Minute // the gateway's: far longer than any step of the test
	_, gw := withGateway(t, m, sb, p, ttl)
	dst := inetEvil + ":5432"
	key := pinKey{netip.MustParseAddr(inetEvil).As4(), 5432}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	answer := func(ttl time.Duration) {
		t.Helper()
		a := egress.Answer{Name: "db.company.com", Addrs: []netip.Addr{netip.MustParseAddr(inetEvil)}, Ports: []uint16{5432}, TTL: ttl}
		if err := m.Pin(sb.ID, a); err != nil {
			t.Fatal(err)
		}
	}

	// An answer of a short lifetime: its element expires in the kernel (the event waited for),
	// and the address is refused at connect.
	answer(1200 * time.Millisecond) // its element lives 20 ms longer than its name (TTL/60): more than a jiffy
	if _, ok := pinElem(t, c, m, sb, key); !ok {
		t.Fatal("no pin element after the answer")
	}
	waitfor.True(t, 30*time.Second, func() bool { _, ok := pinElem(t, c, m, sb, key); return !ok })
	refusedAtConnect(t, sb, ds, gw, dst, dst+" is not on the allow list", "")

	// Asked again (its element expired a moment ago: the manager replaces it or adds it anew).
	resolve(t, sb, "db.company.com")
	greeting(t, sb, dst)
	if el, ok := pinElem(t, c, m, sb, key); !ok || el.Timeout != ttl+ttl/60 {
		t.Fatalf("after the gateway's answer: element %v (timeout %v), want one of timeout %v", ok, el.Timeout, ttl+ttl/60)
	}
	// An answer for longer than the pin has left replaces its element; one for less leaves it.
	answer(time.Hour)
	for _, ask := range []func(){func() {}, func() { resolve(t, sb, "db.company.com") }} {
		ask()
		if el, ok := pinElem(t, c, m, sb, key); !ok || el.Timeout != time.Hour+time.Hour/60 {
			t.Fatalf("after an answer of an hour: element %v (timeout %v), want one of timeout %v", ok, el.Timeout, time.Hour+time.Hour/60)
		}
	}
	greeting(t, sb, dst)
}

// pinElem returns sandbox sb's element of key in the kernel's pins set, if it is there (the
// kernel lists no expired element).
func pinElem(t *testing.T, c *nftables.Conn, m *Manager, sb *Sandbox, key pinKey) (nftables.SetElement, bool) {
	t.Helper()
	els, err := c.GetSetElements(m.connectSets().pins)
	if err != nil {
		t.Fatal(err)
	}
	want := key.elem(sb.HostIf, 0).Key
	for _, el := range els {
		if bytes.Equal(el.Key, want) {
			return el, true
		}
	}
	return nftables.SetElement{}, false
}

// TestConnectSetPolicy: a warm sandbox set up for one allow list and given another
// (Manager.SetPolicy, then the gateway's) reaches what the new list allows and nothing of the old
// one's, pins included.
func TestConnectSetPolicy(t *testing.T) {
	m, ds := newManager(t, Config{})
	before := mustPolicy(t, true, "db.company.com:5432", inetAPI+":7000")
	after := mustPolicy(t, true, "api.company.com:5433", inetEvil+":6543")
	sb := setup(t, m, "t-conn-swap", before)
	g, gw := withGateway(t, m, sb, before, 0)
	resolve(t, sb, "db.company.com")
	greeting(t, sb, inetEvil+":5432")
	greeting(t, sb, inetAPI+":7000")

	if err := m.SetPolicy(sb.ID, after); err != nil {
		t.Fatal(err)
	}
	if err := g.SetPolicy(sb.ID, after); err != nil {
		t.Fatal(err)
	}
	refusedAtConnect(t, sb, ds, gw, inetEvil+":5432", "is not on the allow list", "")
	refusedAtConnect(t, sb, ds, gw, inetAPI+":7000", "is not on the allow list", "")
	greeting(t, sb, inetEvil+":6543")
	resolve(t, sb, "api.company.com")
	greeting(t, sb, inetAPI+":5433")
	if err := m.SetPolicy(sb.ID, egress.Policy{BlockOutbound: true}); !errors.Is(err, ErrShape) {
		t.Errorf("SetPolicy to nothing allowed: %v, want ErrShape", err)
	}

	// Address rules gone (the sandbox's address set and chain with them), and back.
	for _, c := range []struct {
		p       egress.Policy
		open    bool
		objects bool
	}{
		{mustPolicy(t, true, "db.company.com:5432"), false, false},
		{mustPolicy(t, true, "db.company.com:5432", inetEvil+":6543"), true, true},
	} {
		if err := m.SetPolicy(sb.ID, c.p); err != nil {
			t.Fatal(err)
		}
		if err := g.SetPolicy(sb.ID, c.p); err != nil {
			t.Fatal(err)
		}
		if c.open {
			greeting(t, sb, inetEvil+":6543")
		} else {
			refusedAtConnect(t, sb, ds, gw, inetEvil+":6543", "is not on the allow list", "")
		}
		st := hostNFT(t, m)
		if has := slices.Contains(st.chains, "c_"+sb.HostIf) && slices.Contains(st.sets, "a_"+sb.HostIf); has != c.objects || st.elements[mapAllow] != map[bool]int{false: 0, true: 1}[c.objects] {
			t.Errorf("%v: address chain and set %v, want %v (%+v)", c.p, has, c.objects, st)
		}
	}
}

// TestAllowedRects: what the address set holds for a policy.
func TestAllowedRects(t *testing.T) {
	m, _ := newManager(t, Config{Denied: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}})
	str := func(rs []rect) []string {
		var out []string
		for _, r := range rs {
			a := func(x uint32) netip.Addr {
				return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
			}
			out = append(out, fmt.Sprintf("%s-%s:%d-%d", a(r.addr.lo), a(r.addr.hi), r.port.lo, r.port.hi))
		}
		return out
	}
	for _, c := range []struct {
		name string
		p    egress.Policy
		want []string
	}{
		{"names only", mustPolicy(t, true, "api.company.com", "db.company.com:5432"), nil},
		{"an address", mustPolicy(t, true, "198.51.100.7:5432"), []string{"198.51.100.7-198.51.100.7:5432-5432"}},
		{"overlapping rules", mustPolicy(t, true, "198.51.100.0/24:5432", "198.51.100.7", "198.51.100.8/31:5433"), []string{
			"198.51.100.0-198.51.100.6:5432-5432",
			"198.51.100.7-198.51.100.7:0-852", // 853 is always denied
			"198.51.100.7-198.51.100.7:854-65535",
			"198.51.100.8-198.51.100.9:5432-5433",
			"198.51.100.10-198.51.100.255:5432-5432",
		}},
		{"private listed, inside and around", mustPolicy(t, true, "10.1.0.0/16:22", "8.0.0.0/6:80"), []string{
			"8.0.0.0-9.255.255.255:80-80",
			"10.1.0.0-10.1.255.255:22-22",
			"11.0.0.0-11.255.255.255:80-80",
		}},
		{"everything, minus the always denied", mustPolicy(t, true, "0.0.0.0/0:5432"), []string{
			"1.0.0.0-9.255.255.255:5432-5432",
			"11.0.0.0-100.63.255.255:5432-5432",
			"100.128.0.0-126.255.255.255:5432-5432",
			"128.0.0.0-169.253.255.255:5432-5432",
			"169.255.0.0-172.15.255.255:5432-5432",
			"172.32.0.0-191.255.255.255:5432-5432",
			"192.0.1.0-192.167.255.255:5432-5432",
			"192.169.0.0-198.17.255.255:5432-5432",
			"198.20.0.0-203.0.112.255:5432-5432",
			"203.0.114.0-223.255.255.255:5432-5432",
		}},
	} {
		got := str(disjoint(m.allowedRects(c.p)))
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
	// Unrestricted: the address rules only (open4 has the public space).
	if got := str(disjoint(m.allowedRects(mustPolicy(t, false, "10.9.0.0/16:5432")))); !slices.Equal(got, []string{"10.9.0.0-10.9.255.255:5432-5432"}) {
		t.Errorf("unrestricted: %q", got)
	}
}

// TestMeasurePins: the bench's measurement of pinning (sandboxd bench) takes a sample of each kind
// per answer, refuses a count it cannot pin, and leaves nothing behind: no sandbox, no scratch
// table, no pin.
func TestMeasurePins(t *testing.T) {
	m, _ := newManager(t, Config{})
	setup(t, m, "t-pin-other", allowAPI) // another sandbox's rules in the table meanwhile
	for _, n := range []int{0, maxPinElems + 1} {
		if _, err := m.MeasurePins(context.Background(), "t-pin-cost", n); err == nil {
			t.Errorf("MeasurePins(%d): no error", n)
		}
	}
	const n = 300 // addresses in two /24s
	pc, err := m.MeasurePins(context.Background(), "t-pin-cost", n)
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string][]time.Duration{"fresh": pc.Fresh, "again": pc.Again, "renew": pc.Renew, "baseline": pc.Baseline} {
		if len(s) != n {
			t.Errorf("%s: %d samples, want %d", name, len(s), n)
		}
	}
	if err := m.Wait(); err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, 30*time.Second, func() bool { return m.Released("t-pin-cost") })
	if st := hostNFT(t, m); st == nil || st.elements[setPins] != 0 {
		t.Errorf("pins left after the measurement, or no table: %+v", st)
	}
	if _, tables := inetTables(t); slices.ContainsFunc(tables, func(x *nftables.Table) bool { return strings.HasPrefix(x.Name, "sandboxd_pinbench_") }) {
		t.Errorf("a scratch table is left: %v", tables)
	}
}

// TestConnectRefusalsRateLimited: a sandbox hammering a refused port is refused every time, but
// the kernel logs at most its burst and rate of them (the connect check's per-sandbox limit).
func TestConnectRefusalsRateLimited(t *testing.T) {
	m, ds := newManager(t, Config{ReportPerSecond: 100000})
	sb := setup(t, m, "t-conn-flood", allowAPI)
	const n = 600
	start := time.Now()
	var refused int
	inNS(t, sb.NSPath, func() {
		for range n {
			c, err := net.DialTimeout("tcp4", inetEvil+":6543", time.Second)
			if err == nil {
				c.Close()
			} else if errors.Is(err, syscall.ECONNREFUSED) {
				refused++
			}
		}
	})
	took := time.Since(start)
	// No more than the limit are logged: an upper bound, so the reports still on their way
	// are given this time to come (their absence after it is what is checked).
	time.Sleep(200 * time.Millisecond)
	logged := 0
	for _, d := range ds.all() {
		if d.SandboxID == sb.ID && d.Port == 6543 {
			logged++
		}
	}
	t.Logf("%d connects in %v: %d refused, %d logged", n, took.Round(time.Millisecond), refused, logged)
	if refused != n {
		t.Errorf("%d of %d connects refused", refused, n)
	}
	if max := kernelLogBurst + int(kernelLogRate*took.Seconds()) + 20; logged == 0 || logged > max {
		t.Errorf("%d refusals logged, want 1 to %d", logged, max)
	}
}
