package egress

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// TestAlwaysDenied: the set checked on every address the gateway would dial or answer.
func TestAlwaysDenied(t *testing.T) {
	g, err := NewGateway(Config{Denied: []netip.Prefix{testPool, pfx("192.0.2.80/32")}})
	if err != nil {
		t.Fatal(err)
	}
	// The host's own addresses, as the gateway enumerates them.
	g.hosts.list = func() ([]net.Addr, error) {
		return []net.Addr{
			&net.IPNet{IP: net.ParseIP("203.0.113.5"), Mask: net.CIDRMask(24, 32)},
			&net.IPNet{IP: net.ParseIP("2001:db8:5::1"), Mask: net.CIDRMask(64, 128)},
		}, nil
	}
	g.hosts.refresh()

	none := mustPolicy(t, true)
	open := mustPolicy(t, false)
	tenNet := mustPolicy(t, true, "10.0.0.0/8")
	tenOne := mustPolicy(t, true, "10.1.2.3:5432")
	everything := mustPolicy(t, false, "0.0.0.0/0", "::/0")
	ula := mustPolicy(t, true, "fd12::/16", "fc00::/7")
	cases := []struct {
		addr string
		port uint16
		p    Policy
		why  string // "" allowed
	}{
		{"198.51.100.10", 443, open, ""},
		{"2001:db8::10", 443, open, ""},
		{"198.51.100.10", 853, open, "853"},
		{"127.0.0.1", 80, open, "loopback"},
		{"127.1.2.3", 80, everything, "loopback"},
		{"::1", 80, open, "loopback"},
		{"::ffff:127.0.0.1", 80, open, "loopback"},
		{"0.0.0.0", 80, open, "unspecified"},
		{"0.1.2.3", 80, open, "unspecified"},
		{"::", 80, open, "unspecified"},
		{"169.254.169.254", 80, everything, "link-local"},
		{"fe80::1", 80, everything, "link-local"},
		{"fd00:ec2::254", 80, ula, "metadata"},
		{"224.0.0.251", 5353, everything, "multicast"},
		{"ff02::1", 80, everything, "multicast"},
		{"255.255.255.255", 80, everything, "broadcast"},
		{"203.0.113.5", 22, everything, "gateway host"},
		{"2001:db8:5::1", 22, everything, "gateway host"},
		{"203.0.113.6", 22, open, ""}, // the host's subnet is not the host
		{"10.213.0.6", 80, tenNet, "reserved"},
		{"192.0.2.80", 80, everything, "reserved"},
		{"10.1.2.3", 80, none, "private"},
		{"10.1.2.3", 80, open, "private"},
		{"10.1.2.3", 80, everything, "private"}, // 0.0.0.0/0 does not list a private range
		{"10.1.2.3", 80, tenNet, ""},
		{"10.1.2.3", 5432, tenOne, ""},
		{"10.1.2.3", 0, tenOne, ""},
		{"10.1.2.3", 22, tenOne, "private"},
		{"10.1.2.4", 5432, tenOne, "private"},
		{"172.16.0.1", 80, open, "private"},
		{"172.32.0.1", 80, open, ""},
		{"192.168.1.1", 80, open, "private"},
		{"100.64.0.1", 80, open, "CGNAT"},
		{"198.18.0.20", 80, open, "benchmarking"},
		{"fc00::1", 80, open, "unique local"},
		{"fd12::1", 80, ula, ""},
		{"64:ff9b::7f00:1", 80, everything, "embeds 127.0.0.1"},
		{"64:ff9b::a01:203", 80, open, "embeds 10.1.2.3"},
		{"64:ff9b::c633:640a", 80, open, ""}, // 198.51.100.10
	}
	for _, tc := range cases {
		got := g.denyReason(addr(tc.addr), tc.port, tc.p)
		switch {
		case tc.why == "" && got != "":
			t.Errorf("%s:%d with %v: denied (%s), want allowed", tc.addr, tc.port, tc.p.Rules, got)
		case tc.why != "" && !strings.Contains(got, tc.why):
			t.Errorf("%s:%d with %v: %q, want a denial mentioning %q", tc.addr, tc.port, tc.p.Rules, got, tc.why)
		}
	}

	// ExemptForTests opens the fixed set and the host's addresses, not Denied.
	ex, err := NewGateway(Config{Denied: []netip.Prefix{testPool}, ExemptForTests: []netip.Prefix{pfx("127.0.0.0/8"), pfx("10.213.0.0/24")}})
	if err != nil {
		t.Fatal(err)
	}
	if r := ex.denyReason(addr("127.0.0.2"), 80, none); r != "" {
		t.Errorf("exempt loopback denied: %s", r)
	}
	if r := ex.denyReason(addr("10.213.0.6"), 80, open); !strings.Contains(r, "reserved") {
		t.Errorf("Denied must win over ExemptForTests: %q", r)
	}
	if r := ex.denyReason(addr("127.0.0.2"), 853, open); !strings.Contains(r, "853") {
		t.Errorf("853 must stay denied: %q", r)
	}

	if _, err := NewGateway(Config{Denied: []netip.Prefix{{}}}); err == nil {
		t.Error("an invalid Denied prefix must be refused")
	}
}

func TestAlwaysDeniedList(t *testing.T) {
	fixed, private := AlwaysDenied()
	for _, want := range []string{"127.0.0.0/8", "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"} {
		if !slices.Contains(fixed, pfx(want)) {
			t.Errorf("fixed set lacks %s", want)
		}
	}
	for _, want := range []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"} {
		if !slices.Contains(private, pfx(want)) {
			t.Errorf("private set lacks %s", want)
		}
	}
}
