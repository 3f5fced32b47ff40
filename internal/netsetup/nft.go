package netsetup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names in the host table.
const (
	setSandboxes = "sandboxes"  // ifname: our host-side veths
	setMasq      = "masquerade" // ipv4_addr: sandboxes with unrestricted egress
	setDenied    = "denied4"    // ipv4_addr interval: always-denied destinations
	mapNAT       = "nat_by_if"  // ifname → jump n_<veth>
	mapFilter    = "filter_by_if"
	setByName    = "tcp_by_name" // inet_service: the ports the gateway decides by name (80, 443)
)

// Log prefixes: the reason code of a refused packet (see reasonOf).
const (
	codeGateway = "gateway"
	codeIPv6    = "ipv6"
	codeDoT     = "dot"
	codeDenied  = "denied"
	codeUDP     = "udp"
	codeICMP    = "icmp"
	codeTCP     = "tcp"
	codeSpoof   = "spoof"
	codeBlocked = "blocked"
	codeOther   = "other"

	// codeConnect: TCP the connect chain refused (the reader words the reason: refusedAtConnect).
	codeConnect = "connect"

	// codeAllowed logs the first packet of a UDP or ICMP echo flow that unrestricted egress lets
	// out (TCP is seen by the gateway): an allowed decision, not a refusal.
	codeAllowed = "allowed"
)

// hostSets are the host table's sets and maps.
type hostSets struct {
	sandboxes, masq, denied, byName, natMap, filterMap *nftables.Set
}

func (m *Manager) sets() hostSets {
	vmap := func(name string) *nftables.Set {
		return &nftables.Set{Table: m.tbl, Name: name, KeyType: nftables.TypeIFName, DataType: nftables.TypeVerdict, IsMap: true}
	}
	return hostSets{
		sandboxes: &nftables.Set{Table: m.tbl, Name: setSandboxes, KeyType: nftables.TypeIFName},
		masq:      &nftables.Set{Table: m.tbl, Name: setMasq, KeyType: nftables.TypeIPAddr},
		denied:    &nftables.Set{Table: m.tbl, Name: setDenied, KeyType: nftables.TypeIPAddr, Interval: true, Constant: true},
		byName:    &nftables.Set{Table: m.tbl, Name: setByName, KeyType: nftables.TypeInetService, Constant: true},
		natMap:    vmap(mapNAT),
		filterMap: vmap(mapFilter),
	}
}

// deleteTable deletes the host table if it exists.
func (m *Manager) deleteTable() error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	m.nft.AddTable(m.tbl)
	m.nft.DelTable(m.tbl)
	m.tableUp = false
	return m.nft.Flush()
}

