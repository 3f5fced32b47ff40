package netsetup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/egress"
)

// The connect check: a sandbox's new TCP connections to ports other than 80 and 443 are decided
// before the DNAT to the transparent proxy (hook prerouting, priority -150), because their
// verdict needs no host name — only the address rules, the always-denied set and the addresses
// the sandbox's DNS server answered for allowed names. What the check lets through, the gateway
// checks again; what it refuses gets a reset to its SYN (connect() fails with ECONNREFUSED) and
// is logged to the NFLOG group as a denied decision.
//
// One chain, "connect", serves every sandbox: a sandbox's state is elements of the host table's
// sets — and, only for a sandbox whose policy has address rules, a set and a one-rule chain of
// its own. (Every commit that adds a sandbox's jump rules validates every chain reachable from
// the base chains, and looking a set up by name walks all of them: a chain and sets for every
// sandbox made each Setup slower the more sandboxes there were. One set of concatenated ranges
// for all sandboxes' address rules is worse: the kernel rebuilds it whole for every element
// deleted, half a second per teardown with a thousand sandboxes.)
//
//   - connect_src (ifname . ipv4_addr): the veth and address of each sandbox whose TCP goes to
//     the gateway; the base chain sends only packets from such a pair (a forged source is the
//     filter chain's to drop) to the check, so their source address names the sandbox.
//   - a_<veth> (ipv4_addr . inet_service, intervals) and chain c_<veth>, jumped to through the
//     map allow_by_src (source address → jump): the policy's address rules minus the
//     always-denied addresses, minus the private ranges a rule does not list at least as
//     specifically (the gateway's denyReason), minus port 853. Made at Setup and by SetPolicy;
//     the host's own addresses, which change, are refused by a fib check before the jump.
//   - open4 (ipv4_addr): sandboxes with BlockOutbound false: every address outside denied4 and
//     the host's, on every port but 853.
//   - pins (ifname . ipv4_addr . inet_service, timeouts; port 0 stands for any port): the
//     addresses the sandbox's DNS server answered for allowed names, on the ports the policy
//     allows those names on, written by Pin before the answer leaves the gateway and expiring
//     with the gateway's pins. Keyed by the veth's name, which no other sandbox has, so that an
//     element that outlived its sandbox opens nothing for the next one on the same address.
//   - connect_log (ipv4_addr, dynamic): a rate limit per sandbox for logging refusals, as the
//     filter chain's per-sandbox limit object does for the others.

const (
	setConnectSrc = "connect_src"
	mapAllow      = "allow_by_src"
	setOpen       = "open4"
	setPins       = "pins"
	setConnectLog = "connect_log"
	chainConnect  = "connect"

	dotPort = 853 // DNS over TLS: always refused
	// maxPinElems bounds a sandbox's pins (the gateway pins at most 4096 addresses, each for a
	// few ports). An answer that would need more fails (the gateway answers SERVFAIL).
	maxPinElems = 8192
	// pinGone is how long after its expiry a pin element is surely gone from the kernel (whose
	// clock, jiffies, may lag ours a little): until then a refresh replaces it.
	pinGone = 10 * time.Second
	// connectLogIdle is how long a sandbox's log limit is kept after its last refusal.
	connectLogIdle = time.Minute
)

var (
	ifAddrType    = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr)
	addrPortType  = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)
	ifDstPortType = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr, nftables.TypeInetService)
)

func addrChainName(b *box) string { return "c_" + b.HostIf }
func addrSetName(b *box) string   { return "a_" + b.HostIf }

func (m *Manager) addrSet(b *box) *nftables.Set {
	return &nftables.Set{Table: m.tbl, Name: addrSetName(b), KeyType: addrPortType, Concatenation: true, Interval: true}
}

// connectSets are the host table's sets of the connect check.
type connectSets struct {
	src, allow, open, pins, log *nftables.Set
}

