package netsetup

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

var (
	block    = egress.Policy{BlockOutbound: true}                                                  // nothing allowed
	allowAPI = egress.Policy{BlockOutbound: true, Rules: []egress.Rule{{Host: "api.company.com"}}} // TCP is checked at connect, then goes to the gateway
	open     = egress.Policy{BlockOutbound: false}
)

// decisions collects what a manager reports.
type decisions struct {
	mu sync.Mutex
	ds []egress.Decision
}

func (d *decisions) add(x egress.Decision) {
	d.mu.Lock()
	d.ds = append(d.ds, x)
	d.mu.Unlock()
}

func (d *decisions) all() []egress.Decision {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.ds)
}

// wait returns the first decision matching f, waiting up to 2 s.
func (d *decisions) wait(t *testing.T, what string, f func(egress.Decision) bool) egress.Decision {
	t.Helper()
	var got egress.Decision
	if !waitfor.Until(2*time.Second, func() bool {
		for _, x := range d.all() {
			if f(x) {
				got = x
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no decision for %s; got %+v", what, d.all())
	}
	return got
}

// waitFrom returns the first decision matching f among those reported after the first from,
// waiting up to 2 s for it.
func (d *decisions) waitFrom(t *testing.T, what string, from int, f func(egress.Decision) bool) egress.Decision {
	t.Helper()
	var got egress.Decision
	if !waitfor.Until(2*time.Second, func() bool {
		for _, x := range d.all()[from:] {
			if f(x) {
				got = x
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no decision for %s; got %+v", what, d.all()[from:])
	}
	return got
}

func newManager(t *testing.T, cfg Config) (*Manager, *decisions) {
	t.Helper()
	fakeInternet(t)
	d := &decisions{}
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	if cfg.OnDecision == nil {
		cfg.OnDecision = d.add
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return m, d
}

func setup(t *testing.T, m *Manager, id string, p egress.Policy) *Sandbox {
	t.Helper()
	sb, err := m.Setup(context.Background(), id, p)
	if err != nil {
		t.Fatalf("Setup %s: %v", id, err)
	}
	t.Cleanup(func() {
		if err := m.Teardown(id); err != nil {
			t.Errorf("Teardown %s: %v", id, err)
		}
		if err := m.Wait(); err != nil {
			t.Errorf("teardown %s: %v", id, err)
		}
	})
	return sb
}

// udpFrom sends one datagram from inside ns to dst and waits up to 2 s for an answer or an error.
func udpFrom(t *testing.T, ns string, dst string) (reply string, err error, took time.Duration) {
	t.Helper()
	inNS(t, ns, func() {
		start := time.Now()
		defer func() { took = time.Since(start) }()
		c, derr := net.Dial("udp", dst)
		if derr != nil {
			err = derr
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err = c.Write([]byte("ping")); err != nil {
			return
		}
		buf := make([]byte, 512)
		var n int
		n, err = c.Read(buf)
		reply = string(buf[:n])
	})
	return
}

func tcpFrom(t *testing.T, ns string, dst string) (conn net.Conn, err error, took time.Duration) {
	t.Helper()
	inNS(t, ns, func() {
		start := time.Now()
		conn, err = net.DialTimeout("tcp", dst, 2*time.Second)
		took = time.Since(start)
	})
	return
}

func fast(t *testing.T, what string, err error, took time.Duration) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded, want refused", what)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: timed out (%v), want a fast refusal", what, err)
	}
	t.Logf("%s: %v after %v", what, err, took.Round(time.Microsecond))
}

// nftState lists the host table's chains, set elements and objects (nil if the table is absent).
type nftState struct {
	chains   []string
	sets     []string
	elements map[string]int
	objects  int
}

// inetTables lists the host's inet tables, over a new connection (returned too).
func inetTables(t *testing.T) (*nftables.Conn, []*nftables.Table) {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	return c, tables
}

func hostNFT(t *testing.T, m *Manager) *nftState {
	t.Helper()
	c, tables := inetTables(t)
	if !slices.ContainsFunc(tables, func(x *nftables.Table) bool { return x.Name == m.Table() }) {
		return nil
	}
	st := &nftState{elements: map[string]int{}}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chains {
		if ch.Table.Name == m.Table() {
			st.chains = append(st.chains, ch.Name)
		}
	}
	sets, err := c.GetSets(m.tbl)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sets {
		st.sets = append(st.sets, s.Name)
		if s.Name == setDenied {
			continue
		}
		els, err := c.GetSetElements(s)
		if err != nil {
			t.Fatal(err)
		}
		st.elements[s.Name] = len(els)
	}
	objs, err := c.GetObj(&nftables.NamedObj{Table: m.tbl, Type: nftables.ObjTypeLimit})
	if err != nil {
		t.Fatal(err)
	}
	st.objects = len(objs)
	return st
}

func mounted(path string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// assertGone checks that nothing of sandbox id is left: veth, namespace file and mount, rules.
func assertGone(t *testing.T, m *Manager, id string) {
	t.Helper()
	if _, err := netlink.LinkByName(m.HostIfName(id)); err == nil {
		t.Errorf("veth %s of %s is still there", m.HostIfName(id), id)
	}
	if _, err := os.Lstat(m.NSPath(id)); err == nil {
		t.Errorf("namespace file of %s is still there", id)
	}
	if mounted(m.NSPath(id)) {
		t.Errorf("namespace of %s is still mounted", id)
	}
	if st := hostNFT(t, m); st != nil {
		for _, ch := range st.chains {
			if strings.HasSuffix(ch, m.HostIfName(id)) {
				t.Errorf("chain %s is still there", ch)
			}
		}
		for _, s := range st.sets {
			if strings.HasSuffix(s, m.HostIfName(id)) {
				t.Errorf("set %s is still there", s)
			}
		}
	}
}

func TestSetupTeardownLeavesNothing(t *testing.T) {
	m, _ := newManager(t, Config{})
	const id = "t-plumb"
	sb, err := m.Setup(context.Background(), id, block)
	if err != nil {
		t.Fatal(err)
	}
	if sb.NSPath != m.NSPath(id) || !strings.HasPrefix(sb.HostIf, "sbx") || len(sb.HostIf) != 13 {
		t.Errorf("sandbox %+v", sb)
	}
	if !m.Pool().Contains(sb.Gateway) || sb.Addr != sb.Gateway.Next() || sb.Prefix.Bits() != 30 {
		t.Errorf("addresses %+v", sb)
	}
	l, err := netlink.LinkByName(sb.HostIf)
	if err != nil {
		t.Fatalf("host veth: %v", err)
	}
	if l.Attrs().Alias != m.alias(id) || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("veth alias %q flags %v", l.Attrs().Alias, l.Attrs().Flags)
	}
	if !mounted(sb.NSPath) {
		t.Errorf("namespace not mounted at %s", sb.NSPath)
	}
	inNS(t, sb.NSPath, func() {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			t.Errorf("eth0: %v", err)
			return
		}
		addrs, _ := netlink.AddrList(eth, netlink.FAMILY_V4)
		if len(addrs) != 1 || !addrs[0].IP.Equal(sb.Addr.AsSlice()) {
			t.Errorf("eth0 addresses %v", addrs)
		}
		routes, _ := netlink.RouteList(nil, netlink.FAMILY_V4)
		if !slices.ContainsFunc(routes, func(r netlink.Route) bool {
			return (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.Equal(sb.Gateway.AsSlice())
		}) {
			t.Errorf("no default route via the gateway: %v", routes)
		}
	})
	st := hostNFT(t, m)
	if st == nil || !slices.Contains(st.chains, "f_"+sb.HostIf) || !slices.Contains(st.chains, "n_"+sb.HostIf) ||
		st.elements[setSandboxes] != 1 || st.elements[mapFilter] != 1 || st.elements[mapNAT] != 1 || st.objects != 1 {
		t.Fatalf("host rules: %+v", st)
	}
	if ids, err := m.List(); err != nil || !slices.Contains(ids, id) {
		t.Errorf("List = %v, %v", ids, err)
	}

	start := time.Now()
	if err := m.Teardown(id); err != nil {
		t.Fatal(err)
	}
	t.Logf("Teardown returned after %v", time.Since(start))
	if err := m.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Logf("background part done after %v", time.Since(start))
	assertGone(t, m, id)
	if st := hostNFT(t, m); st == nil || len(st.chains) != 7 || st.objects != 0 ||
		st.elements[setSandboxes]+st.elements[mapFilter]+st.elements[mapNAT]+st.elements[setMasq] != 0 ||
		st.elements[setConnectSrc]+st.elements[setOpen]+st.elements[mapAllow]+st.elements[setPins] != 0 {
		t.Errorf("host table after teardown: %+v", st)
	}
	if err := m.Teardown(id); err != nil {
		t.Errorf("second teardown: %v", err)
	}
	if ids, err := m.List(); err != nil || len(ids) != 0 {
		t.Errorf("List after teardown = %v, %v", ids, err)
	}
	// The same id again: names are free. This time with the connect check.
	sb, err = m.Setup(context.Background(), id, open)
	if err != nil {
		t.Fatal(err)
	}
	if st := hostNFT(t, m); st == nil || st.elements[setConnectSrc] != 1 || st.elements[setOpen] != 1 {
		t.Fatalf("host rules: %+v", st)
	}
	if err := m.Teardown(id); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m, id)
	if hostNFT(t, m) != nil {
		t.Errorf("table %s survives Close", m.Table())
	}
}

func TestTwoSandboxesCannotReachEachOther(t *testing.T) {
	m, ds := newManager(t, Config{})
	a := setup(t, m, "t-a", allowAPI)
	b := setup(t, m, "t-b", open)
	// Listeners inside b; a transparent-proxy stand-in on a's gateway.
	var bUDP net.PacketConn
	var bTCP net.Listener
	inNS(t, b.NSPath, func() {
		var err error
		if bUDP, err = net.ListenPacket("udp4", b.Addr.String()+":7000"); err != nil {
			t.Error(err)
		}
		if bTCP, err = net.Listen("tcp4", b.Addr.String()+":7001"); err != nil {
			t.Error(err)
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	defer bUDP.Close()
	defer bTCP.Close()
	got := make(chan string, 10)
	go func() {
		buf := make([]byte, 100)
		for {
			n, from, err := bUDP.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- fmt.Sprintf("udp %q from %v", buf[:n], from)
		}
	}()
	go func() {
		for {
			c, err := bTCP.Accept()
			if err != nil {
				return
			}
			got <- "tcp from " + c.RemoteAddr().String()
			c.Close()
		}
	}()
	proxyA := listenProxy(t, a.Gateway)
	proxyB := listenProxy(t, b.Gateway)

	_, err, took := udpFrom(t, a.NSPath, b.Addr.String()+":7000")
	fast(t, "udp a→b", err, took)
	ds.wait(t, "udp a→b", func(d egress.Decision) bool {
		return d.SandboxID == "t-a" && d.Proto == "udp" && d.Addr == b.Addr && d.Port == 7000
	})
	_, err, took = udpFrom(t, b.NSPath, a.Addr.String()+":7000")
	fast(t, "udp b→a (b unrestricted)", err, took)
	ds.wait(t, "udp b→a", func(d egress.Decision) bool {
		return d.SandboxID == "t-b" && d.Proto == "udp" && d.Addr == a.Addr && strings.Contains(d.Reason, "always denied")
	})
	_, err, took = udpFrom(t, a.NSPath, b.Gateway.String()+":53")
	fast(t, "udp a→b's gateway DNS", err, took)

	// TCP from a to b, and to b's gateway, is refused at connect (no address rule can open
	// another sandbox); to port 80 it lands on a's transparent proxy (which refuses it with a
	// reason), never on b.
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(b.Addr, 7001), netip.AddrPortFrom(b.Gateway, 3128)} {
		_, err, took := tcpFrom(t, a.NSPath, dst.String())
		fast(t, "tcp a→"+dst.String(), err, took)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("tcp a→%s: %v, want connection refused", dst, err)
		}
		ds.wait(t, "tcp a→"+dst.String(), func(d egress.Decision) bool {
			return d.SandboxID == "t-a" && d.Proto == "tcp" && d.Addr == dst.Addr() && d.Port == dst.Port() && strings.Contains(d.Reason, "always denied")
		})
	}
	c, err, _ := tcpFrom(t, a.NSPath, b.Addr.String()+":80")
	if err != nil {
		t.Fatalf("tcp a→b:80: %v (want it redirected to a's gateway)", err)
	}
	c.Close()
	pc := proxyA.next(t)
	if pc.orig != netip.AddrPortFrom(b.Addr, 80) || pc.from.Addr() != a.Addr {
		t.Errorf("a's proxy saw %+v", pc)
	}
	select {
	case g := <-got:
		t.Errorf("b received %s", g)
	case g := <-proxyB.conns:
		t.Errorf("b's gateway received %+v", g)
	case <-time.After(200 * time.Millisecond):
	}
}

// proxy is a stand-in for the transparent proxy on a gateway address: it records the original
// destination (SO_ORIGINAL_DST) of each connection.
type proxy struct {
	conns chan proxied
}

type proxied struct {
	from, orig netip.AddrPort
}

func listenProxy(t *testing.T, gw netip.Addr) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(gw, TransparentPort).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	p := &proxy{conns: make(chan proxied, 10)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.conns <- proxied{from: c.RemoteAddr().(*net.TCPAddr).AddrPort(), orig: originalDst(c)}
			c.Close()
		}
	}()
	return p
}

func (p *proxy) next(t *testing.T) proxied {
	t.Helper()
	select {
	case c := <-p.conns:
		return c
	case <-time.After(2 * time.Second):
		t.Fatal("nothing reached the transparent proxy")
	}
	return proxied{}
}

func originalDst(c net.Conn) netip.AddrPort {
	sc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return netip.AddrPort{}
	}
	var out netip.AddrPort
	_ = sc.Control(func(fd uintptr) {
		mreq, err := unix.GetsockoptIPv6Mreq(int(fd), unix.IPPROTO_IP, unix.SO_ORIGINAL_DST)
		if err != nil {
			return
		}
		// struct sockaddr_in: family(2) port(2, big endian) addr(4)
		port := binary.BigEndian.Uint16(mreq.Multiaddr[2:4])
		out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(mreq.Multiaddr[4:8])), port)
	})
	return out
}