// createTable (re)creates the host table, atomically; nftMu is held.
func (m *Manager) createTable() error {
	c := m.nft
	c.AddTable(m.tbl)
	c.DelTable(m.tbl)
	t := c.AddTable(m.tbl)
	hs := m.sets()
	sandboxes, masq, denied, natMap, filterMap := hs.sandboxes, hs.masq, hs.denied, hs.natMap, hs.filterMap
	for _, s := range []*nftables.Set{sandboxes, masq, natMap, filterMap} {
		if err := c.AddSet(s, nil); err != nil {
			return err
		}
	}
	if err := c.AddSet(denied, intervalElems(m.denied)); err != nil {
		return err
	}
	if err := c.AddSet(hs.byName, []nftables.SetElement{{Key: binaryutil.BigEndian.PutUint16(80)}, {Key: binaryutil.BigEndian.PutUint16(443)}}); err != nil {
		return err
	}
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio})
	}
	rule := func(ch *nftables.Chain, e ...expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	inOurs := func(key expr.MetaKey) []expr.Any {
		return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Lookup{SourceRegister: 1, SetName: setSandboxes, SetID: sandboxes.ID}}
	}
	vmap := func(s *nftables.Set) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Lookup{SourceRegister: 1, DestRegister: 0, IsDestRegSet: true, SetName: s.Name, SetID: s.ID},
		}
	}

	if err := m.connectTable(c, hs); err != nil {
		return err
	}

	pnat := chain("prerouting_nat", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	rule(pnat, vmap(natMap)...)

	// After the DNAT (priority 0 > -100): a sandbox's packets are decided in its own chain.
	pre := chain("prerouting", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityFilter)
	rule(pre, vmap(filterMap)...)
	rule(pre, cat(inOurs(expr.MetaKeyIIFNAME), drop())...)

	// Second layer: what reaches the host from a sandbox is the gateway's ports (and ND / ICMP).
	in := chain("input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	rule(in, cat(inOurs(expr.MetaKeyIIFNAME), l4(unix.IPPROTO_UDP), dport(expr.CmpOpEq, DNSPort), accept())...)
	for _, p := range []uint16{DNSPort, ProxyPort, TransparentPort} {
		rule(in, cat(inOurs(expr.MetaKeyIIFNAME), l4(unix.IPPROTO_TCP), dport(expr.CmpOpEq, p), accept())...)
	}
	rule(in, cat(inOurs(expr.MetaKeyIIFNAME), l4(unix.IPPROTO_ICMP), accept())...)
	rule(in, cat(inOurs(expr.MetaKeyIIFNAME), l4(unix.IPPROTO_ICMPV6), accept())...)
	rule(in, cat(inOurs(expr.MetaKeyIIFNAME), drop())...)

	// Nothing new is forwarded into a sandbox; out of one only what prerouting accepted from a
	// sandbox with unrestricted egress.
	fwd := chain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	rule(fwd, cat(inOurs(expr.MetaKeyOIFNAME), ctEstablished(), accept())...)
	rule(fwd, cat(inOurs(expr.MetaKeyOIFNAME), drop())...)
	rule(fwd, cat(inOurs(expr.MetaKeyIIFNAME), nfproto(unix.NFPROTO_IPV4), ip4(12), inSet(masq, false), accept())...)
	rule(fwd, cat(inOurs(expr.MetaKeyIIFNAME), drop())...)

	post := chain("postrouting_nat", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	rule(post, cat(nfproto(unix.NFPROTO_IPV4), ip4(12), inSet(masq, false), []expr.Any{&expr.Masq{}})...)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("host table %s: %w", m.tbl.Name, err)
	}
	m.tableUp = true
	return nil
}

func limitName(b *box) string  { return "l_" + b.HostIf }
func filterName(b *box) string { return "f_" + b.HostIf }
func natName(b *box) string    { return "n_" + b.HostIf }

// addRules installs sandbox b's host rules in one batch.
func (m *Manager) addRules(b *box) error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	if !m.tableUp {
		if err := m.createTable(); err != nil {
			return err
		}
	}
	c := m.nft
	t := m.tbl
	hs := m.sets()
	sandboxes, masq, denied, natMap, filterMap := hs.sandboxes, hs.masq, hs.denied, hs.natMap, hs.filterMap
	c.AddObj(&nftables.NamedObj{Table: t, Name: limitName(b), Type: nftables.ObjTypeLimit,
		Obj: &expr.Limit{Type: expr.LimitTypePkts, Rate: kernelLogRate, Unit: expr.LimitTimeSecond, Burst: kernelLogBurst}})
	nat := c.AddChain(&nftables.Chain{Name: natName(b), Table: t})
	f := c.AddChain(&nftables.Chain{Name: filterName(b), Table: t})
	rule := func(ch *nftables.Chain, e ...expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	gw, sbx := b.Gateway.As4(), b.Addr.As4()
	v4 := nfproto(unix.NFPROTO_IPV4)
	v6 := nfproto(unix.NFPROTO_IPV6)
	toGW := cat(v4, ip4(16), cmp(expr.CmpOpEq, gw[:]))
	deny := func(code string, tcp bool, match ...expr.Any) {
		rule(f, cat(match, m.logExprs(b, code), reject(tcp))...)
	}

	// TCP to anything but the gateway goes to the transparent proxy — unless the policy allows
	// nothing at all: then it is refused here, at connect.
	redirect := b.connect
	if redirect {
		if err := m.connectElems(b); err != nil {
			return err
		}
		rule(nat, cat(v4, l4(unix.IPPROTO_TCP), ip4(12), cmp(expr.CmpOpEq, sbx[:]), ip4(16), cmp(expr.CmpOpNeq, gw[:]),
			[]expr.Any{
				&expr.Immediate{Register: 1, Data: gw[:]},
				&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(TransparentPort)},
				&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
			})...)
	}

	// IPv6 neighbour discovery with the host; the link's multicast chatter is dropped unlogged.
	rule(f, cat(v6, l4(unix.IPPROTO_ICMPV6), icmpTypeRange(135, 136), accept())...)
	rule(f, cat(v6, []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 1}},
		cmp(expr.CmpOpEq, []byte{0xff}), drop())...)
	// A forged source address: logged (within the limit), then dropped in any case.
	spoof := cat(v4, ip4(12), cmp(expr.CmpOpNeq, sbx[:]))
	rule(f, cat(spoof, m.logExprs(b, codeSpoof))...)
	rule(f, cat(spoof, drop())...)
	// The gateway's services.
	rule(f, cat(toGW, l4(unix.IPPROTO_UDP), dport(expr.CmpOpEq, DNSPort), accept())...)
	for _, p := range []uint16{DNSPort, ProxyPort, TransparentPort} {
		rule(f, cat(toGW, l4(unix.IPPROTO_TCP), dport(expr.CmpOpEq, p), accept())...)
	}
	rule(f, cat(toGW, l4(unix.IPPROTO_ICMP), icmpType(3), accept())...) // e.g. port unreachable answers
	unrestricted := !b.policy.BlockOutbound
	if unrestricted {
		public := cat(ip4(16), inSet(denied, true), fibUnicast(expr.CmpOpEq))
		udp := cat(v4, l4(unix.IPPROTO_UDP), dport(expr.CmpOpNeq, 853), public)
		echo := cat(v4, l4(unix.IPPROTO_ICMP), icmpType(8), public)
		for _, match := range [][]expr.Any{udp, echo} {
			// A new flow is logged as allowed (within the sandbox's log limit), then accepted.
			rule(f, cat(match, ctState(expr.CtStateBitNEW), m.logExprs(b, codeAllowed))...)
			rule(f, cat(match, accept())...)
		}
	}
	// Refused, logged within the sandbox's limit. Over the limit a packet falls through to the
	// unlogged rejects at the end.
	deny(codeGateway, true, cat(toGW, l4(unix.IPPROTO_TCP))...)
	deny(codeGateway, false, toGW...)
	deny(codeIPv6, true, cat(v6, l4(unix.IPPROTO_TCP))...)
	deny(codeIPv6, false, v6...)
	if unrestricted {
		deny(codeDoT, false, cat(v4, l4(unix.IPPROTO_UDP), dport(expr.CmpOpEq, 853))...)
		deny(codeDenied, false, cat(v4, ip4(16), inSet(denied, false))...)
		deny(codeDenied, false, cat(v4, fibUnicast(expr.CmpOpNeq))...)
	}
	if !redirect {
		deny(codeBlocked, true, cat(v4, l4(unix.IPPROTO_TCP))...)
	}
	deny(codeUDP, false, cat(v4, l4(unix.IPPROTO_UDP))...)
	deny(codeICMP, false, cat(v4, l4(unix.IPPROTO_ICMP))...)
	deny(codeTCP, true, cat(v4, l4(unix.IPPROTO_TCP))...)
	deny(codeOther, false)
	rule(f, cat(l4(unix.IPPROTO_TCP), reject(true))...)
	rule(f, reject(false)...)

	key := ifnameKey(b.HostIf)
	if err := c.SetAddElements(natMap, []nftables.SetElement{{Key: key, VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: natName(b)}}}); err != nil {
		return err
	}
	if err := c.SetAddElements(filterMap, []nftables.SetElement{{Key: key, VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: filterName(b)}}}); err != nil {
		return err
	}
	if err := c.SetAddElements(sandboxes, []nftables.SetElement{{Key: key}}); err != nil {
		return err
	}
	if unrestricted {
		if err := c.SetAddElements(masq, []nftables.SetElement{{Key: sbx[:]}}); err != nil {
			return err
		}
	}
	return c.Flush()
}