func (m *Manager) connectSets() connectSets {
	return connectSets{
		src:   &nftables.Set{Table: m.tbl, Name: setConnectSrc, KeyType: ifAddrType, Concatenation: true},
		allow: &nftables.Set{Table: m.tbl, Name: mapAllow, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeVerdict, IsMap: true},
		open:  &nftables.Set{Table: m.tbl, Name: setOpen, KeyType: nftables.TypeIPAddr},
		pins:  &nftables.Set{Table: m.tbl, Name: setPins, KeyType: ifDstPortType, Concatenation: true, HasTimeout: true},
		log: &nftables.Set{Table: m.tbl, Name: setConnectLog, KeyType: nftables.TypeIPAddr, Dynamic: true, HasTimeout: true,
			Timeout: connectLogIdle, Size: 65536},
	}
}

// connectTable adds the connect check's sets and chains to createTable's batch: the base chain
// (priority -150: before the DNAT) sends a sandbox's new IPv4 TCP connections from its own
// address to anything but its own gateway address (an address of the veth it came in by), on
// ports the gateway does not decide by name, to the connect chain. That accepts, for the DNAT and
// the gateway, destinations its address rules allow (unless an address of the host: its chain
// c_<veth> accepts them), any outside denied4 and the host for an unrestricted sandbox, and
// pinned answers (on their port, or on any but 853), and refuses the rest with a reset, logged
// within the sandbox's limit (the reader tells the reasons apart: refusedAtConnect).
func (m *Manager) connectTable(c *nftables.Conn, hs hostSets) error {
	cs := m.connectSets()
	for _, s := range []*nftables.Set{cs.src, cs.allow, cs.open, cs.pins, cs.log} {
		if err := c.AddSet(s, nil); err != nil {
			return err
		}
	}
	t := m.tbl
	ch := c.AddChain(&nftables.Chain{Name: chainConnect, Table: t})
	rule := func(e ...expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	ok := []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	lookup := func(s *nftables.Set, invert bool) *expr.Lookup {
		return &expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: invert}
	}
	load := func(reg uint32, base expr.PayloadBase, off, n uint32) *expr.Payload {
		return &expr.Payload{DestRegister: reg, Base: base, Offset: off, Len: n}
	}
	// Keys are laid out in consecutive 4-byte registers from register 1 (= 8..11); a name takes
	// 16 bytes.
	saddr := load(1, expr.PayloadBaseNetworkHeader, 12, 4)
	iifname := &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}
	notLocal := fibType(false, expr.CmpOpNeq, unix.RTN_LOCAL)

	rule(cat(notLocal, []expr.Any{saddr, &expr.Lookup{SourceRegister: 1, DestRegister: 0, IsDestRegSet: true, SetName: cs.allow.Name, SetID: cs.allow.ID}})...)
	rule(cat([]expr.Any{saddr, lookup(cs.open, false)}, ip4(16), inSet(hs.denied, true), dport(expr.CmpOpNeq, dotPort), notLocal, ok)...)
	rule(cat([]expr.Any{iifname, load(12, expr.PayloadBaseNetworkHeader, 16, 4), load(13, expr.PayloadBaseTransportHeader, 2, 2),
		lookup(cs.pins, false)}, ok)...)
	rule(cat(dport(expr.CmpOpNeq, dotPort), []expr.Any{iifname, load(12, expr.PayloadBaseNetworkHeader, 16, 4),
		&expr.Immediate{Register: 13, Data: []byte{0, 0, 0, 0}}, lookup(cs.pins, false)}, ok)...)
	rule(saddr,
		&expr.Dynset{SrcRegKey: 1, SetName: cs.log.Name, SetID: cs.log.ID, Operation: uint32(unix.NFT_DYNSET_OP_UPDATE), Timeout: connectLogIdle,
			Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: kernelLogRate, Unit: expr.LimitTimeSecond, Burst: kernelLogBurst}}},
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
			Group: m.log.group, Data: []byte(codeConnect), Snaplen: logSnaplen},
		&expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
	rule(reject(true)...) // over the sandbox's log limit

	base := c.AddChain(&nftables.Chain{Name: "prerouting_connect", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	c.AddRule(&nftables.Rule{Table: t, Chain: base, Exprs: cat(nfproto(unix.NFPROTO_IPV4), l4(unix.IPPROTO_TCP), ctState(expr.CtStateBitNEW),
		[]expr.Any{load(1, expr.PayloadBaseTransportHeader, 2, 2)}, inSet(hs.byName, true),
		fibType(true, expr.CmpOpNeq, unix.RTN_LOCAL),
		[]expr.Any{iifname, load(12, expr.PayloadBaseNetworkHeader, 12, 4), lookup(cs.src, false),
			&expr.Verdict{Kind: expr.VerdictJump, Chain: chainConnect}})})
	return nil
}

// connects reports whether policy p's sandboxes go through the connect check: their TCP is
// redirected to the gateway unless nothing at all is allowed (then the filter chain refuses it).
func connects(p egress.Policy) bool { return !(p.BlockOutbound && len(p.Rules) == 0) }

// pins reports whether policy p's sandboxes need pins (with BlockOutbound false, open4 lets them
// reach every address a DNS answer may hold).
func pins(p egress.Policy) bool { return p.BlockOutbound && len(p.Rules) > 0 }

// connectElems adds sandbox b's elements, and its address set and chain if its policy has
// address rules, to addRules' batch (nftMu held).
func (m *Manager) connectElems(b *box) error {
	cs := m.connectSets()
	sbx := b.Addr.As4()
	if err := m.nft.SetAddElements(cs.src, []nftables.SetElement{{Key: append(ifnameKey(b.HostIf), sbx[:]...)}}); err != nil {
		return err
	}
	if !b.policy.BlockOutbound {
		if err := m.nft.SetAddElements(cs.open, []nftables.SetElement{{Key: sbx[:]}}); err != nil {
			return err
		}
	}
	els := m.addrElems(b.policy)
	if len(els) == 0 {
		return nil
	}
	b.addrRules = true
	return m.addAddrRules(m.nft, b, els)
}

// addAddrRules queues sandbox b's address set with els, its chain and its element of
// allow_by_src.
func (m *Manager) addAddrRules(c *nftables.Conn, b *box, els []nftables.SetElement) error {
	as := m.addrSet(b)
	if err := c.AddSet(as, els); err != nil {
		return err
	}
	ch := c.AddChain(&nftables.Chain{Name: addrChainName(b), Table: m.tbl})
	c.AddRule(&nftables.Rule{Table: m.tbl, Chain: ch, Exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Payload{DestRegister: 9, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: as.Name, SetID: as.ID},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}})
	sbx := b.Addr.As4()
	return c.SetAddElements(m.connectSets().allow, []nftables.SetElement{{Key: sbx[:],
		VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: addrChainName(b)}}})
}