func TestUDPRefusedFastAndReported(t *testing.T) {
	m, ds := newManager(t, Config{})
	in := fakeInternet(t)
	a := setup(t, m, "t-udp", block)
	before := len(in.received())
	_, err, took := udpFrom(t, a.NSPath, inetEvil+":9999")
	fast(t, "udp to the internet", err, took)
	d := ds.wait(t, "udp", func(d egress.Decision) bool { return d.SandboxID == "t-udp" && d.Proto == "udp" })
	if d.Allowed || d.Addr != netip.MustParseAddr(inetEvil) || d.Port != 9999 || !strings.Contains(d.Reason, "udp is only allowed") {
		t.Errorf("decision %+v", d)
	}
	if n := len(in.received()); n != before {
		t.Errorf("the internet received %d datagrams", n-before)
	}
	// Port 53 of an outside resolver, and the metadata address: refused too.
	for _, dst := range []string{inetAPI + ":53", "169.254.169.254:80", inetEvil + ":853"} {
		_, err, took := udpFrom(t, a.NSPath, dst)
		fast(t, "udp to "+dst, err, took)
	}
}

func TestICMPRefusedFastAndReported(t *testing.T) {
	m, ds := newManager(t, Config{})
	a := setup(t, m, "t-icmp", block)
	var reply *icmp.Message
	var took time.Duration
	var err error
	inNS(t, a.NSPath, func() {
		reply, took, err = ping(inetEvil)
	})
	if err != nil {
		t.Fatalf("ping: %v", err)
	}
	if reply.Type != ipv4.ICMPTypeDestinationUnreachable || reply.Code != 13 { // an answer at all: a drop would time out
		t.Fatalf("ping answered %v code %d after %v, want destination unreachable (13: administratively prohibited) at once", reply.Type, reply.Code, took)
	}
	d := ds.wait(t, "icmp", func(d egress.Decision) bool { return d.SandboxID == "t-icmp" && d.Proto == "icmp" })
	if d.Addr != netip.MustParseAddr(inetEvil) || d.Reason == "" {
		t.Errorf("decision %+v", d)
	}
}

