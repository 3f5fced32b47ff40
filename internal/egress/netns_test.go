package egress

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The test network: a namespace standing in for a sandbox, joined to the host by a veth pair,
// with the host's DNAT of its TCP to the transparent port, as the plumbing sets it up.
const (
	nsHostIf   = "sbxegt0"              // host side of the veth
	nsPeerIf   = "sbxegt1"              // the namespace's side
	nsNftTable = "sandboxd_egress_test" // ip table in the host namespace
	nsOtherIf  = "sbxegt2"              // host side of another "sandbox"'s veth
)

var (
	nsGateway = addr("10.211.0.1")
	nsClient  = addr("10.211.0.2")
	nsPrefix  = pfx("10.211.0.0/24")

	nsOtherGateway = addr("10.211.1.1")
)

// testNetns creates the namespace, the veth pair, addresses, the default route and the DNAT
// rule; and a second sandbox-like veth (sbxegt2, 10.211.1.1 on the host) whose gateway address
// the DNAT rule exempts, to show a sandbox cannot use another sandbox's gateway. Everything is
// removed at the end of the test, also on failure; the namespaces are unnamed, so they (and the
// veths in them) also disappear if the test process dies.
func testNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set: this test must run as root (network namespace, veth pair, nftables)")
		}
		t.Skip("needs root: creates a network namespace, a veth pair and an nftables table")
	}
	// Leftovers of an earlier run.
	for _, name := range []string{nsHostIf, nsOtherIf} {
		if l, err := netlink.LinkByName(name); err == nil {
			netlink.LinkDel(l)
		}
	}
	nft, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	if tb, err := nft.ListTableOfFamily(nsNftTable, nftables.TableFamilyIPv4); err == nil {
		nft.DelTable(tb)
		nft.Flush()
	}

	ns := addVeth(t, nsHostIf, nsPeerIf, nsGateway, nsClient, nsPrefix.Bits())
	addVeth(t, nsOtherIf, nsPeerIf, nsOtherGateway, nsOtherGateway.Next(), 24)

	// iifname sbxegt0 ip daddr 10.211.1.1 accept
	// iifname sbxegt0 ip daddr != 10.211.0.1 meta l4proto tcp dnat to 10.211.0.1:15001
	tbl := nft.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: nsNftTable})
	ch := nft.AddChain(&nftables.Chain{Name: "prerouting", Table: tbl, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	ifname := make([]byte, unix.IFNAMSIZ)
	copy(ifname, nsHostIf)
	gw := nsGateway.AsSlice()
	nft.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nsOtherGateway.AsSlice()},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}})
	nft.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: gw},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Immediate{Register: 1, Data: gw},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(TransparentPort)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}})
	if err := nft.Flush(); err != nil {
		t.Fatalf("nftables: %v", err)
	}
	t.Cleanup(func() {
		nft.DelTable(tbl)
		if err := nft.Flush(); err != nil {
			t.Errorf("deleting the nft table: %v", err)
		}
	})
	return ns
}

// addVeth creates a namespace and a veth pair hostIf (address gw on the host) ↔ peerIf (address
// client in the namespace, default route via gw).
func addVeth(t *testing.T, hostIf, peerIf string, gw, client netip.Addr, bits int) netns.NsHandle {
	t.Helper()
	ns := newNamespace(t)
	t.Cleanup(func() { ns.Close() })
	la := netlink.NewLinkAttrs()
	la.Name = hostIf
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peerIf, PeerNamespace: netlink.NsFd(ns)}); err != nil {
		t.Fatalf("veth: %v", err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostIf); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("deleting the veth: %v", err)
			}
		}
	})
	host, err := netlink.LinkByName(hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: ipNet(gw, bits)}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		t.Fatal(err)
	}
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	lo, err := nh.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := nh.LinkByName(peerIf)
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{
		nh.LinkSetUp(lo),
		nh.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(client, bits)}),
		nh.LinkSetUp(peer),
		nh.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Gw: net.IP(gw.AsSlice())}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return ns
}