// delAddrRules queues the deletion of sandbox b's address set, chain and allow_by_src element.
func (m *Manager) delAddrRules(c *nftables.Conn, b *box) error {
	sbx := b.Addr.As4()
	if err := c.SetDeleteElements(m.connectSets().allow, []nftables.SetElement{{Key: sbx[:]}}); err != nil {
		return err
	}
	ch := &nftables.Chain{Name: addrChainName(b), Table: m.tbl}
	c.FlushChain(ch)
	c.DelChain(ch)
	c.DelSet(m.addrSet(b))
	return nil
}

// delConnectElems queues the deletion of sandbox b's elements (but its pins: unpin), address
// set and chain for delRules: one function per part, as delRules wants them.
func (m *Manager) delConnectElems(b *box) []func() error {
	if !b.connect {
		return nil
	}
	cs := m.connectSets()
	sbx := b.Addr.As4()
	return []func() error{
		func() error {
			return m.nft.SetDeleteElements(cs.src, []nftables.SetElement{{Key: append(ifnameKey(b.HostIf), sbx[:]...)}})
		},
		func() error {
			if b.policy.BlockOutbound {
				return nil
			}
			return m.nft.SetDeleteElements(cs.open, []nftables.SetElement{{Key: sbx[:]}})
		},
		func() error {
			b.pinMu.Lock()
			has := b.addrRules
			b.pinMu.Unlock()
			if !has {
				return nil
			}
			return m.delAddrRules(m.nft, b)
		},
	}
}