// delRules removes sandbox b's host rules in one batch (or, if that fails because part of them is
// missing, piece by piece).
func (m *Manager) delRules(b *box) error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c := m.nft
	hs := m.sets()
	sandboxes, masq, natMap, filterMap := hs.sandboxes, hs.masq, hs.natMap, hs.filterMap
	key := ifnameKey(b.HostIf)
	sbx := b.Addr.As4()
	obj := &nftables.NamedObj{Table: m.tbl, Name: limitName(b), Type: nftables.ObjTypeLimit, Obj: &expr.Limit{}}
	ops := append(m.delConnectElems(b),
		func() error { return c.SetDeleteElements(natMap, []nftables.SetElement{{Key: key}}) },
		func() error { return c.SetDeleteElements(filterMap, []nftables.SetElement{{Key: key}}) },
		func() error { return c.SetDeleteElements(sandboxes, []nftables.SetElement{{Key: key}}) },
		func() error {
			if b.policy.BlockOutbound {
				return nil
			}
			return c.SetDeleteElements(masq, []nftables.SetElement{{Key: sbx[:]}})
		},
		func() error {
			ch := &nftables.Chain{Name: filterName(b), Table: m.tbl}
			c.FlushChain(ch)
			c.DelChain(ch)
			return nil
		},
		func() error {
			ch := &nftables.Chain{Name: natName(b), Table: m.tbl}
			c.FlushChain(ch)
			c.DelChain(ch)
			return nil
		},
		func() error { c.DeleteObject(obj); return nil },
	)
	for _, op := range ops {
		if err := op(); err != nil {
			return err
		}
	}
	if err := c.Flush(); err == nil {
		return nil
	}
	var errs []error
	for _, op := range ops {
		err := op()
		if err == nil {
			err = c.Flush()
		}
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sandboxRules installs the sandbox namespace's own table; it runs on a thread inside that
// namespace. DNS sent to 127.0.0.1:53 (glibc's fallback without a readable resolv.conf) goes to
// the gateway; nothing but loopback and eth0 carries packets.
func (m *Manager) sandboxRules(b *box) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "sandbox"})
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority, policy *nftables.ChainPolicy) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: policy})
	}
	rule := func(ch *nftables.Chain, e ...expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	gw, sbx := b.Gateway.As4(), b.Addr.As4()
	localhost := []byte{127, 0, 0, 1}
	v4 := nfproto(unix.NFPROTO_IPV4)

	out := chain("output_nat", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest, nil)
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		rule(out, cat(v4, l4(proto), ip4(16), cmp(expr.CmpOpEq, localhost), dport(expr.CmpOpEq, DNSPort),
			[]expr.Any{
				&expr.Immediate{Register: 1, Data: gw[:]},
				&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(DNSPort)},
				&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
			})...)
	}
	post := chain("postrouting_nat", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, nil)
	rule(post, cat(oif(peerName), v4, ip4(12), []expr.Any{
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: []byte{255, 0, 0, 0}, Xor: []byte{0, 0, 0, 0}},
	}, cmp(expr.CmpOpEq, []byte{127, 0, 0, 0}), []expr.Any{
		&expr.Immediate{Register: 1, Data: sbx[:]},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
	})...)

	drop := nftables.ChainPolicyDrop
	filter := chain("output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter, &drop)
	rule(filter, cat(oif("lo"), accept())...)
	rule(filter, cat(oif(peerName), v4, accept())...)
	if m.ipv6 {
		// IPv6 goes to the host, which refuses and audits it.
		rule(filter, cat(oif(peerName), nfproto(unix.NFPROTO_IPV6), accept())...)
	} else {
		rule(filter, cat(l4(unix.IPPROTO_TCP), reject(true))...)
		rule(filter, reject(false)...)
	}
	return c.Flush()
}