// ping sends one ICMP echo to dst and returns the first answer.
func ping(dst string) (*icmp.Message, time.Duration, error) {
	c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: 4242, Seq: 1, Data: []byte("sandbox")}}
	b, _ := msg.Marshal(nil)
	start := time.Now()
	if _, err := c.WriteTo(b, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
		return nil, 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 1500)
	for {
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			return nil, time.Since(start), err
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil {
			continue
		}
		if m.Type == ipv4.ICMPTypeEcho {
			continue
		}
		return m, time.Since(start), nil
	}
}

func TestTCPRedirectedToTransparentProxy(t *testing.T) {
	m, ds := newManager(t, Config{})
	a := setup(t, m, "t-tcp", allowAPI)
	p := listenProxy(t, a.Gateway)
	for _, dst := range []string{"198.51.100.99:443", inetAPI + ":80", "169.254.169.254:80", "[::ffff:203.0.113.9]:443"} {
		c, err, took := tcpFrom(t, a.NSPath, dst)
		if err != nil {
			t.Fatalf("tcp to %s: %v", dst, err)
		}
		c.Close()
		got := p.next(t)
		want := netip.MustParseAddrPort(dst)
		want = netip.AddrPortFrom(want.Addr().Unmap(), want.Port())
		if got.orig != want || got.from.Addr() != a.Addr {
			t.Errorf("tcp to %s: proxy saw %+v", dst, got)
		}
		t.Logf("tcp to %s: at the proxy after %v", dst, took)
	}
	// Other ports: refused at connect without an address rule or a pinned answer
	// (TestConnectCheck has the details), and nothing reaches the proxy.
	_, err, took := tcpFrom(t, a.NSPath, "203.0.113.9:8080")
	fast(t, "tcp to 203.0.113.9:8080", err, took)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("tcp to 203.0.113.9:8080: %v, want connection refused", err)
	}
	select {
	case c := <-p.conns:
		t.Errorf("the proxy got %+v", c)
	case <-time.After(50 * time.Millisecond):
	}
	// Other ports of the gateway: refused at once.
	_, err, took = tcpFrom(t, a.NSPath, a.Gateway.String()+":22")
	fast(t, "tcp to the gateway's port 22", err, took)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("tcp to the gateway's port 22: %v, want connection refused", err)
	}
	d := ds.wait(t, "gateway port", func(d egress.Decision) bool { return d.SandboxID == "t-tcp" && d.Port == 22 })
	if d.Proto != "tcp" || d.Addr != a.Gateway || !strings.Contains(d.Reason, "gateway") {
		t.Errorf("decision %+v", d)
	}
}

