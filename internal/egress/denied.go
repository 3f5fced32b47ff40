package egress

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

type namedPrefix struct {
	p   netip.Prefix
	why string
}

func mustPrefixes(kv ...string) []namedPrefix {
	out := make([]namedPrefix, 0, len(kv)/2)
	for i := 0; i < len(kv); i += 2 {
		out = append(out, namedPrefix{netip.MustParsePrefix(kv[i]), kv[i+1]})
	}
	return out
}

// fixedDenied is never reachable, whatever the policy lists.
var fixedDenied = mustPrefixes(
	"0.0.0.0/8", "unspecified address",
	"127.0.0.0/8", "loopback",
	"169.254.0.0/16", "link-local",
	"224.0.0.0/4", "multicast",
	"240.0.0.0/4", "reserved or broadcast",
	"::/128", "unspecified address",
	"::1/128", "loopback",
	"fe80::/10", "link-local",
	"ff00::/8", "multicast",
	"fd00:ec2::254/128", "cloud metadata",
)

// privateRanges are denied unless an address rule at least as specific lists the address.
var privateRanges = mustPrefixes(
	"10.0.0.0/8", "private",
	"172.16.0.0/12", "private",
	"192.168.0.0/16", "private",
	"100.64.0.0/10", "shared address space (CGNAT)",
	"192.0.0.0/24", "IETF protocol assignments",
	"198.18.0.0/15", "benchmarking",
	"fc00::/7", "unique local",
	"fec0::/10", "site-local",
	"64:ff9b:1::/48", "local-use NAT64",
)

// nat64 embeds IPv4 addresses; they are checked as such.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// fixedDeniedPrefix says why p lies wholly inside the fixed always-denied set ("" if it does not).
func fixedDeniedPrefix(p netip.Prefix) string {
	for _, d := range fixedDenied {
		if d.p.Bits() <= p.Bits() && d.p.Contains(p.Addr()) {
			return d.why
		}
	}
	return ""
}

// AlwaysDenied returns the fixed always-denied prefixes (never reachable) and the private ranges
// (reachable only when an address rule at least as specific lists them). The gateway also denies
// the host's own addresses, Config.Denied and port 853.
func AlwaysDenied() (fixed, private []netip.Prefix) {
	for _, d := range fixedDenied {
		fixed = append(fixed, d.p)
	}
	for _, d := range privateRanges {
		private = append(private, d.p)
	}
	return fixed, private
}

// denyReason says why the gateway must not dial a:port for a sandbox with policy p, or "" if the
// always-denied set lets it (the policy's own rules are checked by the caller). port 0: any port.
func (g *Gateway) denyReason(a netip.Addr, port uint16, p Policy) string {
	if port == dotPort {
		return "port 853 (DNS over TLS) is always denied"
	}
	a = a.Unmap().WithZone("")
	if !a.IsValid() {
		return "no address"
	}
	for _, d := range g.cfg.Denied {
		if d.Contains(a) {
			return fmt.Sprintf("%s is reserved (sandbox network or the service) and always denied", a)
		}
	}
	for _, e := range g.cfg.ExemptForTests {
		if e.Contains(a) {
			return ""
		}
	}
	for _, d := range fixedDenied {
		if d.p.Contains(a) {
			return fmt.Sprintf("%s is %s and always denied", a, d.why)
		}
	}
	if g.hosts.contains(a) {
		return fmt.Sprintf("%s is an address of the gateway host and always denied", a)
	}
	if nat64.Contains(a) {
		b := a.As16()
		v4 := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
		if r := g.denyReason(v4, port, p); r != "" {
			return fmt.Sprintf("%s embeds %s: %s", a, v4, r)
		}
	}
	for _, d := range privateRanges {
		if d.p.Contains(a) && !p.listsPrivate(a, port, d.p) {
			return fmt.Sprintf("%s is in a %s range (%s) not listed in the allow list", a, d.why, d.p)
		}
	}
	return ""
}

// hostAddrs caches the host's own addresses, refreshed when older than hostAddrsTTL (and on
// demand, e.g. when a sandbox is attached: its gateway address is new).
type hostAddrs struct {
	mu   sync.Mutex
	at   time.Time
	set  map[netip.Addr]struct{}
	list func() ([]net.Addr, error)
}

const hostAddrsTTL = 2 * time.Second

func (h *hostAddrs) refresh() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refreshLocked()
}

func (h *hostAddrs) refreshLocked() {
	list := h.list
	if list == nil {
		list = net.InterfaceAddrs
	}
	addrs, err := list()
	if err != nil && h.set != nil {
		return // keep the last good snapshot; retry after the TTL
	}
	set := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if x, ok := netip.AddrFromSlice(ip); ok {
			set[x.Unmap()] = struct{}{}
		}
	}
	h.set, h.at = set, time.Now()
}

func (h *hostAddrs) contains(a netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.set == nil || time.Since(h.at) > hostAddrsTTL {
		h.refreshLocked()
	}
	_, ok := h.set[a]
	return ok
}
