package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Ports of the gateway on a sandbox's gateway address.
const (
	DNSPort         = 53    // udp and tcp
	ProxyPort       = 3128  // HTTP proxy: CONNECT and absolute-URI requests
	TransparentPort = 15001 // where the host's nftables DNAT the sandbox's other TCP connections
)

// Limits of the gateway.
const (
	defaultDialTimeout = 10 * time.Second
	defaultMaxConns    = 256
	defaultHeadTimeout = 10 * time.Second // to read an HTTP request head or a TLS ClientHello
	idleTimeout        = 60 * time.Second // between requests of a kept-alive proxy connection
	writeTimeout       = 5 * time.Second  // for the gateway's own short answers (403, alerts)
	maxHeadBytes       = 64 << 10         // HTTP request head or TLS ClientHello
	maxDNSInFlight     = 64               // concurrent DNS queries being resolved per sandbox
	lookupTimeout      = 5 * time.Second
	lookupCacheTTL     = 5 * time.Second
	dnsTTL             = 30 // seconds, of the DNS answers the gateway gives
	defaultPinTTL      = time.Hour
	maxPins            = 4096 // pinned addresses per sandbox
	maxNames           = 4096 // remembered names per sandbox (reported allowed names, recent denials, lookups)
	dnsDenyRepeat      = 5 * time.Second
)

// Config configures a Gateway.
type Config struct {
	// Resolver resolves names for the gateway (nil: net.DefaultResolver). It should be the
	// host's resolver or static records: never anything the sandboxes can influence.
	Resolver Resolver
	// OnDecision receives every decision (nil: none are reported). It is called from the
	// gateway's connection goroutines, possibly concurrently and at a high rate: it must be cheap
	// and must not block.
	OnDecision func(Decision)
	// Denied are further prefixes no sandbox may reach, whatever its policy lists: the sandbox
	// address pool, the API's addresses. The fixed set (AlwaysDenied), the host's own addresses
	// and port 853 are always added by the gateway. Do not put the private ranges here: they
	// are denied already, and putting them here would stop allow entries from opening them.
	Denied []netip.Prefix
	// DialTimeout bounds resolving and connecting to an upstream (0: 10s).
	DialTimeout time.Duration
	// MaxConns is the number of concurrent connections per sandbox (proxy, transparent and DNS
	// over TCP together; 0: 256). Past it new connections are reset.
	MaxConns int
	// Dial connects to upstreams (nil: a net.Dialer). The gateway calls it only with network
	// "tcp" and a literal IP:port it has checked. Production may use it to set socket options
	// (e.g. a firewall mark); tests use it as a fake internet.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// OnAnswer, if set, is called with every DNS answer that hands out addresses, before it is
	// sent (the answer waits for it; it runs on the DNS server's goroutines, possibly
	// concurrently, and must not keep or change the slices): the host's plumbing lets a sandbox
	// connect to an address by TCP on ports other than 80 and 443 only once it is pinned there
	// too (netsetup's Manager.Pin). If it fails, the answer is SERVFAIL and the failure is
	// reported as a denial of the name.
	OnAnswer func(sandboxID string, a Answer) error
	// PinTTL is how long the addresses of an answer stay pinned to its name (0: an hour).
	PinTTL time.Duration
	// Ports are the gateway's DNS, proxy and transparent ports (zero: DNSPort, ProxyPort,
	// TransparentPort). A gateway without CAP_NET_BIND_SERVICE (the kubernetes driver's sidecar,
	// which the pod's own rules redirect to) listens on ports above 1023.
	Ports [3]uint16
	// ExemptForTests are prefixes taken out of the fixed always-denied set, the host-address
	// check and the private ranges (not out of Denied, nor out of the policy): for tests whose
	// fake upstreams listen on loopback. Never set it in production.
	ExemptForTests []netip.Prefix
}