// With nothing allowed, TCP is refused at connect (and audited) instead of going to the gateway.
func TestTCPRefusedWhenNothingIsAllowed(t *testing.T) {
	m, ds := newManager(t, Config{})
	a := setup(t, m, "t-tcp0", block)
	p := listenProxy(t, a.Gateway)
	_, err, took := tcpFrom(t, a.NSPath, inetAPI+":443")
	fast(t, "tcp with nothing allowed", err, took)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("got %v, want connection refused", err)
	}
	d := ds.wait(t, "tcp", func(d egress.Decision) bool { return d.SandboxID == "t-tcp0" && d.Port == 443 })
	if d.Proto != "tcp" || d.Addr != netip.MustParseAddr(inetAPI) || !strings.Contains(d.Reason, "blocked") {
		t.Errorf("decision %+v", d)
	}
	select {
	case c := <-p.conns:
		t.Errorf("the transparent proxy got %+v", c)
	default:
	}
	// The proxy port of the gateway is still reachable (to answer 403 with a reason).
	c, err, _ := tcpFrom(t, a.NSPath, a.Gateway.String()+":3128")
	if err == nil {
		c.Close()
	} else if !errors.Is(err, syscall.ECONNREFUSED) { // nobody listens in this test: refused by the host, not by a rule
		t.Errorf("tcp to the gateway's proxy port: %v", err)
	}
}

