// Package egress is the network egress of container sandboxes: the allowlist policy, and the
// gateway that enforces it — a DNS resolver that answers only allowed names, an HTTP(S) proxy,
// and a transparent TCP proxy for clients that ignore proxy settings. Every decision is reported.
//
// The network plumbing (namespaces, veth pairs, nftables) lives in package netsetup; this package
// only sees connections that plumbing steers to it.
package egress

import (
	"context"
	"net/netip"
	"time"
)

// Resolver resolves host names for the gateway; *net.Resolver satisfies it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Rule is one parsed entry of config.network.allow.
type Rule struct {
	Host     string       // lower-case host name without trailing dot; "" for address rules
	Wildcard bool         // "*.company.com": any name below Host (not Host itself)
	Prefix   netip.Prefix // address rules: an IP (as a /32 or /128) or a CIDR; invalid for host rules
	Port     uint16       // 0 = any port
}

// Policy is a sandbox's egress configuration.
type Policy struct {
	BlockOutbound bool   // true: only Rules; false: anything but the always-denied set
	Rules         []Rule // parsed allow entries
}

// Decision is one egress decision, reported to the service for the audit log.
type Decision struct {
	SandboxID string
	Allowed   bool
	Host      string     // the name asked for, if any
	Addr      netip.Addr // the address dialled or asked for, if any
	Port      uint16
	Proto     string // "dns", "http", "https", "tcp", "udp", "icmp", "ipv6"
	Reason    string // why it was denied (empty when allowed)
	Detail    string // more about an allowed attempt, e.g. the original destination was replaced or the dial failed
	Count     int    // how many attempts this decision stands for: 0 or 1 is one; more for a summary of refusals
}

// Answer is a DNS answer the gateway is about to give a sandbox for an allowed name
// (Config.OnAnswer): the addresses it hands out, and the ports the policy allows the name on —
// every port if AnyPort, else Ports. For TTL the gateway pins the addresses to the name: the
// sandbox may connect to them by address on those ports (the address rules aside, that is the
// only way to reach an address on ports other than 80 and 443).
type Answer struct {
	Name    string
	Addrs   []netip.Addr // unmapped, none always denied
	Ports   []uint16     // sorted, no duplicates; empty if AnyPort
	AnyPort bool
	TTL     time.Duration
}
