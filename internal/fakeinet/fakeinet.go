// Package fakeinet is the fake internet of the tests that send sandboxes' traffic "out": a
// network namespace of the test's own behind a veth of the host, holding a few addresses with an
// HTTP server each and a UDP echo server, to which the host routes a range of its own (a
// TEST-NET: nobody's real network, and not a range the egress gateway treats as private). Each
// user picks its own link name, link /30 and range, so that tests of several packages can run at
// once; nothing a test sends to the range leaves the host. Needs root.
package fakeinet

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Config says what the fake internet holds.
type Config struct {
	Link     string            // the host side's veth (its peer is the namespace's eth0)
	HostAddr string            // the host side's address on the link's /30
	PeerAddr string            // the namespace's address on it
	Routed   netip.Prefix      // what the host routes to the namespace
	HTTP     map[string]string // "ip:port" → the body every request gets
	UDPEcho  string            // "ip:port" of the UDP echo server ("": none)
	// RouteBack gives the namespace a default route through the host, for replies to addresses
	// beyond the link (pods behind the host's bridge); without it the namespace answers only the
	// link (the host's own gateway dials from its link address).
	RouteBack bool
}

// Net is a running fake internet.
type Net struct {
	ns      netns.NsHandle
	link    string
	servers []*http.Server
	udp     net.PacketConn
	mu      sync.Mutex
	udpSeen int
}

// Start makes the namespace, the link, the route and the servers; it removes a link of the same
// name left by a crashed run first. Every address of cfg's servers must be in cfg.Routed.
func Start(cfg Config) (*Net, error) {
	n := &Net{link: cfg.Link}
	if err := n.start(cfg); err != nil {
		n.Stop()
		return nil, err
	}
	return n, nil
}

func (n *Net) start(cfg Config) error {
	if l, err := netlink.LinkByName(cfg.Link); err == nil {
		_ = netlink.LinkDel(l)
	}
	if err := onThread(func() error {
		ns, err := netns.New() // the thread's namespace until onThread puts it back
		n.ns = ns
		return err
	}); err != nil {
		return err
	}
	la := netlink.NewLinkAttrs()
	la.Name = cfg.Link
	la.Flags = net.FlagUp
	veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(n.ns), PeerTxQLen: -1}
	if err := netlink.LinkAdd(veth); err != nil {
		return err
	}
	if err := netlink.AddrAdd(veth, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(cfg.HostAddr), Mask: net.CIDRMask(30, 32)}}); err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(n.ns)
	if err != nil {
		return err
	}
	defer h.Close()
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	addrs := map[string]bool{}
	for hp := range cfg.HTTP {
		addrs[strings.Split(hp, ":")[0]] = true
	}
	if cfg.UDPEcho != "" {
		addrs[strings.Split(cfg.UDPEcho, ":")[0]] = true
	}
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(cfg.PeerAddr), Mask: net.CIDRMask(30, 32)}}); err != nil {
		return err
	}
	for a := range addrs {
		if !cfg.Routed.Contains(netip.MustParseAddr(a)) {
			return fmt.Errorf("%s is not in %s", a, cfg.Routed)
		}
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(a), Mask: net.CIDRMask(32, 32)}}); err != nil {
			return err
		}
	}
	lo, _ := h.LinkByName("lo")
	for _, l := range []netlink.Link{eth, lo} {
		if err := h.LinkSetUp(l); err != nil {
			return err
		}
	}
	if cfg.RouteBack {
		if err := h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.ParseIP(cfg.HostAddr)}); err != nil {
			return fmt.Errorf("the fake internet's way back: %w", err)
		}
	}
	_, dst, _ := net.ParseCIDR(cfg.Routed.String())
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: veth.Index, Dst: dst, Gw: net.ParseIP(cfg.PeerAddr)}); err != nil {
		return fmt.Errorf("route to the fake internet: %w", err)
	}
	// Never dial out for real: the fake internet's addresses must route to it.
	for a := range addrs {
		deadline := time.Now().Add(2 * time.Second)
		for {
			rs, err := netlink.RouteGet(net.ParseIP(a))
			if err == nil && len(rs) > 0 && rs[0].LinkIndex == veth.Index {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s does not route to %s: %v %v", a, cfg.Link, rs, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for addr, body := range cfg.HTTP {
		ln, err := n.listen("tcp4", addr)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, body) }), ReadHeaderTimeout: 5 * time.Second}
		n.servers = append(n.servers, srv)
		go srv.Serve(ln.(net.Listener))
	}
	if cfg.UDPEcho != "" {
		pc, err := n.listen("udp4", cfg.UDPEcho)
		if err != nil {
			return err
		}
		n.udp = pc.(net.PacketConn)
		go func() {
			buf := make([]byte, 2048)
			for {
				k, from, err := n.udp.ReadFrom(buf)
				if err != nil {
					return
				}
				n.mu.Lock()
				n.udpSeen++
				n.mu.Unlock()
				_, _ = n.udp.WriteTo(buf[:k], from)
			}
		}()
	}
	return nil
}

// listen opens a listener (tcp) or packet conn (udp) inside the namespace.
func (n *Net) listen(network, addr string) (any, error) {
	var v any
	err := onThread(func() error {
		if err := netns.Set(n.ns); err != nil {
			return err
		}
		var err error
		if strings.HasPrefix(network, "udp") {
			v, err = net.ListenPacket(network, addr)
		} else {
			v, err = net.Listen(network, addr)
		}
		return err
	})
	return v, err
}

// onThread runs fn on a locked thread and puts the thread back in the process's network
// namespace afterwards. A thread must not end in another namespace (a goroutine that exits
// locked ends its thread): a child process started from that thread with Pdeathsig — k8stest's
// cluster components — would be killed with it. If the thread cannot be put back it ends.
func onThread(fn func() error) error {
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
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, err) // still locked: the thread ends with the goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// UDPCount is how many datagrams the echo server has received.
func (n *Net) UDPCount() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.udpSeen
}

// Stop closes the servers and removes the link (the route goes with it); the namespace goes with
// its last thread.
func (n *Net) Stop() {
	for _, s := range n.servers {
		s.Close()
	}
	if n.udp != nil {
		n.udp.Close()
	}
	if l, err := netlink.LinkByName(n.link); err == nil {
		_ = netlink.LinkDel(l)
	}
	if n.ns.IsOpen() {
		n.ns.Close()
	}
}
