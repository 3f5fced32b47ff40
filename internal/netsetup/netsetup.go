// Package netsetup is the per-sandbox network plumbing of the container driver: a named network
// namespace, a veth pair to the host, addresses and routes, and nftables rules in the sandbox's
// namespace and in the host's, all made from Go (netlink and nftables libraries, no CLI).
//
// Address plan: sandbox i of the pool (default 10.213.0.0/16) gets the i-th /30: .1 on the host
// side of the veth (the gateway address, where the egress gateway listens) and .2 on the sandbox
// side (eth0 in the sandbox's namespace), with the default route via the gateway. IPv6 is routed
// to the host too (a ULA /126 derived from the /30, fd5b:d000::<IPv4>) so that it can be refused
// there — TCP with a reset, the rest with ICMPv6 administratively prohibited — and audited.
//
// The host's rules live in one table of the manager's own, "inet sandboxd_<tag>" (tag: a hash of
// the state dir, so managers with different state dirs never touch each other's rules), with a
// chain per sandbox selected by the veth's name:
//
//   - prerouting (filter, priority -150, before the DNAT): the connect check, one chain for all
//     sandboxes (connect.go). A new TCP connection to a port other than 80 and 443 needs no host
//     name to be decided: unless an address rule, a pinned DNS answer (Pin, called by the
//     gateway before the answer leaves) or unrestricted egress allows its address and port, it
//     is refused here — a reset to its SYN, audited — instead of being handed to the gateway;
//   - prerouting (nat): the sandbox's TCP to anything but its gateway address is DNATed to
//     gateway:15001, the egress gateway's transparent proxy (which reads SO_ORIGINAL_DST and
//     decides 80 and 443 by name, and checks the rest again) — except when the policy allows
//     nothing (BlockOutbound with no rules): then such TCP is refused (reset, audited) at
//     connect, as without any network;
//   - prerouting (filter, after the DNAT): from the sandbox only its gateway's udp/53, tcp/53,
//     tcp/3128 and tcp/15001 are accepted; with unrestricted egress (Policy.BlockOutbound false)
//     UDP and ICMP echo are also accepted (then forwarded and masqueraded) except to the always-denied
//     set and to port 853. Everything else — IPv6 included — is logged to an NFLOG group the
//     manager reads and rejected (TCP reset or ICMP administratively prohibited: it fails fast);
//   - input and forward: a second layer that drops whatever the prerouting chain did not accept,
//     and nothing new is forwarded into a sandbox.
//
// Filtering before routing means a sandbox's packet is refused whatever the host's forwarding
// setting; net.ipv4.ip_forward is switched on by the first sandbox with unrestricted egress (and
// put back by Close). Inside the sandbox's namespace (where it has no CAP_NET_ADMIN to change
// them), a table DNATs DNS sent to 127.0.0.1:53 to the gateway (glibc's fallback when
// /etc/resolv.conf is unreadable) and lets packets out of lo and eth0 only.
//
// Logged packets become egress.Decisions (Allowed false) through Config.OnDecision, at most
// Config.ReportPerSecond per sandbox and second individually, the rest as a counted summary; the
// kernel also caps each sandbox's logging rate.
//
// The shape of a sandbox's policy (BlockOutbound, and whether Rules is empty) fixes its chains;
// SetPolicy swaps the rest — its address rules and pins — in one transaction.
//
// Crash safety: a manager's veths carry the alias "sandboxd-netsetup <tag> <id>"; New deletes the
// veths of its tag and the table a crashed process left (the first Setup creates it anew), so
// nothing of a crashed process's rules or links survives a restart. The namespace files are bind
// mounts under StateDir/ns: in a process with a private mount namespace (the container
// driver's) the mounts die with it; the files are left for List and Teardown.
package netsetup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/egress"
)

// Ports of the egress gateway on the gateway address (egress.DNSPort, ProxyPort, TransparentPort).
const (
	DNSPort         = 53
	ProxyPort       = 3128
	TransparentPort = 15001
)

// DefaultPool is where sandbox addresses come from unless Config.Pool says otherwise.
var DefaultPool = netip.MustParsePrefix("10.213.0.0/16")

// DefaultLogGroup is the first NFLOG group a manager tries; it takes the next free one if another
// process (or manager) holds it.
const DefaultLogGroup = 23504