// span is an inclusive range of IPv4 addresses or ports.
type span struct{ lo, hi uint32 }

func prefixSpan(p netip.Prefix) span {
	a := p.Masked().Addr().As4()
	lo := binary.BigEndian.Uint32(a[:])
	return span{lo, uint32(uint64(lo) + 1<<(32-p.Bits()) - 1)}
}

// subtract returns the parts of ss outside cut.
func subtract(ss []span, cut span) []span {
	var out []span
	for _, s := range ss {
		if cut.hi < s.lo || cut.lo > s.hi {
			out = append(out, s)
			continue
		}
		if cut.lo > s.lo {
			out = append(out, span{s.lo, cut.lo - 1})
		}
		if cut.hi < s.hi {
			out = append(out, span{cut.hi + 1, s.hi})
		}
	}
	return out
}

// merge sorts spans and joins the overlapping and adjacent ones.
func merge(ss []span) []span {
	ss = slices.Clone(ss)
	slices.SortFunc(ss, func(a, b span) int { return cmpU32(a.lo, b.lo) })
	var out []span
	for _, s := range ss {
		if n := len(out); n > 0 && uint64(s.lo) <= uint64(out[n-1].hi)+1 {
			out[n-1].hi = max(out[n-1].hi, s.hi)
			continue
		}
		out = append(out, s)
	}
	return out
}

func cmpU32(a, b uint32) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// rect is a set of (address, port) pairs: every address of addr on every port of port.
type rect struct{ addr, port span }

// tcpDenied returns the IPv4 spans no TCP connection of a sandbox may reach whatever its policy
// (the gateway's fixed always-denied set, the pool, Config.Denied) and the private ranges, which
// only an address rule at least as specific opens. The host's own addresses are refused by a fib
// check in the chain.
func (m *Manager) tcpDenied() (fixed []span, private []netip.Prefix) {
	fx, pv := egress.AlwaysDenied()
	for _, p := range fx {
		if p.Addr().Is4() {
			fixed = append(fixed, prefixSpan(p))
		}
	}
	fixed = append(fixed, prefixSpan(m.pool))
	for _, p := range m.cfg.Denied {
		if p.Addr().Is4() {
			fixed = append(fixed, prefixSpan(p))
		}
	}
	for _, p := range pv {
		if p.Addr().Is4() {
			private = append(private, p.Masked())
		}
	}
	return fixed, private
}

// allowedRects is what the address rules of policy p let a sandbox reach (80 and 443 included,
// which the chain does not ask about; 853 left out, which is always denied). The public addresses
// a policy with BlockOutbound false opens are not in it (open4 has those sandboxes).
func (m *Manager) allowedRects(p egress.Policy) []rect {
	anyPort := []span{{0, dotPort - 1}, {dotPort + 1, 65535}}
	fixed, private := m.tcpDenied()
	var rs []rect
	for _, r := range p.Rules {
		if r.Host != "" || !r.Prefix.IsValid() || !r.Prefix.Addr().Is4() {
			continue
		}
		ss := []span{prefixSpan(r.Prefix)}
		for _, f := range fixed {
			ss = subtract(ss, f)
		}
		// A private range strictly inside the rule's prefix is not listed by it ("0.0.0.0/0"
		// does not open 10/8); a rule inside a private range lists its addresses.
		for _, pv := range private {
			if pv.Bits() > r.Prefix.Bits() && r.Prefix.Contains(pv.Addr()) {
				ss = subtract(ss, prefixSpan(pv))
			}
		}
		ports := anyPort
		if r.Port != 0 {
			ports = []span{{uint32(r.Port), uint32(r.Port)}}
		}
		for _, s := range ss {
			for _, p := range ports {
				rs = append(rs, rect{s, p})
			}
		}
	}
	return rs
}