// Gateway is the egress gateway of a host's sandboxes: per attached sandbox a DNS server, an
// HTTP proxy and a transparent proxy on the sandbox's gateway address, all enforcing its Policy.
// It is safe for concurrent use.
//
// What it expects of the plumbing: the gateway address is on the host side of the sandbox's veth
// before Attach; the sandbox reaches gateway:53 (udp, tcp) and gateway:3128 directly; every other
// TCP connection of the sandbox is DNATed to gateway:15001 in the host's namespace, so that
// SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) gives its destination; nothing else leaves the sandbox.
// The plumbing may refuse connections whose verdict needs no name before the DNAT (netsetup does,
// at connect, for ports other than 80 and 443): Config.OnAnswer tells it what DNS answers open.
//
// How it decides, for every connection, the gateway dials only addresses it checked itself:
//   - by name (CONNECT host:port, absolute-URI requests, Host on port 80, TLS SNI on port 443):
//     the name and port must be allowed (Policy.AllowsName); the gateway resolves the name and
//     drops always-denied addresses (see denyReason: loopback, unspecified, link-local,
//     metadata, multicast/broadcast, the host's own addresses, Config.Denied, private ranges
//     not listed by an address rule at least as specific, port 853); it dials the original
//     destination only if that is one of those addresses (or pinned to the name), else one of
//     them; a name left without addresses is denied;
//   - by address (IP literals, other ports, 80/443 without Host/SNI): the address must pass the
//     always-denied set and be allowed by an address rule (Policy.AllowsAddr), or be pinned — an
//     answer of the sandbox's DNS server — to a name allowed on that port.
//
// Denials fail at once and visibly: 403 with a one-line reason (proxy, port 80), a TLS alert
// (port 443: unrecognized_name, or handshake_failure without SNI), a reset (other ports),
// NXDOMAIN (DNS). Every decision goes to Config.OnDecision: allowed ones per connection or
// request (DNS: per distinct name), denied ones each (DNS: once per name every few seconds).
type Gateway struct {
	cfg         Config
	resolver    Resolver
	dial        func(ctx context.Context, network, address string) (net.Conn, error)
	dialTimeout time.Duration
	maxConns    int
	pinTTL      time.Duration
	hosts       hostAddrs
	ports       [3]uint16                                  // DNS, proxy, transparent: the constants (tests without root change the first)
	origDst     func(*net.TCPConn) (netip.AddrPort, error) // originalDst; tests without NAT replace it
	headTimeout time.Duration                              // defaultHeadTimeout; tests shorten it

	mu        sync.Mutex
	closed    bool
	sandboxes map[string]*sandbox // nil value: being attached
}

// ErrClosed is returned by Attach after Close.
var ErrClosed = errors.New("egress: gateway closed")

// NewGateway returns a gateway with no sandbox attached. It enumerates the host's addresses (they
// are always denied; the list is refreshed every few seconds and on Attach).
func NewGateway(cfg Config) (*Gateway, error) {
	if cfg.DialTimeout < 0 || cfg.MaxConns < 0 || cfg.PinTTL < 0 {
		return nil, errors.New("egress: negative DialTimeout, MaxConns or PinTTL")
	}
	for _, p := range append(slices.Clone(cfg.Denied), cfg.ExemptForTests...) {
		if !p.IsValid() {
			return nil, fmt.Errorf("egress: invalid prefix %v", p)
		}
	}
	g := &Gateway{cfg: cfg, resolver: cfg.Resolver, dial: cfg.Dial, dialTimeout: cfg.DialTimeout,
		maxConns: cfg.MaxConns, sandboxes: map[string]*sandbox{}, ports: [3]uint16{DNSPort, ProxyPort, TransparentPort}, origDst: originalDst,
		headTimeout: defaultHeadTimeout}
	for i, p := range cfg.Ports {
		if p != 0 {
			g.ports[i] = p
		}
	}
	g.cfg.Denied = maskAll(cfg.Denied)
	g.cfg.ExemptForTests = maskAll(cfg.ExemptForTests)
	if g.resolver == nil {
		g.resolver = net.DefaultResolver
	}
	if g.dialTimeout == 0 {
		g.dialTimeout = defaultDialTimeout
	}
	if g.maxConns == 0 {
		g.maxConns = defaultMaxConns
	}
	if g.pinTTL = cfg.PinTTL; g.pinTTL == 0 {
		g.pinTTL = defaultPinTTL
	}
	if g.dial == nil {
		d := &net.Dialer{Timeout: g.dialTimeout}
		g.dial = d.DialContext
	}
	g.hosts.refresh()
	return g, nil
}