// Expression helpers.

func cat(parts ...[]expr.Any) []expr.Any { return slices.Concat(parts...) }

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() []expr.Any   { return []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}} }

func reject(tcp bool) []expr.Any {
	if tcp {
		return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}}
	}
	return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}}
}

func cmp(op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{&expr.Cmp{Op: op, Register: 1, Data: data}}
}

func ifnameKey(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func oif(name string) []expr.Any {
	return cat([]expr.Any{&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1}}, cmp(expr.CmpOpEq, ifnameKey(name)))
}

func nfproto(p byte) []expr.Any {
	return cat([]expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}}, cmp(expr.CmpOpEq, []byte{p}))
}

func l4(p byte) []expr.Any {
	return cat([]expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}}, cmp(expr.CmpOpEq, []byte{p}))
}

// ip4 loads the IPv4 header field at off (12: source, 16: destination) into register 1.
func ip4(off uint32) []expr.Any {
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4}}
}

func dport(op expr.CmpOp, port uint16) []expr.Any {
	return cat([]expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}},
		cmp(op, binaryutil.BigEndian.PutUint16(port)))
}

func icmpType(t byte) []expr.Any {
	return cat([]expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1}},
		cmp(expr.CmpOpEq, []byte{t}))
}

func icmpTypeRange(from, to byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{from}, ToData: []byte{to}},
	}
}