const (
	ifPrefix       = "sbx"               // host-side veth names: sbx + 10 hex chars
	peerName       = "eth0"              // the sandbox side, inside its namespace
	aliasPrefix    = "sandboxd-netsetup" // IFLA_IFALIAS of our veths: "<prefix> <tag> <id>"
	nsSubdir       = "ns"
	defaultReports = 10 // decisions per sandbox and second reported one by one
	kernelLogRate  = 100
	kernelLogBurst = 200
	logSnaplen     = 80 // bytes of each logged packet copied to us: IPv6 + TCP headers fit
	maxGroupProbes = 64
)

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Config configures a Manager.
type Config struct {
	// StateDir is the manager's own directory (created if missing): namespace files live in
	// StateDir/ns. It identifies the manager across restarts: one manager per StateDir at a time.
	StateDir string
	// Pool is the IPv4 prefix sandbox /30s are taken from (zero: DefaultPool). Managers on one host
	// need disjoint pools.
	Pool netip.Prefix
	// Denied are further IPv4 destinations a sandbox with unrestricted egress must not reach by
	// UDP or ICMP (e.g. the API's addresses). Built in: loopback, private (10/8, 172.16/12,
	// 192.168/16), shared (100.64/10), link-local (169.254/16: metadata), benchmarking
	// (198.18/15), 0/8, 192.0.0/24, everything from 224.0.0.0 up, the pool, and the host's own
	// addresses — the egress gateway's always-denied and private ranges. An allow list never opens
	// them to UDP. (TCP is the gateway's to decide.)
	Denied []netip.Prefix
	// OnDecision receives a Decision for every refused packet that was logged (rate-limited per
	// sandbox). It is called from one goroutine and must not block for long. May be nil.
	OnDecision func(egress.Decision)
	// LogGroup is the first NFLOG group to try (0: DefaultLogGroup).
	LogGroup uint16
	// ReportPerSecond is how many decisions per sandbox and second are reported one by one; the
	// rest are summed up in one summary decision per second (0: 10).
	ReportPerSecond int
}

// Sandbox is the network plumbing of one sandbox.
type Sandbox struct {
	ID      string
	NSPath  string       // the network namespace (a bind-mounted nsfs file): join it, e.g. in config.json
	HostIf  string       // host side of the veth pair
	Gateway netip.Addr   // the host side's address: where the egress gateway must listen
	Addr    netip.Addr   // the sandbox's address on its eth0
	Prefix  netip.Prefix // the sandbox's /30
}

// Manager sets up and tears down sandboxes' network plumbing. It is safe for concurrent use.
type Manager struct {
	cfg      Config
	pool     netip.Prefix
	tag      string
	nsDir    string
	tbl      *nftables.Table // made by the first Setup (tableUp), under nftMu
	denied   []netip.Prefix  // the always-denied IPv4 prefixes of the host rules (without host addresses)
	ipv6     bool            // IPv6 is routed to the host (else refused inside the sandbox, unaudited)
	hostNS   netns.NsHandle
	nl       *netlink.Handle // host namespace
	nftMu    sync.Mutex
	nft      *nftables.Conn // host namespace, lasting
	pinMu    sync.Mutex
	pinNft   *nftables.Conn // host namespace, lasting: Pin and SetPolicy (not held up by setups' batches)
	tableUp  bool
	log      *nflogReader
	reports  *reporter
	teardown sync.WaitGroup // background teardowns

	mu        sync.Mutex
	closed    bool
	boxes     map[string]*box
	pending   map[string]chan struct{} // teardowns in progress
	byIfindex map[int]string
	bgErrs    []error
	fwdOrig   string // net.ipv4.ip_forward before we switched it on ("" if we did not)
	open      int    // sandboxes with unrestricted egress
}

type box struct {
	Sandbox
	ready   chan struct{} // closed when Setup is done with it (a teardown waits for that)
	index   int
	ifindex int
	policy  egress.Policy
	rules   bool // host rules installed
	connect bool // TCP is redirected to the gateway, through the connect check
	pinning bool // and needs pins (BlockOutbound with rules)

	pinMu     sync.Mutex
	addrRules bool               // it has an address set and chain (its policy has address rules)
	pins      map[pinKey]pinRec  // its elements of the pins set
	named     map[[4]byte]pinRec // the name each address was last answered for, until when
	gone      bool               // torn down: no more pins
}