func maskAll(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, len(ps))
	for i, p := range ps {
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		out[i] = p.Masked()
	}
	return out
}

// Attach starts the gateway of a sandbox: it listens on listen:53 (udp and tcp), listen:3128 and
// listen:15001 and enforces p on what arrives there. listen must be an address of the host (the
// host side of the sandbox's veth); unless it is a loopback address, the sockets are bound to the
// interface that holds it, so that only packets arriving through that interface reach them.
func (g *Gateway) Attach(sandboxID string, listen netip.Addr, p Policy) error {
	if sandboxID == "" {
		return errors.New("egress: empty sandbox id")
	}
	listen = listen.Unmap()
	if !listen.IsValid() || listen.IsUnspecified() || listen.IsMulticast() {
		return fmt.Errorf("egress: cannot listen on %v", listen)
	}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	if _, ok := g.sandboxes[sandboxID]; ok {
		g.mu.Unlock()
		return fmt.Errorf("egress: sandbox %s is already attached", sandboxID)
	}
	g.sandboxes[sandboxID] = nil
	g.mu.Unlock()

	g.hosts.refresh()
	s, err := g.start(sandboxID, listen, p)

	g.mu.Lock()
	cur, ok := g.sandboxes[sandboxID]
	switch {
	case err != nil:
		if ok && cur == nil {
			delete(g.sandboxes, sandboxID)
		}
	case g.closed:
		err = ErrClosed
	case !ok || cur != nil:
		err = fmt.Errorf("egress: sandbox %s was detached while attaching", sandboxID)
	default:
		g.sandboxes[sandboxID] = s
	}
	g.mu.Unlock()
	if err != nil && s != nil {
		s.stop()
	}
	return err
}

// SetPolicy replaces the policy an attached sandbox's gateway enforces, from its next decision on
// (a sandbox taken from a warm pool gets its owner's policy this way). Names and addresses the
// gateway answered or pinned under the old policy are forgotten, so nothing allowed before is
// reachable through them (the pins Config.OnAnswer passed on are the plumbing's to forget:
// netsetup's Manager.SetPolicy). It fails for a sandbox that is not attached.
func (g *Gateway) SetPolicy(sandboxID string, p Policy) error {
	g.mu.Lock()
	s := g.sandboxes[sandboxID]
	g.mu.Unlock()
	if s == nil {
		return fmt.Errorf("egress: sandbox %s is not attached", sandboxID)
	}
	s.pol.Store(&Policy{BlockOutbound: p.BlockOutbound, Rules: slices.Clone(p.Rules)})
	s.mu.Lock()
	clear(s.pins)
	clear(s.dnsAllowedNames)
	clear(s.dnsDeniedNames)
	s.mu.Unlock()
	return nil
}

func (s *sandbox) policy() Policy { return *s.pol.Load() }

// Detach stops a sandbox's gateway: it closes its listeners and all its connections (proxied ones
// included) and waits for its goroutines. Detaching an unknown sandbox does nothing.
func (g *Gateway) Detach(sandboxID string) {
	g.mu.Lock()
	s := g.sandboxes[sandboxID]
	delete(g.sandboxes, sandboxID)
	g.mu.Unlock()
	if s != nil {
		s.stop()
	}
}

// Close detaches every sandbox; later Attach calls fail with ErrClosed.
func (g *Gateway) Close() error {
	g.mu.Lock()
	g.closed = true
	var all []*sandbox
	for id, s := range g.sandboxes {
		if s != nil {
			all = append(all, s)
		}
		delete(g.sandboxes, id)
	}
	g.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range all {
		wg.Go(s.stop)
	}
	wg.Wait()
	return nil
}