func inSet(s *nftables.Set, invert bool) []expr.Any {
	return []expr.Any{&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: invert}}
}

// fibUnicast compares the destination's address type with unicast (not local, broadcast,
// multicast, unreachable).
func fibUnicast(op expr.CmpOp) []expr.Any {
	return cat([]expr.Any{&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true}},
		cmp(op, binaryutil.NativeEndian.PutUint32(unix.RTN_UNICAST)))
}

func ctEstablished() []expr.Any { return ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED) }

// ctState matches packets whose conntrack state is one of bits.
func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// logExprs logs to the manager's NFLOG group with the reason code as prefix, within sandbox b's
// rate limit (over it, the rule stops here).
func (m *Manager) logExprs(b *box, code string) []expr.Any {
	return []expr.Any{
		&expr.Objref{Type: unix.NFT_OBJECT_LIMIT, Name: limitName(b)},
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
			Group: m.log.group, Data: []byte(code), Snaplen: logSnaplen},
	}
}

// intervalElems turns IPv4 prefixes into the elements of an interval set: merged, disjoint
// [start, end) ranges. A range reaching 255.255.255.255 stops just before it (the broadcast
// address is refused as not unicast anyway).
func intervalElems(ps []netip.Prefix) []nftables.SetElement {
	type rng struct{ lo, hi uint64 } // [lo, hi)
	var rs []rng
	for _, p := range ps {
		if !p.Addr().Is4() {
			continue
		}
		a := p.Masked().Addr().As4()
		lo := uint64(binary.BigEndian.Uint32(a[:]))
		rs = append(rs, rng{lo, lo + 1<<(32-p.Bits())})
	}
	slices.SortFunc(rs, func(a, b rng) int {
		switch {
		case a.lo < b.lo:
			return -1
		case a.lo > b.lo:
			return 1
		}
		return 0
	})
	var merged []rng
	for _, r := range rs {
		if n := len(merged); n > 0 && r.lo <= merged[n-1].hi {
			merged[n-1].hi = max(merged[n-1].hi, r.hi)
			continue
		}
		merged = append(merged, r)
	}
	var out []nftables.SetElement
	for _, r := range merged {
		hi := min(r.hi, 1<<32-1)
		out = append(out,
			nftables.SetElement{Key: binary.BigEndian.AppendUint32(nil, uint32(r.lo))},
			nftables.SetElement{Key: binary.BigEndian.AppendUint32(nil, uint32(hi)), IntervalEnd: true})
	}
	return out
}