// New opens a manager: it removes what a crashed manager with the same StateDir left (its veths,
// its host table) and starts reading an NFLOG group; the host table is created by the first
// Setup. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and must be called from the host's network
// namespace, in a process whose mount namespace is private (or the namespace files' bind mounts
// outlive a crash until Teardown).
func New(cfg Config) (*Manager, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("netsetup: Config.StateDir is required")
	}
	stateDir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	pool := cfg.Pool
	if !pool.IsValid() {
		pool = DefaultPool
	}
	pool = pool.Masked()
	if !pool.Addr().Is4() || pool.Bits() > 30 {
		return nil, fmt.Errorf("netsetup: pool %s must be an IPv4 prefix of /30 or larger", pool)
	}
	if cfg.ReportPerSecond <= 0 {
		cfg.ReportPerSecond = defaultReports
	}
	m := &Manager{
		cfg: cfg, pool: pool, nsDir: filepath.Join(stateDir, nsSubdir),
		boxes: map[string]*box{}, pending: map[string]chan struct{}{}, byIfindex: map[int]string{},
	}
	sum := sha256.Sum256([]byte(stateDir))
	m.tag = hex.EncodeToString(sum[:4])
	m.tbl = &nftables.Table{Family: nftables.TableFamilyINet, Name: "sandboxd_" + m.tag}
	m.denied = append(alwaysDenied(), pool)
	for _, p := range cfg.Denied {
		if p.Addr().Is4() {
			m.denied = append(m.denied, p.Masked())
		}
	}
	if err := os.MkdirAll(m.nsDir, 0o700); err != nil {
		return nil, fmt.Errorf("netsetup: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			m.closeHandles()
		}
	}()
	// Everything below must be made in the host namespace: stay on one thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if m.hostNS, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("netsetup: host network namespace: %w", err)
	}
	if m.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
		return nil, fmt.Errorf("netsetup: netlink: %w", err)
	}
	if m.nft, err = nftables.New(nftables.AsLasting()); err != nil {
		return nil, fmt.Errorf("netsetup: nftables: %w", err)
	}
	if m.pinNft, err = nftables.New(nftables.AsLasting()); err != nil {
		return nil, fmt.Errorf("netsetup: nftables: %w", err)
	}
	m.ipv6 = readSysctl("net/ipv6/conf/default/disable_ipv6") == "0"
	if err := m.removeStaleLinks(); err != nil {
		return nil, err
	}
	m.reports = newReporter(cfg.ReportPerSecond, cfg.OnDecision)
	group := cfg.LogGroup
	if group == 0 {
		group = DefaultLogGroup
	}
	if m.log, err = openNflog(group, maxGroupProbes, m.onPacket); err != nil {
		return nil, fmt.Errorf("netsetup: %w", err)
	}
	// The table itself is made by the first Setup: a manager that never sets a sandbox up leaves
	// nothing behind, even without Close.
	if err := m.deleteTable(); err != nil {
		return nil, fmt.Errorf("netsetup: delete stale table %s: %w", m.tbl.Name, err)
	}
	ok = true
	return m, nil
}

// alwaysDenied returns the IPv4 prefixes a sandbox never reaches by UDP or ICMP, whatever its
// policy: loopback, private, shared (CGNAT), link-local (metadata) and reserved ranges. Multicast,
// broadcast and 240/4 (everything from 224.0.0.0 up) and the host's own addresses are refused by
// the rules too; a Manager adds its pool and Config.Denied.
func alwaysDenied() []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range []string{
		"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
		"172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
	} {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}

// Table is the name of the manager's nftables table (family inet).
func (m *Manager) Table() string { return m.tbl.Name }

// LogGroup is the NFLOG group the manager reads.
func (m *Manager) LogGroup() uint16 { return m.log.group }

// Pool is the prefix sandbox addresses come from.
func (m *Manager) Pool() netip.Prefix { return m.pool }

// HostIfName is the host-side veth name of sandbox id for this manager (also after a restart).
func (m *Manager) HostIfName(id string) string {
	sum := sha256.Sum256([]byte(m.tag + "/" + id))
	return ifPrefix + hex.EncodeToString(sum[:5])
}

