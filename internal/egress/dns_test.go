package egress

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/sandboxd/sandboxd/internal/waitfor"
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

// TestDNSOnAnswer: Config.OnAnswer sees every answer that hands out addresses — its addresses,
// the name's ports, the pin's lifetime — before the answer leaves; when it fails, the answer is
// SERVFAIL, reported, and nothing is pinned.
func TestDNSOnAnswer(t *testing.T) {
	var mu sync.Mutex
	var got []Answer
	entered, release := make(chan struct{}, 1), make(chan struct{})
	hook := func(id string, a Answer) error {
		if id != "sbx_"+t.Name() {
			t.Errorf("OnAnswer for sandbox %q", id)
		}
		mu.Lock()
		got = append(got, Answer{Name: a.Name, Addrs: slices.Clone(a.Addrs), Ports: slices.Clone(a.Ports), AnyPort: a.AnyPort, TTL: a.TTL})
		mu.Unlock()
		switch a.Name {
		case "db.company.com":
			entered <- struct{}{}
			<-release
		case "mixed.company.com":
			return errors.New("no room")
		}
		return nil
	}
	e := newEnvConfig(t, Config{OnAnswer: hook, PinTTL: 5 * time.Minute},
		mustPolicy(t, true, "api.company.com", "db.company.com:5432", "db.company.com:6543", "mixed.company.com", "evil.example:443"))

	// The answer waits for the hook.
	done := make(chan []netip.Addr, 1)
	go func() { done <- answers(e.dns("db.company.com", dns.TypeA, "udp")) }()
	<-entered
	select {
	case a := <-done:
		t.Fatalf("the answer %v left before OnAnswer returned", a)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if a := <-done; !slices.Equal(a, []netip.Addr{addr("198.51.100.20")}) {
		t.Errorf("db.company.com: %v", a)
	}

	if a := answers(e.dns("api.company.com", dns.TypeAAAA, "tcp")); !slices.Equal(a, []netip.Addr{addr("2001:db8::10")}) {
		t.Errorf("api.company.com AAAA: %v", a)
	}
	e.dns("evil.example", dns.TypeA, "udp")
	e.dns("api.company.com", dns.TypeTXT, "udp") // no addresses: no hook
	e.dns("loop.company.com", dns.TypeA, "udp")  // not allowed: no hook
	r := e.dns("mixed.company.com", dns.TypeA, "udp")
	if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
		t.Errorf("mixed.company.com with a failing hook: %s %v, want SERVFAIL", dns.RcodeToString[r.Rcode], r.Answer)
	}
	e.rec.wait(t, "pin failure", func(d Decision) bool {
		return !d.Allowed && d.Host == "mixed.company.com" && d.Proto == "dns" && strings.Contains(d.Reason, "no room")
	})
	if names := e.g.sandboxes[e.id].pinnedNames(addr("198.51.100.11")); len(names) != 0 {
		t.Errorf("the refused answer was pinned: %v", names)
	}

	mu.Lock()
	defer mu.Unlock()
	want := []Answer{
		{Name: "db.company.com", Addrs: []netip.Addr{addr("198.51.100.20")}, Ports: []uint16{5432, 6543}},
		{Name: "api.company.com", Addrs: []netip.Addr{addr("198.51.100.10"), addr("2001:db8::10")}, AnyPort: true},
		{Name: "evil.example", Addrs: []netip.Addr{addr("203.0.113.66")}, Ports: []uint16{443}},
		{Name: "mixed.company.com", Addrs: []netip.Addr{addr("198.51.100.11")}, AnyPort: true},
	}
	if len(got) != len(want) {
		t.Fatalf("OnAnswer got %+v, want %+v", got, want)
	}
	for i, w := range want {
		g := got[i]
		if g.Name != w.Name || !slices.Equal(g.Addrs, w.Addrs) || !slices.Equal(g.Ports, w.Ports) || g.AnyPort != w.AnyPort || g.TTL != 5*time.Minute {
			t.Errorf("OnAnswer %d: %+v, want %+v with TTL 5m", i, g, w)
		}
	}
}

// TestPinTTL: an answer's addresses are reachable by address for Config.PinTTL, then no more.
func TestPinTTL(t *testing.T) {
	e := newEnvConfig(t, Config{PinTTL: 300 * time.Millisecond}, mustPolicy(t, true, "db.company.com:5432"))
	s := e.g.sandboxes[e.id]
	if _, why := s.checkAddr(addr("198.51.100.20"), 5432); why == "" {
		t.Fatal("allowed before any answer")
	}
	e.dns("db.company.com", dns.TypeA, "udp")
	if host, why := s.checkAddr(addr("198.51.100.20"), 5432); why != "" || host != "db.company.com" {
		t.Errorf("after the answer: %q %q", host, why)
	}
	waitfor.True(t, 10*time.Second, func() bool { // the pin's lifetime ends
		_, why := s.checkAddr(addr("198.51.100.20"), 5432)
		return strings.Contains(why, "not on the allow list")
	})
}
