package egress

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

func answers(m *dns.Msg) []netip.Addr {
	var out []netip.Addr
	for _, rr := range m.Answer {
		switch v := rr.(type) {
		case *dns.A:
			a, _ := netip.AddrFromSlice(v.A)
			out = append(out, a.Unmap())
		case *dns.AAAA:
			a, _ := netip.AddrFromSlice(v.AAAA)
			out = append(out, a)
		}
	}
	return out
}

func TestDNS(t *testing.T) {
	e := newEnv(t, true, "api.company.com:443", "*.svc.company.com", "internal.company.com", "loop.company.com",
		"mixed.company.com", "meta.company.com", "sandbox.company.com", "nowhere.company.com")
	cases := []struct {
		name  string
		qtype uint16
		rcode int
		want  []string
		why   string // the denied decision's reason, if one is expected
	}{
		{"api.company.com", dns.TypeA, dns.RcodeSuccess, []string{"198.51.100.10"}, ""},
		{"API.Company.com", dns.TypeA, dns.RcodeSuccess, []string{"198.51.100.10"}, ""},
		{"api.company.com", dns.TypeAAAA, dns.RcodeSuccess, []string{"2001:db8::10"}, ""},
		{"api.company.com", dns.TypeTXT, dns.RcodeSuccess, nil, ""},
		{"api.company.com", dns.TypeMX, dns.RcodeSuccess, nil, ""},
		{"x.svc.company.com", dns.TypeA, dns.RcodeSuccess, []string{"198.51.100.12"}, ""},
		{"x.svc.company.com", dns.TypeAAAA, dns.RcodeSuccess, nil, ""}, // exists, no IPv6
		{"svc.company.com", dns.TypeA, dns.RcodeNameError, nil, "not on the allow list"},
		{"nope.svc.company.com", dns.TypeA, dns.RcodeNameError, nil, ""}, // allowed, does not exist
		{"nowhere.company.com", dns.TypeA, dns.RcodeNameError, nil, ""},
		{"evil.example", dns.TypeA, dns.RcodeNameError, nil, "evil.example is not on the allow list"},
		{"evil.example", dns.TypeTXT, dns.RcodeNameError, nil, "not on the allow list"},
		{"company.com", dns.TypeA, dns.RcodeNameError, nil, "not on the allow list"},
		{"internal.company.com", dns.TypeA, dns.RcodeNameError, nil, "private"},
		{"loop.company.com", dns.TypeA, dns.RcodeNameError, nil, "loopback"},
		{"mixed.company.com", dns.TypeA, dns.RcodeSuccess, []string{"198.51.100.11"}, ""},
		{"meta.company.com", dns.TypeA, dns.RcodeNameError, nil, "resolves only to always-denied addresses"},
		{"meta.company.com", dns.TypeAAAA, dns.RcodeNameError, nil, "link-local"},
		{"sandbox.company.com", dns.TypeA, dns.RcodeNameError, nil, "reserved"},
	}
	for _, network := range []string{"udp", "tcp"} {
		for _, tc := range cases {
			r := e.dns(tc.name, tc.qtype, network)
			got := answers(r)
			var want []netip.Addr
			for _, w := range tc.want {
				want = append(want, addr(w))
			}
			if r.Rcode != tc.rcode || !slices.Equal(got, want) {
				t.Errorf("%s %s %s: %s %v, want %s %v", network, tc.name, dns.TypeToString[tc.qtype],
					dns.RcodeToString[r.Rcode], got, dns.RcodeToString[tc.rcode], want)
			}
			for _, rr := range r.Answer {
				if rr.Header().Ttl != dnsTTL || rr.Header().Name != dns.Fqdn(tc.name) {
					t.Errorf("%s: answer %v: want TTL %d and the name as asked", tc.name, rr, dnsTTL)
				}
			}
			if len(r.Answer) > 0 && !r.RecursionAvailable {
				t.Errorf("%s: RA not set", tc.name)
			}
			if tc.why != "" {
				e.rec.wait(t, "dns denied "+tc.name, func(d Decision) bool {
					return !d.Allowed && d.Proto == "dns" && d.Host == strings.ToLower(tc.name) && strings.Contains(d.Reason, tc.why)
				})
			}
		}
	}

	// Allowed names are reported once each; denials once per name within a short window.
	if n := e.rec.count(func(d Decision) bool { return d.Allowed && d.Host == "api.company.com" }); n != 1 {
		t.Errorf("api.company.com reported allowed %d times, want once", n)
	}
	if n := e.rec.count(func(d Decision) bool { return !d.Allowed && d.Host == "evil.example" }); n != 1 {
		t.Errorf("evil.example reported denied %d times within %v, want once", n, dnsDenyRepeat)
	}
	for _, d := range e.rec.all() {
		if d.SandboxID != e.id || d.Proto != "dns" || d.Port != DNSPort {
			t.Errorf("bad decision %+v", d)
		}
	}

	// What was answered is pinned to the name; what was not, is not.
	s := e.g.sandboxes[e.id]
	for a, want := range map[string][]string{"198.51.100.10": {"api.company.com"}, "2001:db8::10": {"api.company.com"},
		"198.51.100.11": {"mixed.company.com"}, "127.0.0.1": nil, "10.1.2.3": nil, "203.0.113.66": nil} {
		if got := s.pinnedNames(addr(a)); !slices.Equal(got, want) {
			t.Errorf("pins of %s: %v, want %v", a, got, want)
		}
	}

	// A reverse lookup is answered NXDOMAIN, not reported.
	before := len(e.rec.all())
	if r := e.dns("10.100.51.198.in-addr.arpa", dns.TypePTR, "udp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("PTR: %s", dns.RcodeToString[r.Rcode])
	}
	if len(e.rec.all()) != before {
		t.Errorf("a reverse lookup was reported: %+v", e.rec.all()[before:])
	}
}

// TestDNSListedPrivate: an address rule opens a private range to a name's answers.
func TestDNSListedPrivate(t *testing.T) {
	e := newEnv(t, true, "internal.company.com", "10.0.0.0/8")
	if got := answers(e.dns("internal.company.com", dns.TypeA, "udp")); !slices.Equal(got, []netip.Addr{addr("10.1.2.3")}) {
		t.Errorf("internal.company.com with 10.0.0.0/8 listed: %v", got)
	}
}

// TestDNSOpen: with block_outbound false every name resolves, minus the always-denied answers.
func TestDNSOpen(t *testing.T) {
	e := newEnv(t, false)
	if got := answers(e.dns("evil.example", dns.TypeA, "udp")); !slices.Equal(got, []netip.Addr{addr("203.0.113.66")}) {
		t.Errorf("evil.example with block_outbound false: %v", got)
	}
	if r := e.dns("loop.company.com", dns.TypeA, "udp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("loop.company.com: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	if r := e.dns("internal.company.com", dns.TypeA, "tcp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("internal.company.com: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	if r := e.dns("bad_name-.example", dns.TypeA, "udp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("invalid name: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
}
