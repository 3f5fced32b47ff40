package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// ParseRule parses one entry of config.network.allow:
//
//	api.company.com          a host name (exactly this name)
//	*.company.com            any name below company.com (not company.com itself)
//	1.2.3.4, 2001:db8::1     an address
//	10.0.0.0/8, 2001:db8::/32 a CIDR (no host bits set)
//	any of them with :port   api.company.com:443, 1.2.3.4:5432, 10.0.0.0/8:443,
//	                         [2001:db8::1]:443, [2001:db8::/32]:443
//
// Names are case-insensitive and may end in a dot. Entries that can never take effect are refused
// with an error saying why: port 853 (DNS over TLS) and addresses inside the always-denied set
// (loopback, link-local, metadata, multicast, unspecified).
func ParseRule(entry string) (Rule, error) {
	s := strings.TrimSpace(entry)
	fail := func(format string, args ...any) (Rule, error) {
		return Rule{}, fmt.Errorf("%q: %s", entry, fmt.Sprintf(format, args...))
	}
	if s == "" {
		return fail("empty entry")
	}
	if strings.Contains(s, "://") {
		return fail("a host, not a URL: leave out the scheme")
	}
	if strings.ContainsAny(s, " \t\r\n@?#") {
		return fail("not a host name, address or CIDR")
	}

	host, portStr, hasPort := s, "", false
	bracketed := false
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return fail("missing ']'")
		}
		host, bracketed = s[1:end], true
		if rest := s[end+1:]; rest != "" {
			if rest[0] != ':' {
				return fail("unexpected %q after ']'", rest)
			}
			portStr, hasPort = rest[1:], true
		}
	case strings.Count(s, ":") > 1: // a bare IPv6 address or prefix: no port without brackets
	default:
		if i := strings.LastIndexByte(s, ':'); i >= 0 {
			host, portStr, hasPort = s[:i], s[i+1:], true
		}
	}
	var r Rule
	if hasPort {
		p, err := parsePort(portStr)
		if err != nil {
			return fail("%v", err)
		}
		if p == dotPort {
			return fail("port 853 (DNS over TLS) is always denied")
		}
		r.Port = p
	}
	if host == "" {
		return fail("missing host")
	}

	// Addresses and CIDRs.
	if strings.Contains(host, "/") || strings.Contains(host, ":") || looksNumeric(host) {
		pfx, err := parsePrefix(host)
		if err != nil {
			return fail("%v", err)
		}
		if bracketed && !pfx.Addr().Is6() {
			return fail("brackets are for IPv6 addresses only")
		}
		if why := fixedDeniedPrefix(pfx); why != "" {
			return fail("%s is always denied (%s) and cannot be allowed", pfx.Masked(), why)
		}
		r.Prefix = pfx
		return r, nil
	}
	if bracketed {
		return fail("brackets are for IPv6 addresses only")
	}

	// Names.
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if strings.HasPrefix(name, "*.") {
		r.Wildcard = true
		name = name[2:]
	}
	if err := checkName(name); err != nil {
		return fail("%v", err)
	}
	r.Host = name
	return r, nil
}

// ParsePolicy parses config.network: every allow entry must parse (the error names the first that
// does not); exact duplicates are dropped.
func ParsePolicy(blockOutbound bool, allow []string) (Policy, error) {
	p := Policy{BlockOutbound: blockOutbound}
	seen := make(map[Rule]bool, len(allow))
	for _, a := range allow {
		r, err := ParseRule(a)
		if err != nil {
			return Policy{}, err
		}
		if !seen[r] {
			seen[r] = true
			p.Rules = append(p.Rules, r)
		}
	}
	return p, nil
}

// String formats the rule the way ParseRule reads it.
func (r Rule) String() string {
	var h string
	switch {
	case r.Host != "" && r.Wildcard:
		h = "*." + r.Host
	case r.Host != "":
		h = r.Host
	case r.Prefix.IsSingleIP():
		h = r.Prefix.Addr().String()
	default:
		h = r.Prefix.String()
	}
	if r.Port == 0 {
		return h
	}
	if r.Host == "" && r.Prefix.Addr().Is6() {
		h = "[" + h + "]"
	}
	return h + ":" + strconv.Itoa(int(r.Port))
}

// matchesName reports whether the host rule r covers the normalized name.
func (r Rule) matchesName(name string) bool {
	if r.Host == "" {
		return false
	}
	if r.Wildcard {
		return len(name) > len(r.Host)+1 && strings.HasSuffix(name, r.Host) && name[len(name)-len(r.Host)-1] == '.'
	}
	return name == r.Host
}

func (r Rule) matchesPort(port uint16) bool { return r.Port == 0 || port == 0 || r.Port == port }