func TestLoopbackDNSGoesToGateway(t *testing.T) {
	m, _ := newManager(t, Config{})
	a := setup(t, m, "t-dns", block)
	pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(a.Gateway, DNSPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	from := make(chan net.Addr, 1)
	go func() {
		buf := make([]byte, 512)
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		from <- addr
		_, _ = pc.WriteTo(append([]byte("answer:"), buf[:n]...), addr)
	}()
	reply, err, _ := udpFrom(t, a.NSPath, "127.0.0.1:53")
	if err != nil || reply != "answer:ping" {
		t.Fatalf("udp to 127.0.0.1:53: %q, %v", reply, err)
	}
	if f := (<-from).(*net.UDPAddr); f.AddrPort().Addr() != a.Addr {
		t.Errorf("the gateway saw the query from %v, want %v", f, a.Addr)
	}
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(a.Gateway, DNSPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("tcp-dns"))
			c.Close()
		}
	}()
	c, err, _ := tcpFrom(t, a.NSPath, "127.0.0.1:53")
	if err != nil {
		t.Fatalf("tcp to 127.0.0.1:53: %v", err)
	}
	b := make([]byte, 16)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _ := c.Read(b)
	c.Close()
	if string(b[:n]) != "tcp-dns" {
		t.Errorf("tcp to 127.0.0.1:53 read %q", b[:n])
	}
	// Loopback itself still works inside.
	inNS(t, a.NSPath, func() {
		l, err := net.Listen("tcp4", "127.0.0.1:8080")
		if err != nil {
			t.Error(err)
			return
		}
		defer l.Close()
		go func() {
			if c, err := l.Accept(); err == nil {
				c.Close()
			}
		}()
		c, err := net.DialTimeout("tcp4", "127.0.0.1:8080", time.Second)
		if err != nil {
			t.Errorf("loopback inside: %v", err)
			return
		}
		c.Close()
	})
}