// Released reports whether nothing of sandbox id's plumbing is left: not set up, and no teardown
// in progress (the background part ends when the kernel has destroyed the namespace and its
// veth).
func (m *Manager) Released(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, busy := m.pending[id]
	_, live := m.boxes[id]
	return !busy && !live
}

// SetPolicy makes p sandbox id's policy. The host chains made at Setup depend only on its shape —
// BlockOutbound, and whether Rules is empty — so p must have the shape of the policy the sandbox
// was set up with (ErrShape otherwise). SetPolicy replaces the sandbox's address set with p's
// address rules and empties its pin set, in one transaction: nothing answered under the old
// policy stays reachable by address (the gateway forgets its pins in its own SetPolicy). Call it
// before the gateway's SetPolicy, with no other SetPolicy of the same sandbox in flight.
func (m *Manager) SetPolicy(id string, p egress.Policy) error {
	m.mu.Lock()
	b, ok := m.boxes[id]
	var old egress.Policy
	if ok {
		old = b.policy
	}
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("netsetup: sandbox %s is not set up", id)
	}
	if !SameShape(old, p) {
		return fmt.Errorf("netsetup: sandbox %s: %w", id, ErrShape)
	}
	<-b.ready
	if b.rules && b.connect {
		if err := m.setPolicySets(b, p); err != nil {
			return fmt.Errorf("netsetup: sandbox %s: set policy: %w", id, err)
		}
	}
	m.mu.Lock()
	b.policy = p
	m.mu.Unlock()
	return nil
}

// ErrShape is returned by SetPolicy for a policy that would need other host rules.
var ErrShape = errors.New("the policy needs other host rules than the sandbox was set up with")

// SameShape reports whether policies a and b get the same host rules.
func SameShape(a, b egress.Policy) bool {
	return a.BlockOutbound == b.BlockOutbound && (len(a.Rules) == 0) == (len(b.Rules) == 0)
}

// NSPath is where sandbox id's network namespace is bound.
func (m *Manager) NSPath(id string) string { return filepath.Join(m.nsDir, id) }

func (m *Manager) alias(id string) string { return aliasPrefix + " " + m.tag + " " + id }