// disjoint returns rectangles that cover the same pairs as rs without overlapping (the kernel's
// set of concatenated ranges refuses overlapping elements), ordered by address.
func disjoint(rs []rect) []rect {
	var cuts []uint64
	for _, r := range rs {
		cuts = append(cuts, uint64(r.addr.lo), uint64(r.addr.hi)+1)
	}
	slices.Sort(cuts)
	cuts = slices.Compact(cuts)
	type strip struct {
		addr  span
		ports []span
	}
	var strips []strip
	for i := 0; i+1 < len(cuts); i++ {
		lo, hi := cuts[i], cuts[i+1]-1
		var ports []span
		for _, r := range rs {
			if uint64(r.addr.lo) <= lo && hi <= uint64(r.addr.hi) {
				ports = append(ports, r.port)
			}
		}
		if len(ports) == 0 {
			continue
		}
		ports = merge(ports)
		if n := len(strips); n > 0 && uint64(strips[n-1].addr.hi)+1 == lo && slices.Equal(strips[n-1].ports, ports) {
			strips[n-1].addr.hi = uint32(hi)
			continue
		}
		strips = append(strips, strip{span{uint32(lo), uint32(hi)}, ports})
	}
	var out []rect
	for _, s := range strips {
		for _, p := range s.ports {
			out = append(out, rect{s.addr, p})
		}
	}
	return out
}

// addrPortKey is a key of an address set: address, port (4 bytes each).
func addrPortKey(addr uint32, port uint32) []byte {
	k := binary.BigEndian.AppendUint32(make([]byte, 0, 8), addr)
	k = binary.BigEndian.AppendUint16(k, uint16(port))
	return append(k, 0, 0)
}

// addrElems are the elements of a sandbox's address set under policy p (none: it needs no set).
func (m *Manager) addrElems(p egress.Policy) []nftables.SetElement {
	var els []nftables.SetElement
	for _, r := range disjoint(m.allowedRects(p)) {
		els = append(els, nftables.SetElement{Key: addrPortKey(r.addr.lo, r.port.lo), KeyEnd: addrPortKey(r.addr.hi, r.port.hi)})
	}
	return els
}

// pinKey is a pin of a sandbox: port 0 stands for any port.
type pinKey struct {
	addr [4]byte
	port uint16
}

// elem is k's element of the pins set for the sandbox behind veth ifname.
func (k pinKey) elem(ifname string, timeout time.Duration) nftables.SetElement {
	key := append(ifnameKey(ifname), k.addr[:]...)
	key = binary.BigEndian.AppendUint16(key, k.port)
	return nftables.SetElement{Key: append(key, 0, 0), Timeout: timeout}
}

// pinRec is what the manager remembers of a pin element: when it expires in the kernel (at the
// earliest) and the name it was answered for.
type pinRec struct {
	exp  time.Time
	name string
}