// AllowsName reports whether the policy lets the sandbox reach name on port (0: on some port).
// Only host rules count: an exact name, or a wildcard for names strictly below it. With
// BlockOutbound false every name is allowed (its addresses are still checked against the
// always-denied set by the gateway).
func (p Policy) AllowsName(name string, port uint16) bool {
	if !p.BlockOutbound {
		return true
	}
	name = normalizeName(name)
	if name == "" {
		return false
	}
	for _, r := range p.Rules {
		if r.matchesName(name) && r.matchesPort(port) {
			return true
		}
	}
	return false
}

// NamePorts reports the ports the policy allows name on: every port (a matching host rule
// without a port, or BlockOutbound false), else those of the matching host rules, sorted (none if
// no host rule matches).
func (p Policy) NamePorts(name string) (ports []uint16, anyPort bool) {
	if !p.BlockOutbound {
		return nil, true
	}
	name = normalizeName(name)
	for _, r := range p.Rules {
		if !r.matchesName(name) {
			continue
		}
		if r.Port == 0 {
			return nil, true
		}
		ports = append(ports, r.Port)
	}
	slices.Sort(ports)
	return slices.Compact(ports), false
}

// AllowsAddr reports whether the policy lets the sandbox reach a on port (0: on some port) by
// address: only address and CIDR rules count. With BlockOutbound false every address is allowed;
// the always-denied set is checked separately (by the gateway).
func (p Policy) AllowsAddr(a netip.Addr, port uint16) bool {
	if !p.BlockOutbound {
		return true
	}
	return p.listsAddr(a, port)
}

// listsAddr reports whether an address rule covers a on port, whatever BlockOutbound says.
func (p Policy) listsAddr(a netip.Addr, port uint16) bool {
	a = a.Unmap().WithZone("")
	for _, r := range p.Rules {
		if r.Host == "" && r.Prefix.IsValid() && r.Prefix.Contains(a) && r.matchesPort(port) {
			return true
		}
	}
	return false
}

// listsPrivate reports whether an address rule at least as specific as the private range rng
// covers a on port: "10.0.0.0/8" or "10.1.2.3" lists 10.1.2.3, "0.0.0.0/0" does not.
func (p Policy) listsPrivate(a netip.Addr, port uint16, rng netip.Prefix) bool {
	for _, r := range p.Rules {
		if r.Host == "" && r.Prefix.IsValid() && r.Prefix.Bits() >= rng.Bits() && r.Prefix.Contains(a) && r.matchesPort(port) {
			return true
		}
	}
	return false
}

// StaticResolver resolves names from a fixed table (keys: lower-case names without the trailing
// dot). Unknown names, or names without an address of the asked family, give a *net.DNSError
// with IsNotFound. It implements Resolver.
type StaticResolver map[string][]netip.Addr

// LookupNetIP implements Resolver. network is "ip", "ip4" or "ip6".
func (s StaticResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var in []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		in = []netip.Addr{a}
	} else {
		in = s[normalizeName(host)]
	}
	var out []netip.Addr
	for _, a := range in {
		u := a.Unmap()
		switch {
		case network == "ip4" && !u.Is4(), network == "ip6" && u.Is4():
			continue
		case network == "ip6":
			out = append(out, a)
		default:
			out = append(out, u)
		}
	}
	if len(out) == 0 {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return out, nil
}

// --- helpers

const dotPort = 853

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("empty port")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a number", s)
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %s is out of range 1-65535", s)
	}
	return uint16(n), nil
}

// looksNumeric: digits and dots only (an IPv4 address or a mistyped one, never a host name).
func looksNumeric(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && c != '.' {
			return false
		}
	}
	return true
}

// parsePrefix reads an address (as a single-address prefix) or a CIDR, IPv4-mapped IPv6 unmapped.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "%") {
		return netip.Prefix{}, errors.New("addresses with a zone are not allowed")
	}
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%s has host bits set (did you mean %s?)", p, p.Masked())
	}
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p, nil
}

// checkName validates a lower-case host name (without "*." and trailing dot).
func checkName(name string) error {
	if name == "" {
		return errors.New("empty host name")
	}
	if len(name) > 253 {
		return errors.New("host name longer than 253 characters")
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		switch {
		case l == "":
			return errors.New("empty label in host name")
		case l == "*":
			return errors.New(`a wildcard must be the whole first label: "*.company.com"`)
		case len(l) > 63:
			return fmt.Errorf("label %q longer than 63 characters", l)
		case l[0] == '-' || l[len(l)-1] == '-':
			return fmt.Errorf("label %q starts or ends with '-'", l)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				if c >= 0x80 {
					return fmt.Errorf("label %q is not ASCII: write internationalized names in their xn-- form", l)
				}
				return fmt.Errorf("invalid character %q in host name", c)
			}
		}
	}
	if looksNumeric(labels[len(labels)-1]) {
		return errors.New("the last label of a host name cannot be numeric (not an IP address either)")
	}
	return nil
}

// normalizeName lower-cases a name and drops one trailing dot.
func normalizeName(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}