// Setup creates sandbox id's network namespace, veth pair, addresses, routes and rules, for
// policy p. On error nothing of it is left. It fails if id is already set up.
func (m *Manager) Setup(ctx context.Context, id string, p egress.Policy) (*Sandbox, error) {
	if !idPattern.MatchString(id) {
		return nil, fmt.Errorf("netsetup: invalid sandbox id %q", id)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// A teardown of the same id still in progress holds its names.
	for {
		m.mu.Lock()
		ch := m.pending[id]
		m.mu.Unlock()
		if ch == nil {
			break
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, errors.New("netsetup: manager closed")
	}
	if _, dup := m.boxes[id]; dup {
		m.mu.Unlock()
		return nil, fmt.Errorf("netsetup: sandbox %s is already set up", id)
	}
	b := &box{Sandbox: Sandbox{ID: id, NSPath: m.NSPath(id), HostIf: m.HostIfName(id)}, policy: p, index: -1, ready: make(chan struct{}),
		connect: connects(p), pinning: pins(p), pins: map[pinKey]pinRec{}, named: map[[4]byte]pinRec{}}
	m.boxes[id] = b
	m.mu.Unlock()

	err := m.setup(b)
	defer close(b.ready)
	if err != nil {
		m.mu.Lock()
		delete(m.boxes, id)
		m.mu.Unlock()
		if cerr := m.undo(b); cerr != nil {
			err = fmt.Errorf("%w (cleaning up: %v)", err, cerr)
		}
		return nil, fmt.Errorf("netsetup: sandbox %s: %w", id, err)
	}
	return &b.Sandbox, nil
}

func (m *Manager) setup(b *box) error {
	idx, err := m.allocate()
	if err != nil {
		return err
	}
	b.index = idx
	b.Prefix, b.Gateway, b.Addr = slot(m.pool, idx)
	if !b.policy.BlockOutbound {
		if err := m.forwardOn(); err != nil {
			return err
		}
	}
	// Host rules first: the veth is confined from the moment it exists.
	if err := m.addRules(b); err != nil {
		return fmt.Errorf("host rules: %w", err)
	}
	b.rules = true
	ns, err := m.createNS(b)
	if err != nil {
		return err
	}
	defer ns.Close()
	return m.connect(b, ns)
}

// undo removes whatever a failed setup made, synchronously.
func (m *Manager) undo(b *box) error {
	var errs []error
	if b.rules {
		if err := m.delRules(b); err != nil {
			errs = append(errs, err)
		}
	}
	if err := m.removePlumbing(b.ID); err != nil {
		errs = append(errs, err)
	}
	m.release(b)
	return errors.Join(errs...)
}

// createNS makes a new network namespace, binds it at b.NSPath and configures what must be done
// from inside (sysctls, lo, the sandbox's own nft table). It returns a handle to it.
func (m *Manager) createNS(b *box) (netns.NsHandle, error) {
	f, err := os.OpenFile(b.NSPath, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return netns.None(), fmt.Errorf("namespace file: %w", err)
	}
	f.Close()
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		// A thread whose namespace could not be restored is never given back: the goroutine
		// ends locked, and the runtime ends the thread.
		runtime.LockOSThread()
		ns, err := m.insideNS(b)
		if rerr := netns.Set(m.hostNS); rerr != nil {
			if ns.IsOpen() {
				ns.Close()
			}
			res <- result{netns.None(), fmt.Errorf("back to the host namespace: %w", rerr)}
			return
		}
		runtime.UnlockOSThread()
		res <- result{ns, err}
	}()
	r := <-res
	return r.ns, r.err
}

// insideNS runs on a locked thread: it unshares a new network namespace, binds it, and sets it up
// from inside.
func (m *Manager) insideNS(b *box) (netns.NsHandle, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return netns.None(), fmt.Errorf("unshare: %w", err)
	}
	self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
	if err := unix.Mount(self, b.NSPath, "", unix.MS_BIND, ""); err != nil {
		return netns.None(), fmt.Errorf("bind the namespace: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return netns.None(), err
	}
	fail := func(err error) (netns.NsHandle, error) {
		ns.Close()
		return netns.None(), err
	}
	// Before eth0 exists, so that it inherits them: no DAD, router solicitations or RAs on the
	// sandbox's link; 127.0.0.1:53 may be DNATed out of eth0 (route_localnet).
	sysctls := []struct{ key, val string }{{"net/ipv4/conf/all/route_localnet", "1"}}
	if m.ipv6 {
		sysctls = append(sysctls, []struct{ key, val string }{
			{"net/ipv6/conf/default/accept_dad", "0"},
			{"net/ipv6/conf/default/router_solicitations", "0"},
			{"net/ipv6/conf/default/accept_ra", "0"},
		}...)
	}
	for _, s := range sysctls {
		if err := writeSysctl(s.key, s.val); err != nil {
			return fail(err)
		}
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fail(fmt.Errorf("lo up: %w", err))
	}
	if err := m.sandboxRules(b); err != nil {
		return fail(fmt.Errorf("sandbox rules: %w", err))
	}
	return ns, nil
}

// connect creates the veth pair with its peer in ns, and sets addresses and routes.
func (m *Manager) connect(b *box, ns netns.NsHandle) error {
	la := netlink.NewLinkAttrs()
	la.Name = b.HostIf
	la.Flags = net.FlagUp
	veth := &netlink.Veth{LinkAttrs: la, PeerName: peerName, PeerNamespace: netlink.NsFd(ns), PeerTxQLen: -1}
	if err := m.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s: %w", b.HostIf, err)
	}
	b.ifindex = veth.Index
	m.mu.Lock()
	m.byIfindex[b.ifindex] = b.ID
	m.mu.Unlock()
	// The alias names the sandbox (for List and for New after a crash); the kernel ignores it
	// when the link is created.
	if err := m.nl.LinkSetAlias(veth, m.alias(b.ID)); err != nil {
		return fmt.Errorf("veth alias: %w", err)
	}
	if err := m.nl.AddrAdd(veth, &netlink.Addr{IPNet: ipnet(b.Gateway, b.Prefix.Bits())}); err != nil {
		return fmt.Errorf("gateway address: %w", err)
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	eth, err := h.LinkByName(peerName)
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", peerName, err)
	}
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(b.Addr, b.Prefix.Bits())}); err != nil {
		return fmt.Errorf("sandbox address: %w", err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("sandbox %s up: %w", peerName, err)
	}
	gw := net.IP(b.Gateway.AsSlice())
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw, Flags: int(netlink.FLAG_ONLINK)}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	// The kernel activates a link's queueing (and operstate) asynchronously after the carrier
	// comes on (linkwatch); until then it drops what is sent, and the sandbox's first packet
	// would wait for a retransmission (an ARP retry: 1 s). Wait until both ends are up.
	deadline := time.Now().Add(2 * time.Second)
	var macs [2]net.HardwareAddr // sandbox side, host side
	for i, side := range []struct {
		h    *netlink.Handle
		name string
	}{{h, peerName}, {m.nl, b.HostIf}} {
		for {
			l, err := side.h.LinkByName(side.name)
			if err != nil {
				return fmt.Errorf("%s: %w", side.name, err)
			}
			if l.Attrs().OperState == netlink.OperUp {
				macs[i] = l.Attrs().HardwareAddr
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s is not up after 2s (operstate %v)", side.name, l.Attrs().OperState)
			}
			time.Sleep(50 * time.Microsecond)
		}
	}
	if !m.ipv6 {
		return nil
	}
	// IPv6 addresses once the links are ready (after the above, under RTNL, the kernel is done
	// bringing them up): without DAD they are usable at once, not tentative.
	_, gw6, addr6 := slot6(b.Prefix)
	if err := m.nl.AddrAdd(veth, &netlink.Addr{IPNet: ipnet(gw6, 126), Flags: unix.IFA_F_NODAD}); err != nil {
		return fmt.Errorf("gateway IPv6 address: %w", err)
	}
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(addr6, 126), Flags: unix.IFA_F_NODAD}); err != nil {
		return fmt.Errorf("sandbox IPv6 address: %w", err)
	}
	r := &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.IP(gw6.AsSlice()), Family: netlink.FAMILY_V6,
		Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, Flags: int(netlink.FLAG_ONLINK)}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("IPv6 default route: %w", err)
	}
	// A kernel worker finishes adding an IPv6 address (its local route, its multicast groups)
	// after AddrAdd returns; until then packets to it are not delivered. Wait for both.
	for _, side := range []struct {
		h    *netlink.Handle
		addr netip.Addr
	}{{m.nl, gw6}, {h, addr6}} {
		for {
			rs, err := side.h.RouteGet(net.IP(side.addr.AsSlice()))
			if err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("IPv6 address %s is not ready after 2s (%v %v)", side.addr, rs, err)
			}
			time.Sleep(50 * time.Microsecond)
		}
	}
	// Static neighbours: neighbour discovery right after an address is added can lose its first
	// solicitation (the solicited-node group is joined by a kernel worker, later), which would
	// delay the first refusal by the 1 s retransmission.
	if err := h.NeighSet(&netlink.Neigh{LinkIndex: eth.Attrs().Index, Family: netlink.FAMILY_V6, State: netlink.NUD_PERMANENT,
		IP: net.IP(gw6.AsSlice()), HardwareAddr: macs[1]}); err != nil {
		return fmt.Errorf("sandbox neighbour: %w", err)
	}
	if err := m.nl.NeighSet(&netlink.Neigh{LinkIndex: veth.Index, Family: netlink.FAMILY_V6, State: netlink.NUD_PERMANENT,
		IP: net.IP(addr6.AsSlice()), HardwareAddr: macs[0]}); err != nil {
		return fmt.Errorf("gateway neighbour: %w", err)
	}
	return nil
}