// Pin lets sandbox id connect to the addresses of a DNS answer of its gateway, on the ports the
// policy allows the name on, for a.TTL; egress.Config.OnAnswer calls it before the answer is
// sent, so a client that connects as soon as it has the answer finds the way open. Only IPv4
// addresses and ports other than 80 and 443 (which the gateway decides by name) need it; an
// answer whose elements are all in place already costs no netlink round trip. Elements live
// a.TTL/60 longer than asked, so that repeated answers renew them at most that often.
//
// Sandboxes whose policy allows nothing, or everything public (BlockOutbound false), need no
// pins: Pin does nothing for them.
func (m *Manager) Pin(id string, a egress.Answer) error {
	m.mu.Lock()
	b := m.boxes[id]
	m.mu.Unlock()
	if b == nil {
		return fmt.Errorf("netsetup: sandbox %s is not set up", id)
	}
	<-b.ready
	if !b.rules {
		return fmt.Errorf("netsetup: sandbox %s is not set up", id)
	}
	if !b.pinning || a.TTL <= 0 {
		return nil
	}
	var ports []uint16
	if a.AnyPort {
		ports = []uint16{0}
	} else {
		for _, p := range a.Ports {
			if p != 80 && p != 443 && p != 0 && p != dotPort {
				ports = append(ports, p)
			}
		}
	}
	var keys []pinKey
	for _, ad := range a.Addrs {
		if ad = ad.Unmap(); ad.Is4() {
			for _, p := range ports {
				keys = append(keys, pinKey{ad.As4(), p})
			}
		}
	}
	if len(keys) == 0 {
		return nil
	}

	b.pinMu.Lock()
	defer b.pinMu.Unlock()
	if b.gone {
		return fmt.Errorf("netsetup: sandbox %s is not set up", id)
	}
	now := time.Now()
	want := now.Add(a.TTL)
	var fresh, refresh []pinKey
	for _, k := range keys {
		rec, ok := b.pins[k]
		switch {
		case ok && !rec.exp.Before(want): // in place for long enough
		case ok && now.Before(rec.exp.Add(pinGone)): // maybe still in the kernel: replace it
			refresh = append(refresh, k)
		default:
			fresh = append(fresh, k)
		}
	}
	if len(fresh)+len(refresh) > 0 {
		if len(b.pins)+len(fresh) > maxPinElems {
			for k, rec := range b.pins {
				if now.After(rec.exp.Add(pinGone)) {
					delete(b.pins, k)
				}
			}
			if len(b.pins)+len(fresh) > maxPinElems {
				return fmt.Errorf("netsetup: sandbox %s: more than %d pinned addresses and ports", id, maxPinElems)
			}
		}
		timeout := a.TTL + a.TTL/60
		exp := now.Add(timeout)
		if err := m.pinElems(b, fresh, refresh, timeout); err != nil {
			return fmt.Errorf("netsetup: sandbox %s: pin %s: %w", id, a.Name, err)
		}
		for _, k := range slices.Concat(fresh, refresh) {
			b.pins[k] = pinRec{exp, a.Name}
		}
	}
	if len(b.named) >= maxPinElems {
		for a, rec := range b.named {
			if now.After(rec.exp) {
				delete(b.named, a)
			}
		}
	}
	for _, k := range keys {
		b.named[k.addr] = pinRec{want, a.Name}
	}
	return nil
}

// pinElems adds the fresh elements to the pins set and replaces the refresh ones (delete and add
// in one transaction: re-adding an element does not renew its timeout on every kernel), with
// timeout. An element to replace that expired meanwhile is added instead. b.pinMu is held.
func (m *Manager) pinElems(b *box, fresh, refresh []pinKey, timeout time.Duration) error {
	m.pinMu.Lock()
	defer m.pinMu.Unlock()
	err := m.pinBatch(b, refresh, slices.Concat(fresh, refresh), timeout)
	if err == nil || len(refresh) == 0 || !errors.Is(err, unix.ENOENT) {
		return err
	}
	// An element to replace was gone already: one by one.
	for _, k := range refresh {
		one := []pinKey{k}
		if err := m.pinBatch(b, one, one, timeout); err != nil {
			if !errors.Is(err, unix.ENOENT) {
				return err
			}
			if err := m.pinBatch(b, nil, one, timeout); err != nil {
				return err
			}
		}
	}
	return m.pinBatch(b, nil, fresh, timeout)
}

// pinBatch deletes del from and adds add to the pins set, in one transaction (pinMu held);
// whatever was queued is sent, and the queue emptied, in any case.
func (m *Manager) pinBatch(b *box, del, add []pinKey, timeout time.Duration) error {
	s := m.connectSets().pins
	elems := func(ks []pinKey, timeout time.Duration) []nftables.SetElement {
		out := make([]nftables.SetElement, len(ks))
		for i, k := range ks {
			out[i] = k.elem(b.HostIf, timeout)
		}
		return out
	}
	c := m.pinNft
	var errs []error
	if len(del) > 0 {
		errs = append(errs, c.SetDeleteElements(s, elems(del, 0)))
	}
	if len(add) > 0 {
		errs = append(errs, c.SetAddElements(s, elems(add, timeout)))
	}
	return errors.Join(append(errs, c.Flush())...)
}