func TestIPv6RefusedAndReported(t *testing.T) {
	m, ds := newManager(t, Config{})
	if !m.ipv6 {
		t.Skip("IPv6 is disabled on this host: refused inside the sandbox, unaudited")
	}
	a := setup(t, m, "t-ipv6", open)
	_, err, took := udpFrom(t, a.NSPath, "[2001:db8::1]:53")
	fast(t, "udp over IPv6", err, took)
	_, err, took = tcpFrom(t, a.NSPath, "[2001:db8::1]:443")
	fast(t, "tcp over IPv6", err, took)
	_, err, took = tcpFrom(t, a.NSPath, "[fd00:ec2::254]:80")
	fast(t, "tcp to fd00:ec2::254", err, took)
	d := ds.wait(t, "ipv6", func(d egress.Decision) bool { return d.SandboxID == "t-ipv6" && d.Port == 443 })
	if d.Proto != "ipv6" || d.Addr != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("decision %+v", d)
	}
}

func TestUnrestrictedEgress(t *testing.T) {
	m, ds := newManager(t, Config{})
	in := fakeInternet(t)
	fwdBefore := readSysctl("net/ipv4/ip_forward")
	a := setup(t, m, "t-open", open)
	if readSysctl("net/ipv4/ip_forward") != "1" {
		t.Fatal("ip_forward is off with an unrestricted sandbox")
	}
	reply, err, _ := udpFrom(t, a.NSPath, inetEvil+":9999")
	if err != nil || reply != "ping" {
		t.Fatalf("udp to the internet: %q, %v", reply, err)
	}
	seen := in.received()
	if last := seen[len(seen)-1]; last.Addr() != netip.MustParseAddr(inetHost) {
		t.Errorf("the internet saw %v, want the host's address (masquerade)", last)
	}
	var msg *icmp.Message
	inNS(t, a.NSPath, func() { msg, _, err = ping(inetAPI) })
	if err != nil || msg.Type != ipv4.ICMPTypeEchoReply {
		t.Errorf("ping the internet: %+v, %v", msg, err)
	}
	// The new flows were reported as allowed.
	for _, w := range []struct {
		proto, addr string
	}{{"udp", inetEvil}, {"icmp", inetAPI}} {
		ds.wait(t, "allowed "+w.proto, func(d egress.Decision) bool {
			return d.SandboxID == "t-open" && d.Allowed && d.Proto == w.proto && d.Addr == netip.MustParseAddr(w.addr) && d.Reason == ""
		})
	}
	for _, c := range []struct{ dst, reason string }{
		{"169.254.169.254:53", "always denied"},
		{"10.1.2.3:53", "always denied"},
		{"198.18.0.5:53", "always denied"},
		{"127.0.0.1:9", ""},                     // its own loopback: nobody listens
		{inetHost + ":53", "always denied"},     // the host's address
		{"255.255.255.255:67", "always denied"}, // no ICMP answers a broadcast: refused silently
		{inetEvil + ":853", "853"},
	} {
		_, err, took := udpFrom(t, a.NSPath, c.dst)
		if !strings.HasPrefix(c.dst, "255.") {
			fast(t, "udp to "+c.dst, err, took)
		}
		if c.reason == "" {
			continue
		}
		dst := netip.MustParseAddrPort(c.dst)
		ds.wait(t, c.dst, func(d egress.Decision) bool {
			return d.SandboxID == "t-open" && d.Addr == dst.Addr() && d.Port == dst.Port() && strings.Contains(d.Reason, c.reason)
		})
	}
	// TCP still goes through the gateway.
	p := listenProxy(t, a.Gateway)
	c, err, _ := tcpFrom(t, a.NSPath, inetEvil+":80")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if got := p.next(t); got.orig != netip.MustParseAddrPort(inetEvil+":80") {
		t.Errorf("proxy saw %+v", got)
	}
	if err := m.Teardown("t-open"); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readSysctl("net/ipv4/ip_forward"); got != fwdBefore {
		t.Errorf("ip_forward %s after Close, was %s", got, fwdBefore)
	}
}