func ipnet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, a.BitLen())}
}

// Teardown removes sandbox id's rules and its namespace file at once; the veth pair goes in the
// background (Wait and Close wait for it): the kernel removes it with the namespace, tens of
// milliseconds later, without holding up other sandboxes' setups the way deleting it here would
// (RTNL). It is idempotent and works from the id alone, for sandboxes of an earlier process too.
// Call it once the sandbox's processes are gone.
func (m *Manager) Teardown(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("netsetup: invalid sandbox id %q", id)
	}
	m.mu.Lock()
	if _, busy := m.pending[id]; busy {
		m.mu.Unlock()
		return nil
	}
	if b := m.boxes[id]; b != nil {
		// A setup of the same id in progress finishes first (or fails and cleans up itself).
		m.mu.Unlock()
		<-b.ready
		m.mu.Lock()
		if _, busy := m.pending[id]; busy {
			m.mu.Unlock()
			return nil
		}
	}
	b := m.boxes[id]
	delete(m.boxes, id)
	if b != nil {
		delete(m.byIfindex, b.ifindex)
	}
	done := make(chan struct{})
	m.pending[id] = done
	m.teardown.Add(1)
	m.mu.Unlock()

	var errs []error
	if b != nil && b.rules {
		if err := m.delRules(b); err != nil {
			errs = append(errs, err)
		}
		if err := m.unpin(b); err != nil {
			errs = append(errs, err)
		}
	}
	if err := m.removeNSFile(id); err != nil {
		errs = append(errs, err)
	}
	go func() {
		defer m.teardown.Done()
		if err := m.removeVeth(id, vethGoneWait); err != nil {
			m.mu.Lock()
			m.bgErrs = append(m.bgErrs, fmt.Errorf("netsetup: teardown %s: %w", id, err))
			m.mu.Unlock()
		}
		if b != nil {
			m.release(b)
		}
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
		close(done)
	}()
	if len(errs) > 0 {
		return fmt.Errorf("netsetup: teardown %s: %w", id, errors.Join(errs...))
	}
	return nil
}

