package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// netinitCommand is "sandbox-agent netinit PORT[,PORT…] [GATEWAY_UID]": a pod's init container
// (the kubernetes driver's; the only container of the pod with NET_ADMIN, which the sandbox's
// container never has) installs the sandbox's egress rules in the pod's network namespace (table
// inet sandboxd), then exits. The sandbox cannot change them: it has no capability in the
// namespace.
//
// Without GATEWAY_UID (a policy that blocks everything): chain output (policy drop) lets out only
// loopback and the TCP replies of the pod's servers (source port one of PORT: the agent's and the
// files sidecar's; a connection to one of them is the only one the pod answers); everything else
// the pod sends, of any protocol, to any address (other pods, the node, the apiserver, the
// internet) is stopped: a TCP connection is refused at once (its SYN answered with a reset), anything
// else dropped.
//
// With GATEWAY_UID (the pod's egress gateway, "sandbox-agent egress", runs as that uid): chain
// redirect (nat, output) sends the IPv4 DNS (udp and tcp 53, any address, loopback included) of
// every other uid to 127.0.0.1:15053 and its other IPv4 TCP not bound for loopback to
// 127.0.0.1:15001 (the gateway's DNS and transparent
// ports: SO_ORIGINAL_DST gives the gateway the destination, same namespace); chain output
// (policy drop) lets out loopback, the servers' replies, what was redirected (ct status dnat) and
// whatever GATEWAY_UID sends — nothing
// else: the sandbox's UDP, ICMP and IPv6, and any packet of another uid that is not redirected
// to loopback, are dropped (TCP refused with a reset). A process of the sandbox cannot become
// GATEWAY_UID (no capability, no setuid binary under no_new_privs).
const netinitCommand = "netinit"

func netinitMain(args []string) {
	var ports []uint16
	var err error
	for _, a := range strings.Split(argOr(args, 0), ",") {
		p, perr := strconv.ParseUint(a, 10, 16)
		if perr != nil || p == 0 {
			err = fmt.Errorf("port %q", a)
		}
		ports = append(ports, uint16(p))
	}
	gw := uint64(0)
	var gerr error
	if len(args) == 2 {
		gw, gerr = strconv.ParseUint(args[1], 10, 32)
		if gw == 0 {
			gerr = fmt.Errorf("the gateway's uid must not be root")
		}
	}
	if len(args) < 1 || len(args) > 2 || err != nil || gerr != nil {
		fmt.Fprintln(os.Stderr, "usage: sandbox-agent netinit PORT[,PORT…] [GATEWAY_UID]")
		os.Exit(2)
	}
	if err := netRules(ports, uint32(gw)); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-agent netinit:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func argOr(args []string, i int) string {
	if i < len(args) {
		return args[i]
	}
	return ""
}

// netRules installs the rules (see netinitCommand); gatewayUID 0: no gateway.
func netRules(ports []uint16, gatewayUID uint32) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "sandboxd"})
	drop := nftables.ChainPolicyDrop
	ch := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	ret := &expr.Verdict{Kind: expr.VerdictReturn}
	onLoopback := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("lo")},
	}
	uid := binary.NativeEndian.AppendUint32(nil, gatewayUID)
	ofGateway := []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: uid},
	}
	// oifname "lo" accept
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: append(slices.Clone(onLoopback), accept)})
	// meta l4proto tcp tcp sport PORT accept, for each PORT
	for _, port := range ports {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			l4proto(),
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
			accept,
		}})
	}
	if gatewayUID != 0 {
		// meta skuid GATEWAY_UID accept
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: append(slices.Clone(ofGateway), accept)})
		// ct status dnat accept: what chain redirect sent to the gateway. (Rerouted to loopback,
		// but oifname still names the interface routed to before the redirect.)
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binary.NativeEndian.AppendUint32(nil, ipsDstNAT), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
			accept,
		}})

		nat := c.AddChain(&nftables.Chain{Name: "redirect", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
		c.AddRule(&nftables.Rule{Table: t, Chain: nat, Exprs: append(slices.Clone(ofGateway), ret)})
		redirect := func(proto byte, dport, to uint16) {
			e := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
				l4proto(),
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			}
			if dport != 0 {
				e = append(e,
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, dport)})
			}
			e = append(e,
				&expr.Immediate{Register: 1, Data: binary.BigEndian.AppendUint16(nil, to)},
				&expr.Redir{RegisterProtoMin: 1})
			c.AddRule(&nftables.Rule{Table: t, Chain: nat, Exprs: e})
		}
		// DNS to any server, loopback ones too (a resolv.conf naming 127.0.0.53 works as well).
		redirect(unix.IPPROTO_UDP, 53, podDNSPort)
		redirect(unix.IPPROTO_TCP, 53, podDNSPort)
		c.AddRule(&nftables.Rule{Table: t, Chain: nat, Exprs: append(slices.Clone(onLoopback), ret)})
		redirect(unix.IPPROTO_TCP, 0, podTransparentPort)
	}
	// meta l4proto tcp tcp flags & (syn|ack) == syn reject with tcp reset: a TCP connection the
	// rules above do not let out is refused at once (as the container driver refuses it), not
	// left to time out on the drop. Only the opening SYN: what else is not let out is dropped.
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		l4proto(),
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpSYN}},
		&expr.Reject{Type: unix.NFT_REJECT_TCP_RST},
	}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return nil
}

// ipsDstNAT is IPS_DST_NAT (linux/netfilter/nf_conntrack_common.h): the connection's destination
// was translated (here: redirected).
const ipsDstNAT = 1 << 5

// TCP header flags (byte 13 of the header).
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

func l4proto() expr.Any { return &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1} }

// ifname is an interface name as nftables compares it (IFNAMSIZ bytes, NUL-padded).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}