// sandbox is the gateway of one attached sandbox. Every goroutine it starts is counted in wg;
// stop ends them all.
type sandbox struct {
	g      *Gateway
	id     string
	listen netip.Addr
	pol    atomic.Pointer[Policy] // replaced whole by SetPolicy; read through policy()
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	slots  chan struct{} // connection slots
	dnsSem chan struct{}

	lns    []net.Listener
	dnsSrv []*dns.Server

	mu              sync.Mutex
	closed          bool
	conns           map[net.Conn]struct{}
	pins            map[netip.Addr]map[string]time.Time // address → names it was answered for → expiry
	lookups         map[string]*lookup
	dnsAllowedNames map[string]struct{}  // names reported allowed over DNS
	dnsDeniedNames  map[string]time.Time // names reported denied over DNS, when
	limitReport     time.Time
}

func (g *Gateway) start(id string, listen netip.Addr, p Policy) (*sandbox, error) {
	s := &sandbox{
		g: g, id: id, listen: listen,
		slots:           make(chan struct{}, g.maxConns),
		dnsSem:          make(chan struct{}, maxDNSInFlight),
		conns:           map[net.Conn]struct{}{},
		pins:            map[netip.Addr]map[string]time.Time{},
		lookups:         map[string]*lookup{},
		dnsAllowedNames: map[string]struct{}{},
		dnsDeniedNames:  map[string]time.Time{},
	}
	s.pol.Store(&Policy{BlockOutbound: p.BlockOutbound, Rules: slices.Clone(p.Rules)})
	s.ctx, s.cancel = context.WithCancel(context.Background())

	dev := ""
	if !listen.IsLoopback() {
		dev = interfaceOf(listen)
	}
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		if dev == "" {
			return nil
		}
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), dev) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("bind to device %s: %w", dev, serr)
		}
		return nil
	}}
	tcp, udp := "tcp4", "udp4"
	if listen.Is6() {
		tcp, udp = "tcp6", "udp6"
	}
	at := func(port uint16) string { return netip.AddrPortFrom(listen, port).String() }
	fail := func(err error) (*sandbox, error) {
		s.stop()
		return nil, fmt.Errorf("egress: sandbox %s: %w", id, err)
	}

	pc, err := lc.ListenPacket(context.Background(), udp, at(g.ports[0]))
	if err != nil {
		return fail(err)
	}
	s.dnsSrv = append(s.dnsSrv, &dns.Server{PacketConn: pc, Handler: s})
	var lns [3]net.Listener
	for i, port := range g.ports {
		ln, err := lc.Listen(context.Background(), tcp, at(port))
		if err != nil {
			pc.Close()
			for _, l := range lns[:i] {
				l.Close()
			}
			return fail(err)
		}
		lns[i] = ln
	}
	s.dnsSrv = append(s.dnsSrv, &dns.Server{Listener: &slotListener{Listener: lns[0], s: s}, Handler: s})
	s.lns = []net.Listener{lns[1], lns[2]}

	for i, srv := range s.dnsSrv {
		started := make(chan struct{})
		errc := make(chan error, 1)
		srv.NotifyStartedFunc = func() { close(started) }
		s.wg.Go(func() { errc <- srv.ActivateAndServe() })
		select {
		case <-started:
		case err := <-errc:
			s.dnsSrv = s.dnsSrv[:i] // the started ones are shut down by stop
			pc.Close()
			for _, l := range lns {
				l.Close()
			}
			return fail(fmt.Errorf("dns server: %w", err))
		}
	}
	s.wg.Go(func() { s.acceptLoop(lns[1], s.serveProxy) })
	s.wg.Go(func() { s.acceptLoop(lns[2], s.serveTransparent) })
	return s, nil
}

// interfaceOf names the interface that holds a ("" if none does). One netlink dump of the
// host's addresses: asking each interface for its own (net.Interface.Addrs) dumps them all every
// time, quadratic with a thousand sandbox veths.
func interfaceOf(a netip.Addr) string {
	family := netlink.FAMILY_V4
	if a.Is6() && !a.Is4In6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(nil, family)
	if err != nil {
		return ""
	}
	for _, x := range addrs {
		if y, ok := netip.AddrFromSlice(x.IP); ok && y.Unmap() == a.Unmap() {
			if l, err := netlink.LinkByIndex(x.LinkIndex); err == nil { // one link, not a dump
				return l.Attrs().Name
			}
		}
	}
	return ""
}