// vethGoneWait is how long a teardown waits for the kernel to remove a veth with its namespace
// before deleting it itself (something still holds the namespace).
const vethGoneWait = 3 * time.Second

// Wait waits for the background part of the teardowns started so far and returns the errors
// they met since the last Wait.
func (m *Manager) Wait() error {
	m.teardown.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	err := errors.Join(m.bgErrs...)
	m.bgErrs = nil
	return err
}

// removePlumbing deletes sandbox id's namespace file and veth (the peer goes with it) now.
func (m *Manager) removePlumbing(id string) error {
	return errors.Join(m.removeNSFile(id), m.removeVeth(id, 0))
}

// removeNSFile unmounts and removes sandbox id's namespace file: the namespace goes when its
// last user does.
func (m *Manager) removeNSFile(id string) error {
	var errs []error
	p := m.NSPath(id)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeVeth waits up to wait for sandbox id's veth to vanish, then deletes it.
func (m *Manager) removeVeth(id string, wait time.Duration) error {
	name := m.HostIfName(id)
	deadline := time.Now().Add(wait)
	for pause := 500 * time.Microsecond; ; pause = min(2*pause, 20*time.Millisecond) {
		l, err := m.nl.LinkByName(name)
		if isNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("veth %s: %w", name, err)
		}
		if time.Now().After(deadline) {
			if err := m.nl.LinkDel(l); err != nil && !isNotFound(err) {
				return fmt.Errorf("delete veth %s: %w", name, err)
			}
			return nil
		}
		time.Sleep(pause)
	}
}

// retryDump calls a netlink dump again while the kernel says it was interrupted (the set changed
// while it was read: another sandbox's veth or address came or went, or another server's), which
// netlink reports with partial results; at most 10 times.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	for i := 0; ; i++ {
		r, err := dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == 9 {
			return r, err
		}
	}
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// removeStaleLinks deletes the veths a crashed manager with our tag left.
func (m *Manager) removeStaleLinks() error {
	links, err := retryDump(m.nl.LinkList)
	if err != nil {
		return fmt.Errorf("netsetup: list links: %w", err)
	}
	ours := map[string]bool{}
	if ents, err := os.ReadDir(m.nsDir); err == nil {
		for _, e := range ents {
			ours[m.HostIfName(e.Name())] = true
		}
	}
	for _, l := range links {
		if _, ok := m.idFromAlias(l.Attrs().Alias); ok || ours[l.Attrs().Name] {
			if err := m.nl.LinkDel(l); err != nil && !isNotFound(err) {
				return fmt.Errorf("netsetup: delete stale veth %s: %w", l.Attrs().Name, err)
			}
		}
	}
	return nil
}

func (m *Manager) idFromAlias(alias string) (string, bool) {
	id, ok := strings.CutPrefix(alias, aliasPrefix+" "+m.tag+" ")
	return id, ok && idPattern.MatchString(id)
}