// newNamespace creates an unnamed network namespace; the calling thread returns to its own.
func newNamespace(t *testing.T) netns.NsHandle {
	runtime.LockOSThread()
	restored := false
	defer func() {
		if restored {
			runtime.UnlockOSThread()
		} // else the thread stays locked and ends with the goroutine: it is in the wrong namespace
	}()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		restored = true
		t.Fatalf("new network namespace: %v", err)
	}
	if err := netns.Set(orig); err != nil {
		ns.Close()
		t.Fatalf("back to the host namespace: %v", err)
	}
	restored = true
	return ns
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, a.BitLen())}
}

// inNS runs f on a thread in ns: the sockets it creates belong to ns.
func inNS(ns netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = f()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func dialNS(ns netns.NsHandle, address string) (net.Conn, error) {
	var c net.Conn
	err := inNS(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", address, 3*time.Second)
		return err
	})
	if c != nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
	}
	return c, err
}

// TestTransparentNetns: from inside a network namespace whose TCP the host DNATs to the gateway,
// as a sandbox's is, through real SO_ORIGINAL_DST.
func TestTransparentNetns(t *testing.T) {
	ns := testNetns(t)
	rec := &recorder{}
	fnet := &fakeNet{}
	up := startUpstreams(t)
	up.routes(fnet)
	g, err := NewGateway(Config{Resolver: testResolver, OnDecision: rec.add, Denied: []netip.Prefix{nsPrefix}, Dial: fnet.dial, DialTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	p := mustPolicy(t, true, "api.company.com", "db.company.com:5432", "198.51.100.30:7000")
	if err := g.Attach("sbx_netns", nsGateway, p); err != nil {
		t.Fatal(err)
	}

	dial := func(t *testing.T, address string) net.Conn {
		t.Helper()
		c, err := dialNS(ns, address)
		if err != nil {
			t.Fatalf("dial %s from the namespace: %v", address, err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	httpVia := func(t *testing.T, address, host string) (int, string) {
		t.Helper()
		c := dial(t, address)
		fmt.Fprintf(c, "GET /ns HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
		resp, body := readResponse(t, bufio.NewReader(c))
		return resp.StatusCode, body
	}
	// expectReset: the connection fails fast with a reset, at connect or at the first read.
	expectReset := func(t *testing.T, address string) {
		t.Helper()
		c, err := dialNS(ns, address)
		if err == nil {
			defer c.Close()
			_, err = c.Read(make([]byte, 1))
		}
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) { // not a timeout
			t.Errorf("%s: %v, want a reset", address, err)
		}
	}

	t.Run("http allowed host", func(t *testing.T) {
		if code, body := httpVia(t, "198.51.100.10:80", "api.company.com"); code != 200 || body != "api api.company.com /ns" {
			t.Errorf("%d %q", code, body)
		}
	})
	t.Run("http denied host", func(t *testing.T) {
		code, body := httpVia(t, "203.0.113.66:80", "evil.example")
		if code != 403 || body != "sandboxd egress: denied: evil.example is not on the allow list\n" {
			t.Errorf("%d %q", code, body)
		}
		rec.wait(t, "denied", func(d Decision) bool {
			return !d.Allowed && d.SandboxID == "sbx_netns" && d.Host == "evil.example" && d.Proto == "http" && d.Port == 80
		})
	})
	t.Run("http host spoofing", func(t *testing.T) {
		if code, body := httpVia(t, "203.0.113.66:80", "api.company.com"); code != 200 || !strings.HasPrefix(body, "api ") {
			t.Errorf("%d %q", code, body)
		}
	})
	t.Run("tls allowed sni", func(t *testing.T) {
		if body, err := tlsGet(dial(t, "198.51.100.10:443"), "api.company.com"); err != nil || body != "api api.company.com /tls" {
			t.Errorf("%q %v", body, err)
		}
		rec.wait(t, "https", func(d Decision) bool {
			return d.Allowed && d.Proto == "https" && d.Host == "api.company.com" && d.Addr == addr("198.51.100.10") && d.Detail == ""
		})
	})
	t.Run("tls sni spoofing", func(t *testing.T) {
		// SNI names the allowed host, the connection goes to evil.example's address: it lands on
		// the allowed host, never on evil.
		if body, err := tlsGet(dial(t, "203.0.113.66:443"), "api.company.com"); err != nil || body != "api api.company.com /tls" {
			t.Errorf("%q %v", body, err)
		}
		rec.wait(t, "spoof detail", func(d Decision) bool {
			return d.Allowed && d.Proto == "https" && strings.Contains(d.Detail, "original destination 203.0.113.66 is not an address of api.company.com")
		})
	})
	t.Run("tls denied sni", func(t *testing.T) {
		if _, err := tlsGet(dial(t, "203.0.113.66:443"), "evil.example"); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Errorf("%v, want an unrecognized_name alert", err)
		}
	})
	t.Run("direct ip other port", func(t *testing.T) {
		expectReset(t, "203.0.113.66:5555")
		expectReset(t, "198.51.100.10:22")
		rec.wait(t, "tcp denied", func(d Decision) bool { return !d.Allowed && d.Proto == "tcp" && d.Port == 5555 })
	})
	t.Run("address rule", func(t *testing.T) {
		c := dial(t, "198.51.100.30:7000")
		io.WriteString(c, "ping")
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
			t.Errorf("%q %v", b, err)
		}
	})
	t.Run("dns and pins", func(t *testing.T) {
		var r *dns.Msg
		query := func(name string) *dns.Msg {
			t.Helper()
			m := new(dns.Msg)
			m.SetQuestion(name, dns.TypeA)
			err := inNS(ns, func() error {
				var err error
				r, _, err = (&dns.Client{Net: "udp", Timeout: 3 * time.Second}).Exchange(m, netip.AddrPortFrom(nsGateway, DNSPort).String())
				return err
			})
			if err != nil {
				t.Fatalf("dns %s: %v", name, err)
			}
			return r
		}
		if r := query("evil.example."); r.Rcode != dns.RcodeNameError {
			t.Errorf("evil.example: %s", dns.RcodeToString[r.Rcode])
		}
		if got := answers(query("db.company.com.")); len(got) != 1 || got[0] != addr("198.51.100.20") {
			t.Fatalf("db.company.com: %v", got)
		}
		c := dial(t, "198.51.100.20:5432")
		io.WriteString(c, "pin")
		b := make([]byte, 3)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "pin" {
			t.Errorf("pinned db.company.com:5432: %q %v", b, err)
		}
		expectReset(t, "198.51.100.20:6543")
	})
	t.Run("proxy", func(t *testing.T) {
		c := dial(t, netip.AddrPortFrom(nsGateway, ProxyPort).String())
		io.WriteString(c, "GET http://api.company.com/p HTTP/1.1\r\nHost: api.company.com\r\n\r\n")
		if resp, body := readResponse(t, bufio.NewReader(c)); resp.StatusCode != 200 || body != "api api.company.com /p" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
	})
	t.Run("transparent port directly", func(t *testing.T) {
		expectReset(t, netip.AddrPortFrom(nsGateway, TransparentPort).String())
		rec.wait(t, "not redirected", func(d Decision) bool { return strings.Contains(d.Reason, "not redirected") })
	})
	t.Run("another sandbox's gateway", func(t *testing.T) {
		// Even where the host's rules let a packet to another sandbox's gateway address through,
		// that gateway's sockets are bound to its own veth: the connection is refused.
		if err := g.Attach("sbx_other", nsOtherGateway, mustPolicy(t, false)); err != nil {
			t.Fatal(err)
		}
		defer g.Detach("sbx_other")
		for _, port := range []uint16{ProxyPort, DNSPort} {
			expectReset(t, netip.AddrPortFrom(nsOtherGateway, port).String())
		}
	})

	if fnet.dialled(addr("203.0.113.66")) {
		t.Error("the gateway dialled evil.example's address")
	}
	for _, d := range rec.all() {
		if (d.SandboxID != "sbx_netns" && d.SandboxID != "sbx_other") || (d.Allowed && d.Addr == addr("203.0.113.66")) {
			t.Errorf("bad decision %+v", d)
		}
	}

	// After Detach nothing answers: the DNAT leads nowhere, the connection is refused at once.
	g.Detach("sbx_netns")
	expectReset(t, "198.51.100.10:80")
	g.Close()
	checkNoGatewayGoroutines(t)
}