// stop closes the listeners and connections and waits for the goroutines. Idempotent.
func (s *sandbox) stop() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return
	}
	s.closed = true
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	s.cancel()
	for _, ln := range s.lns {
		ln.Close()
	}
	for _, c := range conns {
		c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	for _, srv := range s.dnsSrv {
		srv.ShutdownContext(ctx)
	}
	cancel()
	s.wg.Wait()
}

// track registers a connection to be closed by stop; false if the sandbox is stopping.
func (s *sandbox) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *sandbox) untrackClose(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

func (s *sandbox) acquire() bool {
	select {
	case s.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (s *sandbox) release() { <-s.slots }

// overLimit resets a connection past the sandbox's limit and reports it (at most once a second).
func (s *sandbox) overLimit(c net.Conn, proto string) {
	reset(c)
	s.mu.Lock()
	now := time.Now()
	report := now.Sub(s.limitReport) >= time.Second
	if report {
		s.limitReport = now
	}
	s.mu.Unlock()
	if report {
		s.report(Decision{Proto: proto, Reason: fmt.Sprintf("too many concurrent connections (limit %d)", s.g.maxConns)})
	}
}

// acceptLoop serves a TCP listener until it is closed: one goroutine per connection, within the
// sandbox's connection slots.
func (s *sandbox) acceptLoop(ln net.Listener, serve func(*net.TCPConn)) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second) // EMFILE and the like
			select {
			case <-time.After(delay):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		delay = 0
		tc := c.(*net.TCPConn)
		if !s.acquire() {
			s.overLimit(tc, "tcp")
			continue
		}
		if !s.track(tc) {
			s.release()
			tc.Close()
			return
		}
		s.wg.Go(func() {
			defer s.release()
			defer s.untrackClose(tc)
			serve(tc)
		})
	}
}

// slotListener gives the DNS-over-TCP server's connections slots of the sandbox and tracks them.
type slotListener struct {
	net.Listener
	s *sandbox
}

func (l *slotListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if !l.s.acquire() {
			l.s.overLimit(c, "dns")
			continue
		}
		if !l.s.track(c) {
			l.s.release()
			c.Close()
			return nil, net.ErrClosed
		}
		return &slotConn{Conn: c, s: l.s}, nil
	}
}

type slotConn struct {
	net.Conn
	s    *sandbox
	once sync.Once
}

func (c *slotConn) Close() error {
	c.once.Do(func() {
		c.s.untrackClose(c.Conn)
		c.s.release()
	})
	return nil
}

func (s *sandbox) report(d Decision) {
	d.SandboxID = s.id
	if f := s.g.cfg.OnDecision; f != nil {
		f(d)
	}
}

// --- resolution, pins, checks

type lookup struct {
	done  chan struct{}
	addrs []netip.Addr
	err   error
	exp   time.Time
}