// List returns the ids of the sandboxes that have plumbing of this manager on the host: a veth of
// ours or a namespace file (including ones left by an earlier process).
func (m *Manager) List() ([]string, error) {
	seen := map[string]bool{}
	links, err := retryDump(m.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("netsetup: list links: %w", err)
	}
	for _, l := range links {
		if id, ok := m.idFromAlias(l.Attrs().Alias); ok {
			seen[id] = true
		}
	}
	ents, err := os.ReadDir(m.nsDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		if idPattern.MatchString(e.Name()) {
			seen[e.Name()] = true
		}
	}
	m.mu.Lock()
	for id := range m.boxes {
		seen[id] = true
	}
	m.mu.Unlock()
	ids := make([]string, 0, len(seen))
	for id := range seen {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// Close waits for background teardowns, stops reading the log, deletes the host table if no
// sandbox is left (otherwise the rules stay: sandboxes stay confined until the next New), and puts
// net.ipv4.ip_forward back if the manager switched it on. Sandboxes still set up keep their
// plumbing.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	var errs []error
	if err := m.Wait(); err != nil {
		errs = append(errs, err)
	}
	m.reports.close()
	if err := m.log.close(); err != nil {
		errs = append(errs, err)
	}
	m.mu.Lock()
	left := len(m.boxes)
	m.mu.Unlock()
	if left == 0 {
		if err := m.deleteTable(); err != nil {
			errs = append(errs, fmt.Errorf("delete table %s: %w", m.tbl.Name, err))
		}
		m.mu.Lock()
		orig := m.fwdOrig
		m.mu.Unlock()
		if orig != "" && orig != "1" {
			if err := writeSysctl("net/ipv4/ip_forward", orig); err != nil {
				errs = append(errs, err)
			}
		}
	}
	m.closeHandles()
	return errors.Join(errs...)
}

// abandon closes the manager's sockets and leaves every kernel object as it is: what a crash
// does (for tests).
func (m *Manager) abandon() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.teardown.Wait()
	m.reports.close()
	_ = m.log.close()
	m.closeHandles()
}

func (m *Manager) closeHandles() {
	if m.nl != nil {
		m.nl.Close()
	}
	if m.nft != nil {
		_ = m.nft.CloseLasting()
	}
	if m.pinNft != nil {
		_ = m.pinNft.CloseLasting()
	}
	if m.hostNS.IsOpen() {
		m.hostNS.Close()
	}
}

// forwardOn switches IPv4 forwarding on (for sandboxes with unrestricted egress) and counts them.
func (m *Manager) forwardOn() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.open++
	if cur := readSysctl("net/ipv4/ip_forward"); cur != "1" {
		if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
			m.open--
			return err
		}
		if m.fwdOrig == "" {
			m.fwdOrig = cur
		}
	}
	return nil
}

// release gives b's /30 back and forgets its forwarding need.
func (m *Manager) release(b *box) {
	if b.index >= 0 {
		freeSlot(m.pool, b.index)
		b.index = -1
	}
	if !b.policy.BlockOutbound {
		m.mu.Lock()
		m.open--
		m.mu.Unlock()
	}
}

// onPacket turns a logged packet into a decision.
func (m *Manager) onPacket(p loggedPacket) {
	m.mu.Lock()
	id, ok := m.byIfindex[p.indev]
	m.mu.Unlock()
	if !ok {
		return
	}
	d := egress.Decision{SandboxID: id, Addr: p.dst, Port: p.dport, Proto: p.proto}
	switch p.prefix {
	case codeAllowed:
		d.Allowed = true
	case codeConnect:
		d.Host, d.Reason = m.refusedAtConnect(id, p.dst, p.dport)
	default:
		d.Reason = reasonOf(p.prefix, p.proto)
	}
	m.reports.report(d)
}

func readSysctl(key string) string {
	b, err := os.ReadFile("/proc/sys/" + key)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func writeSysctl(key, val string) error {
	if err := os.WriteFile("/proc/sys/"+key, []byte(val), 0o644); err != nil {
		return fmt.Errorf("sysctl %s: %w", strings.ReplaceAll(key, "/", "."), err)
	}
	return nil
}
