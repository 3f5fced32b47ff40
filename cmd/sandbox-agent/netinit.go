package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// netinitCommand is "sandbox-agent netinit PORT...": a pod's init container (the kubernetes
// driver's; the only container of the pod with NET_ADMIN, which the sandbox's container never
// has) installs the egress rules of a sandbox whose policy blocks everything in the pod's network
// namespace, then exits. The rules (table inet sandboxd, chain output, policy drop) let out only
// loopback and the TCP replies of the pod's servers (source port one of PORT: the agent's and the
// files sidecar's; a connection to one of them is the only one the pod answers); everything else
// the pod sends, of any protocol, to any address (other pods, the node, the apiserver, the
// internet) is dropped. The sandbox cannot change them: it has no capability in the namespace.
const netinitCommand = "netinit"

func netinitMain(args []string) {
	var ports []uint16
	for _, a := range args {
		port, err := strconv.ParseUint(a, 10, 16)
		if err != nil || port == 0 {
			ports = nil
			break
		}
		ports = append(ports, uint16(port))
	}
	if len(ports) == 0 {
		fmt.Fprintln(os.Stderr, "usage: sandbox-agent netinit PORT...")
		os.Exit(2)
	}
	if err := blockEgress(ports); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-agent netinit:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func blockEgress(ports []uint16) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "sandboxd"})
	drop := nftables.ChainPolicyDrop
	ch := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	// oifname "lo" accept
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("lo")},
		accept,
	}})
	// meta l4proto tcp tcp sport PORT accept, for each PORT
	for _, port := range ports {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
			accept,
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return nil
}

// ifname is an interface name as nftables compares it (IFNAMSIZ bytes, NUL-padded).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}