// lookup resolves name (both families) through the gateway's resolver, sharing concurrent and
// recent (lookupCacheTTL) lookups of the sandbox.
func (s *sandbox) lookup(ctx context.Context, name string) ([]netip.Addr, error) {
	now := time.Now()
	s.mu.Lock()
	l := s.lookups[name]
	if l == nil || (isDone(l.done) && now.After(l.exp)) {
		if len(s.lookups) >= maxNames {
			for k, v := range s.lookups {
				if isDone(v.done) && now.After(v.exp) {
					delete(s.lookups, k)
				}
			}
		}
		l = &lookup{done: make(chan struct{})}
		if len(s.lookups) < maxNames {
			s.lookups[name] = l
		}
		s.mu.Unlock()
		lctx, cancel := context.WithTimeout(s.ctx, min(lookupTimeout, s.g.dialTimeout))
		addrs, err := s.g.resolver.LookupNetIP(lctx, "ip", name)
		cancel()
		for i, a := range addrs {
			addrs[i] = a.Unmap()
		}
		l.addrs, l.err, l.exp = addrs, err, time.Now().Add(lookupCacheTTL)
		close(l.done)
		return addrs, err
	}
	s.mu.Unlock()
	select {
	case <-l.done:
		return l.addrs, l.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func isDone(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// pin remembers that addrs were answered for name.
func (s *sandbox) pin(name string, addrs []netip.Addr) {
	now := time.Now()
	exp := now.Add(s.g.pinTTL)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range addrs {
		names := s.pins[a]
		if names == nil {
			if len(s.pins) >= maxPins {
				s.sweepPinsLocked(now)
			}
			names = map[string]time.Time{}
			s.pins[a] = names
		}
		if _, ok := names[name]; !ok && len(names) >= 16 {
			for n := range names { // keep the set small: drop one
				delete(names, n)
				break
			}
		}
		names[name] = exp
	}
}

func (s *sandbox) sweepPinsLocked(now time.Time) {
	for a, names := range s.pins {
		for n, exp := range names {
			if now.After(exp) {
				delete(names, n)
			}
		}
		if len(names) == 0 {
			delete(s.pins, a)
		}
	}
	for a := range s.pins { // still full: drop arbitrary ones
		if len(s.pins) < maxPins {
			break
		}
		delete(s.pins, a)
	}
}

// pinnedNames lists the names a was answered for (unexpired), sorted.
func (s *sandbox) pinnedNames(a netip.Addr) []string {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for n, exp := range s.pins[a] {
		if now.Before(exp) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// checkAddr checks a direct connection to a:port. It returns "" if allowed, else why not, and
// the name that allowed it or that a was answered for (if any).
func (s *sandbox) checkAddr(a netip.Addr, port uint16) (host, reason string) {
	a = a.Unmap().WithZone("")
	names := s.pinnedNames(a)
	if len(names) > 0 {
		host = names[0]
	}
	pol := s.policy() // one policy for the whole decision
	if r := s.g.denyReason(a, port, pol); r != "" {
		return host, r
	}
	if pol.AllowsAddr(a, port) {
		return host, ""
	}
	for _, n := range names {
		if pol.AllowsName(n, port) {
			return n, ""
		}
	}
	if host != "" {
		return host, fmt.Sprintf("port %d is not allowed for %s (%s)", port, host, a)
	}
	return "", fmt.Sprintf("%s is not on the allow list", netip.AddrPortFrom(a, port))
}

// resolveChecked checks a connection to name:port and resolves name. addrs are the resolved addresses
// the gateway may dial (IPv4 first); reason != "" is a denial (first: a resolved address, if
// any); err is a resolution failure.
func (s *sandbox) resolveChecked(ctx context.Context, name string, port uint16) (addrs []netip.Addr, first netip.Addr, reason string, err error) {
	if port == dotPort {
		return nil, first, "port 853 (DNS over TLS) is always denied", nil
	}
	if err := checkName(name); err != nil {
		return nil, first, fmt.Sprintf("invalid host name %q: %v", truncate(name, 64), err), nil
	}
	pol := s.policy() // one policy for the whole decision
	if !pol.AllowsName(name, port) {
		if pol.AllowsName(name, 0) {
			return nil, first, fmt.Sprintf("port %d is not allowed for %s", port, name), nil
		}
		return nil, first, fmt.Sprintf("%s is not on the allow list", name), nil
	}
	all, err := s.lookup(ctx, name)
	if err != nil {
		return nil, first, "", err
	}
	var why string
	for _, a := range all {
		if r := s.g.denyReason(a, port, pol); r != "" {
			if why == "" {
				why = r
			}
			continue
		}
		addrs = append(addrs, a)
	}
	if len(all) > 0 {
		first = all[0]
	}
	if len(addrs) == 0 {
		if why == "" {
			return nil, first, "", &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
		}
		return nil, first, fmt.Sprintf("%s resolves only to always-denied addresses (%s)", name, why), nil
	}
	slices.SortStableFunc(addrs, func(a, b netip.Addr) int {
		switch {
		case a.Is4() == b.Is4():
			return 0
		case a.Is4():
			return -1
		default:
			return 1
		}
	})
	return addrs, addrs[0], "", nil
}

// open checks a connection to host:port (a name or an IP literal) for the sandbox, reports the
// decision, and dials an address the gateway checked. orig is the original destination of a
// transparently proxied connection (zero otherwise): it is dialled if it is an address the
// gateway resolved for host, else a resolved address is. denied != "" is a denial; err a failure
// to resolve or connect. The upstream connection is tracked: close it with untrackClose.
func (s *sandbox) open(host string, port uint16, proto string, orig netip.AddrPort) (up net.Conn, denied string, err error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.g.dialTimeout)
	defer cancel()
	d := Decision{Port: port, Proto: proto}
	var addrs []netip.Addr
	if a, ok := parseIPHost(host); ok {
		d.Addr = a
		if d.Host, d.Reason = s.checkAddr(a, port); d.Reason != "" {
			s.report(d)
			return nil, d.Reason, nil
		}
		addrs = []netip.Addr{a}
	} else {
		d.Host = normalizeName(host)
		var reason string
		addrs, d.Addr, reason, err = s.resolveChecked(ctx, d.Host, port)
		if reason != "" {
			d.Reason = reason
			s.report(d)
			return nil, reason, nil
		}
		if err != nil {
			d.Allowed, d.Detail = true, "cannot resolve: "+err.Error()
			s.report(d)
			return nil, "", fmt.Errorf("cannot resolve %s: %w", d.Host, err)
		}
		if o := orig.Addr().Unmap(); o.IsValid() {
			switch {
			case slices.Contains(addrs, o):
				addrs = append([]netip.Addr{o}, slices.DeleteFunc(addrs, func(x netip.Addr) bool { return x == o })...)
			case slices.Contains(s.pinnedNames(o), d.Host) && s.g.denyReason(o, port, s.policy()) == "":
				addrs = append([]netip.Addr{o}, addrs...)
			default:
				d.Detail = fmt.Sprintf("original destination %s is not an address of %s; connected to the gateway's own resolution instead", o, d.Host)
			}
		}
	}
	d.Allowed = true
	var errs []error
	for _, a := range addrs {
		d.Addr = a
		c, err := s.g.dial(ctx, "tcp", netip.AddrPortFrom(a, port).String())
		if err == nil {
			if !s.track(c) {
				c.Close()
				return nil, "", net.ErrClosed
			}
			s.report(d)
			return c, "", nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	err = errors.Join(errs...)
	d.Detail = joinDetail(d.Detail, "connect failed: "+err.Error())
	s.report(d)
	return nil, "", err
}

func joinDetail(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// parseIPHost reads an IP literal host ("1.2.3.4", "::1", "[::1]").
func parseIPHost(h string) (netip.Addr, bool) {
	if len(h) > 1 && h[0] == '[' && h[len(h)-1] == ']' {
		h = h[1 : len(h)-1]
	}
	a, err := netip.ParseAddr(h)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap().WithZone(""), true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// --- connection helpers

// reset closes c with a TCP RST.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	c.Close()
}

// splice copies between client and up in both directions until both are done, after sending
// what was already read from each (clientBuf to up, upBuf to client). Half-closes are passed on.
func (s *sandbox) splice(client net.Conn, clientBuf []byte, up net.Conn, upBuf []byte) {
	closeBoth := func() { client.Close(); up.Close() }
	if len(upBuf) > 0 {
		if _, err := client.Write(upBuf); err != nil {
			closeBoth()
			return
		}
	}
	if len(clientBuf) > 0 {
		if _, err := up.Write(clientBuf); err != nil {
			closeBoth()
			return
		}
	}
	done := make(chan struct{})
	s.wg.Go(func() {
		defer close(done)
		if _, err := io.Copy(client, up); err != nil {
			closeBoth()
		} else {
			closeWrite(client)
		}
	})
	if _, err := io.Copy(up, client); err != nil {
		closeBoth()
	} else {
		closeWrite(up)
	}
	<-done
	closeBoth()
}