// unpinLocked deletes b's pins from the kernel: the ones surely still there in one transaction
// (with extra, which adds to it), those that may have expired one by one. b.pinMu and m.pinMu are
// held. An element that expired is gone for the kernel, even before its garbage collection.
func (m *Manager) unpinLocked(b *box, extra func(*nftables.Conn) error) error {
	now := time.Now()
	var alive, maybe []pinKey
	for k, rec := range b.pins {
		switch {
		case rec.exp.After(now.Add(time.Second)):
			alive = append(alive, k)
		case now.Before(rec.exp.Add(pinGone)):
			maybe = append(maybe, k)
		}
	}
	batch := func(pins []pinKey) error {
		if extra != nil {
			if err := extra(m.pinNft); err != nil {
				return err
			}
		}
		return m.pinBatch(b, pins, nil, 0)
	}
	if err := batch(alive); errors.Is(err, unix.ENOENT) {
		// One of them expired after all (a loaded machine): the transaction was undone. Again
		// without the pins, then the pins one by one, the gone ones aside.
		if err := batch(nil); err != nil {
			return err
		}
		maybe = append(maybe, alive...)
	} else if err != nil {
		return err
	}
	for _, k := range maybe {
		if err := m.pinBatch(b, []pinKey{k}, nil, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	clear(b.pins)
	clear(b.named)
	return nil
}

// unpin deletes sandbox b's pins for good (Teardown): later Pins of it fail.
func (m *Manager) unpin(b *box) error {
	if !b.pinning {
		return nil
	}
	b.pinMu.Lock()
	defer b.pinMu.Unlock()
	b.gone = true
	m.pinMu.Lock()
	defer m.pinMu.Unlock()
	return m.unpinLocked(b, nil)
}

// setPolicySets gives sandbox b the address set (and chain) of policy p, or none, and deletes its
// pins, in one transaction (but for pins that may have expired meanwhile, deleted after it).
func (m *Manager) setPolicySets(b *box, p egress.Policy) error {
	b.pinMu.Lock()
	defer b.pinMu.Unlock()
	m.pinMu.Lock()
	defer m.pinMu.Unlock()
	els := m.addrElems(p)
	err := m.unpinLocked(b, func(c *nftables.Conn) error {
		switch {
		case b.addrRules && len(els) > 0:
			as := m.addrSet(b)
			c.FlushSet(as)
			return c.SetAddElements(as, els)
		case b.addrRules:
			return m.delAddrRules(c, b)
		case len(els) > 0:
			return m.addAddrRules(c, b, els)
		}
		return nil
	})
	if err != nil {
		return err
	}
	b.addrRules = len(els) > 0
	return nil
}

// fibType compares the address type of the destination (seen from the input interface if iif:
// local then means an address of that interface) with typ.
func fibType(iif bool, op expr.CmpOp, typ uint32) []expr.Any {
	return cat([]expr.Any{&expr.Fib{Register: 1, FlagDADDR: true, FlagIIF: iif, ResultADDRTYPE: true}},
		cmp(op, binaryutil.NativeEndian.PutUint32(typ)))
}

// refusedAtConnect is the host and reason of a connection the connect chain refused, in the
// gateway's words: port 853, an always-denied destination or one of the host's addresses, else
// an address and port no rule or pinned answer allows (naming the host the address was last
// answered for, if any).
func (m *Manager) refusedAtConnect(id string, dst netip.Addr, port uint16) (host, reason string) {
	switch {
	case port == dotPort:
		return "", reasonOf(codeDoT, "tcp")
	case slices.ContainsFunc(m.denied, func(p netip.Prefix) bool { return p.Contains(dst) }) || m.isLocal(dst):
		return "", reasonOf(codeDenied, "tcp")
	}
	m.mu.Lock()
	b := m.boxes[id]
	m.mu.Unlock()
	if b != nil && dst.Is4() {
		b.pinMu.Lock()
		rec, ok := b.named[dst.As4()]
		b.pinMu.Unlock()
		if ok && time.Now().Before(rec.exp) {
			return rec.name, fmt.Sprintf("port %d is not allowed for %s (%s)", port, rec.name, dst)
		}
	}
	return "", fmt.Sprintf("%s is not on the allow list", netip.AddrPortFrom(dst, port))
}

// isLocal reports whether a is an address of the host.
func (m *Manager) isLocal(a netip.Addr) bool {
	rs, err := m.nl.RouteGet(net.IP(a.AsSlice()))
	return err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL
}