func TestSandboxCannotChangeItsRules(t *testing.T) {
	m, _ := newManager(t, Config{})
	a := setup(t, m, "t-eperm", block)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=nft-eperm "+a.NSPath)
	out, err := cmd.CombinedOutput()
	t.Logf("as uid 10000 inside the sandbox:\n%s", out)
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	// The rules are intact: DNS over loopback still goes to the gateway.
	pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(a.Gateway, DNSPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 64)
		if n, from, err := pc.ReadFrom(buf); err == nil {
			pc.WriteTo(buf[:n], from)
		}
	}()
	if reply, err, _ := udpFrom(t, a.NSPath, "127.0.0.1:53"); err != nil || reply != "ping" {
		t.Errorf("after the attempts: %q %v", reply, err)
	}
}

func TestRestartRemovesLeftovers(t *testing.T) {
	fakeInternet(t)
	dir := t.TempDir()
	first, err := New(Config{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"t-crash1", "t-crash2"}
	for i, id := range ids {
		if _, err := first.Setup(context.Background(), id, []egress.Policy{block, open}[i]); err != nil {
			t.Fatal(err)
		}
	}
	first.abandon() // a crash: the process's sockets close, the kernel objects stay
	if _, err := netlink.LinkByName(first.HostIfName(ids[0])); err != nil {
		t.Fatalf("the crash removed the veth already: %v", err)
	}
	d := &decisions{}
	second, err := New(Config{StateDir: dir, OnDecision: d.add})
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if second.Table() != first.Table() {
		t.Fatalf("table %s after restart, was %s", second.Table(), first.Table())
	}
	for _, id := range ids {
		if _, err := netlink.LinkByName(second.HostIfName(id)); err == nil {
			t.Errorf("stale veth of %s survives New", id)
		}
	}
	if st := hostNFT(t, second); st != nil {
		t.Errorf("the crashed manager's table survives New: %+v", st)
	}
	got, err := second.List()
	if err != nil || !slices.Equal(got, ids) {
		t.Fatalf("List after restart = %v, %v; want %v", got, err, ids)
	}
	for _, id := range ids {
		if err := second.Teardown(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := second.Wait(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		assertGone(t, second, id)
	}
	if got, _ := second.List(); len(got) != 0 {
		t.Errorf("List after teardown = %v", got)
	}
	// A new sandbox works after the restart.
	sb, err := second.Setup(context.Background(), "t-after", block)
	if err != nil {
		t.Fatal(err)
	}
	_, err, took := udpFrom(t, sb.NSPath, inetEvil+":9999")
	fast(t, "udp after restart", err, took)
	d.wait(t, "udp after restart", func(x egress.Decision) bool { return x.SandboxID == "t-after" })
	if err := second.Teardown("t-after"); err != nil {
		t.Fatal(err)
	}
}

func TestReportsAreRateLimited(t *testing.T) {
	m, ds := newManager(t, Config{ReportPerSecond: 5})
	a := setup(t, m, "t-flood", block)
	const n = 500
	inNS(t, a.NSPath, func() {
		c, err := net.ListenPacket("udp4", ":0")
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		dst := &net.UDPAddr{IP: net.ParseIP(inetEvil), Port: 9999}
		for i := 0; i < n; i++ {
			_, _ = c.WriteTo([]byte("flood"), dst)
		}
	})
	var one, summaries int
	waitfor.Until(3*time.Second, func() bool {
		one, summaries = 0, 0
		for _, d := range ds.all() {
			if d.SandboxID != "t-flood" {
				continue
			}
			if strings.Contains(d.Reason, "more refused packets") {
				summaries++
			} else {
				one++
			}
		}
		return summaries > 0
	})
	t.Logf("%d packets: %d decisions one by one, %d summaries: %+v", n, one, summaries, ds.all()[len(ds.all())-1])
	if one > 10 || summaries == 0 {
		t.Errorf("got %d individual decisions and %d summaries, want ≤ 10 and ≥ 1", one, summaries)
	}
}

func TestIntervalElems(t *testing.T) {
	var ps []netip.Prefix
	for _, s := range []string{"10.0.0.0/8", "10.213.0.0/16", "192.168.0.0/16", "224.0.0.0/3", "192.169.0.0/16"} {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	var got []string
	for _, e := range intervalElems(ps) {
		s := netip.AddrFrom4([4]byte(e.Key)).String()
		if e.IntervalEnd {
			s = "end " + s
		}
		got = append(got, s)
	}
	want := []string{"10.0.0.0", "end 11.0.0.0", "192.168.0.0", "end 192.170.0.0", "224.0.0.0", "end 255.255.255.255"}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestParsePacket(t *testing.T) {
	ip := make([]byte, 28)
	ip[0] = 0x45
	ip[9] = unix.IPPROTO_UDP
	copy(ip[16:20], []byte{198, 51, 100, 20})
	binary.BigEndian.PutUint16(ip[22:], 9999)
	attrs := func(payload []byte) []byte {
		var b bytes.Buffer
		put := func(typ uint16, data []byte) {
			h := make([]byte, 4)
			binary.NativeEndian.PutUint16(h, uint16(4+len(data)))
			binary.NativeEndian.PutUint16(h[2:], typ)
			b.Write(h)
			b.Write(data)
			for b.Len()%4 != 0 {
				b.WriteByte(0)
			}
		}
		put(nfulaIfindexIndev, binary.BigEndian.AppendUint32(nil, 7))
		put(nfulaPrefix, []byte("udp\x00"))
		put(nfulaPayload, payload)
		return b.Bytes()
	}
	p, ok := parsePacket(attrs(ip))
	if !ok || p.indev != 7 || p.prefix != "udp" || p.proto != "udp" || p.dst != netip.MustParseAddr("198.51.100.20") || p.dport != 9999 {
		t.Errorf("parsed %+v %v", p, ok)
	}
	if _, ok := parsePacket(attrs([]byte{0x45})); ok {
		t.Error("a truncated packet parsed")
	}
}

// Released is false from Setup until the background part of Teardown is over (the veth gone);
// SetPolicy takes a policy of the same shape only.
func TestReleasedAndSetPolicy(t *testing.T) {
	m, _ := newManager(t, Config{})
	const id = "t-released"
	allowSome := egress.Policy{BlockOutbound: true, Rules: []egress.Rule{{Host: "api.company.com"}}}
	sb, err := m.Setup(context.Background(), id, allowSome)
	if err != nil {
		t.Fatal(err)
	}
	if m.Released(id) {
		t.Fatal("Released while set up")
	}
	for _, c := range []struct {
		p  egress.Policy
		ok bool
	}{
		{egress.Policy{BlockOutbound: true, Rules: []egress.Rule{{Host: "other.example"}}}, true},
		{egress.Policy{BlockOutbound: true}, false},  // nothing allowed: refused at connect, not redirected
		{egress.Policy{BlockOutbound: false}, false}, // NAT
	} {
		if err := m.SetPolicy(id, c.p); (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrShape)) {
			t.Errorf("SetPolicy(%+v) = %v, want ok=%v", c.p, err, c.ok)
		}
	}
	if err := m.SetPolicy("t-unknown", allowSome); err == nil {
		t.Error("SetPolicy of an unknown sandbox succeeded")
	}
	if err := m.Teardown(id); err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, 10*time.Second, func() bool { return m.Released(id) })
	if _, err := netlink.LinkByName(sb.HostIf); err == nil {
		t.Error("Released while the host veth exists")
	}
}
