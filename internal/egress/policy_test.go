package egress

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func TestParseRule(t *testing.T) {
	good := []struct {
		in   string
		want Rule
	}{
		{"api.company.com", Rule{Host: "api.company.com"}},
		{"API.Company.COM.", Rule{Host: "api.company.com"}},
		{"  api.company.com ", Rule{Host: "api.company.com"}},
		{"*.company.com", Rule{Host: "company.com", Wildcard: true}},
		{"*.Company.com:8443", Rule{Host: "company.com", Wildcard: true, Port: 8443}},
		{"api.company.com:443", Rule{Host: "api.company.com", Port: 443}},
		{"localhost", Rule{Host: "localhost"}},
		{"my_host.s3.amazonaws.com", Rule{Host: "my_host.s3.amazonaws.com"}},
		{"xn--bcher-kva.example", Rule{Host: "xn--bcher-kva.example"}},
		{"1.2.3.4", Rule{Prefix: pfx("1.2.3.4/32")}},
		{"1.2.3.4:5432", Rule{Prefix: pfx("1.2.3.4/32"), Port: 5432}},
		{"10.0.0.0/8", Rule{Prefix: pfx("10.0.0.0/8")}},
		{"10.0.0.0/8:443", Rule{Prefix: pfx("10.0.0.0/8"), Port: 443}},
		{"0.0.0.0/0", Rule{Prefix: pfx("0.0.0.0/0")}},
		{"2001:db8::1", Rule{Prefix: pfx("2001:db8::1/128")}},
		{"[2001:db8::1]", Rule{Prefix: pfx("2001:db8::1/128")}},
		{"[2001:db8::1]:443", Rule{Prefix: pfx("2001:db8::1/128"), Port: 443}},
		{"2001:db8::/32", Rule{Prefix: pfx("2001:db8::/32")}},
		{"[2001:db8::/32]:443", Rule{Prefix: pfx("2001:db8::/32"), Port: 443}},
		{"::ffff:1.2.3.4", Rule{Prefix: pfx("1.2.3.4/32")}},
		{"::ffff:10.0.0.0/104", Rule{Prefix: pfx("10.0.0.0/8")}},
		{"fd12:3456::/32", Rule{Prefix: pfx("fd12:3456::/32")}},
		{"api.company.com:65535", Rule{Host: "api.company.com", Port: 65535}},
	}
	for _, tc := range good {
		got, err := ParseRule(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseRule(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}

	bad := []struct{ in, why string }{
		{"", "empty"},
		{"   ", "empty"},
		{"*", "wildcard"},
		{"*.", "wildcard"},
		{"*..", "empty"},
		{"*.*.company.com", "wildcard"},
		{"a.*.company.com", "wildcard"},
		{"a*.company.com", "invalid character"},
		{"http://api.company.com", "URL"},
		{"api.company.com/path", "not a CIDR"},
		{"api..company.com", "empty label"},
		{".company.com", "empty label"},
		{"-api.company.com", "starts or ends with '-'"},
		{"api.company.com:0", "out of range"},
		{"api.company.com:65536", "out of range"},
		{"api.company.com:https", "not a number"},
		{"api.company.com:", "empty port"},
		{"api.company.com:853", "853"},
		{"1.2.3.4:853", "853"},
		{":443", "missing host"},
		{"1.2.3", "not an IP address"},
		{"1.2.3.4.5", "not an IP address"},
		{"256.1.1.1", "not an IP address"},
		{"10.0.0.1/8", "host bits"},
		{"10.0.0.0/33", "not a CIDR"},
		{"[1.2.3.4]:80", "IPv6"},
		{"[api.company.com]:80", "IPv6"},
		{"[2001:db8::1", "missing ']'"},
		{"[2001:db8::1]443", "after ']'"},
		{"fe80::1%eth0", "zone"},
		{"bücher.example", "xn--"},
		{"user@api.company.com", "not a host name"},
		{"api company.com", "not a host name"},
		{strings.Repeat("a", 64) + ".com", "longer than 63"},
		{strings.Repeat("abcdefghi.", 26) + "com", "longer than 253"},
		{"company.123", "numeric"},
		{"127.0.0.1", "loopback"},
		{"127.0.0.0/8:80", "loopback"},
		{"169.254.169.254", "link-local"},
		{"[fd00:ec2::254]:80", "metadata"},
		{"::1", "loopback"},
		{"224.0.0.1", "multicast"},
		{"0.0.0.0", "unspecified"},
	}
	for _, tc := range bad {
		r, err := ParseRule(tc.in)
		if err == nil {
			t.Errorf("ParseRule(%q) = %+v, want an error about %q", tc.in, r, tc.why)
			continue
		}
		if !strings.Contains(err.Error(), tc.why) {
			t.Errorf("ParseRule(%q) error %q does not mention %q", tc.in, err, tc.why)
		}
		if !strings.HasPrefix(err.Error(), strconv.Quote(tc.in)+": ") {
			t.Errorf("ParseRule(%q) error %q does not start with the quoted entry", tc.in, err)
		}
	}
}

func TestRuleStringRoundTrip(t *testing.T) {
	for _, in := range []string{"api.company.com", "*.company.com:443", "1.2.3.4", "1.2.3.4:5432", "10.0.0.0/8:443",
		"2001:db8::1", "[2001:db8::1]:443", "[2001:db8::/32]:443", "2001:db8::/32"} {
		r, err := ParseRule(in)
		if err != nil {
			t.Fatal(err)
		}
		if r.String() != in {
			t.Errorf("%q → %+v → %q", in, r, r.String())
		}
		if r2, err := ParseRule(r.String()); err != nil || r2 != r {
			t.Errorf("%q does not round-trip: %+v, %v", in, r2, err)
		}
	}
}

func TestParsePolicy(t *testing.T) {
	p, err := ParsePolicy(true, []string{"api.company.com", "API.company.com.", "10.0.0.0/8:443", "*.svc.company.com"})
	if err != nil {
		t.Fatal(err)
	}
	want := []Rule{{Host: "api.company.com"}, {Prefix: pfx("10.0.0.0/8"), Port: 443}, {Host: "svc.company.com", Wildcard: true}}
	if !p.BlockOutbound || !slices.Equal(p.Rules, want) {
		t.Errorf("got %+v", p)
	}
	if p, err := ParsePolicy(false, nil); err != nil || p.BlockOutbound || len(p.Rules) != 0 {
		t.Errorf("ParsePolicy(false, nil) = %+v, %v", p, err)
	}
	_, err = ParsePolicy(true, []string{"api.company.com", "bad..name", "also bad"})
	if err == nil || !strings.Contains(err.Error(), `"bad..name"`) {
		t.Errorf("error %v should name the first bad entry", err)
	}
}

func mustPolicy(t *testing.T, block bool, allow ...string) Policy {
	t.Helper()
	p, err := ParsePolicy(block, allow)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAllowsName(t *testing.T) {
	p := mustPolicy(t, true, "api.company.com", "*.svc.company.com", "db.company.com:5432", "web.company.com:80", "web.company.com:443", "10.0.0.0/8")
	cases := []struct {
		name string
		port uint16
		want bool
	}{
		{"api.company.com", 443, true},
		{"api.company.com", 0, true},
		{"API.COMPANY.COM.", 80, true},
		{"company.com", 443, false},
		{"x.api.company.com", 443, false},
		{"api.company.com.evil.example", 443, false},
		{"evilapi.company.com", 443, false},
		{"a.svc.company.com", 443, true},
		{"a.b.svc.company.com", 1, true},
		{"svc.company.com", 443, false}, // a wildcard is strict subdomains
		{"xsvc.company.com", 443, false},
		{"db.company.com", 5432, true},
		{"db.company.com", 0, true},
		{"db.company.com", 443, false},
		{"web.company.com", 80, true},
		{"web.company.com", 443, true},
		{"web.company.com", 8080, false},
		{"10.1.2.3", 443, false}, // address rules are not names
		{"", 0, false},
		{".", 0, false},
	}
	for _, tc := range cases {
		if got := p.AllowsName(tc.name, tc.port); got != tc.want {
			t.Errorf("AllowsName(%q, %d) = %v, want %v", tc.name, tc.port, got, tc.want)
		}
	}
	open := mustPolicy(t, false)
	if !open.AllowsName("anything.example", 22) {
		t.Error("block_outbound false must allow any name")
	}
	if (Policy{BlockOutbound: true}).AllowsName("api.company.com", 443) {
		t.Error("an empty allow list must allow nothing")
	}
}

func TestNamePorts(t *testing.T) {
	p := mustPolicy(t, true, "api.company.com", "db.company.com:6543", "db.company.com:5432", "db.company.com:5432",
		"*.svc.company.com:443", "x.svc.company.com:8080", "x.svc.company.com:443", "198.51.100.7:22")
	cases := []struct {
		name    string
		ports   []uint16
		anyPort bool
	}{
		{"api.company.com", nil, true},
		{"API.company.com.", nil, true},
		{"db.company.com", []uint16{5432, 6543}, false},
		{"x.svc.company.com", []uint16{443, 8080}, false},
		{"y.svc.company.com", []uint16{443}, false},
		{"evil.example", nil, false},
		{"198.51.100.7", nil, false}, // address rules are not names
	}
	for _, tc := range cases {
		ports, anyPort := p.NamePorts(tc.name)
		if !slices.Equal(ports, tc.ports) || anyPort != tc.anyPort {
			t.Errorf("NamePorts(%q) = %v, %v; want %v, %v", tc.name, ports, anyPort, tc.ports, tc.anyPort)
		}
	}
	if ports, anyPort := mustPolicy(t, false).NamePorts("anything.example"); ports != nil || !anyPort {
		t.Errorf("block_outbound false: %v, %v; want every port", ports, anyPort)
	}
}

func TestAllowsAddr(t *testing.T) {
	p := mustPolicy(t, true, "198.51.100.7", "203.0.113.0/24:443", "[2001:db8::/32]:22", "api.company.com")
	cases := []struct {
		a    string
		port uint16
		want bool
	}{
		{"198.51.100.7", 1, true},
		{"198.51.100.7", 0, true},
		{"::ffff:198.51.100.7", 80, true},
		{"198.51.100.8", 80, false},
		{"203.0.113.200", 443, true},
		{"203.0.113.200", 80, false},
		{"203.0.113.200", 0, true},
		{"2001:db8:1::5", 22, true},
		{"2001:db8:1::5", 443, false},
		{"2001:db9::5", 22, false},
	}
	for _, tc := range cases {
		if got := p.AllowsAddr(addr(tc.a), tc.port); got != tc.want {
			t.Errorf("AllowsAddr(%s, %d) = %v, want %v", tc.a, tc.port, got, tc.want)
		}
	}
	if !mustPolicy(t, false).AllowsAddr(addr("8.8.8.8"), 53) {
		t.Error("block_outbound false must allow any address")
	}
}

func TestStaticResolver(t *testing.T) {
	r := StaticResolver{"api.company.com": {addr("198.51.100.10"), addr("2001:db8::10"), addr("::ffff:198.51.100.11")}}
	ctx := context.Background()
	cases := []struct {
		network, host string
		want          []netip.Addr
	}{
		{"ip", "api.company.com", []netip.Addr{addr("198.51.100.10"), addr("2001:db8::10"), addr("198.51.100.11")}},
		{"ip", "API.company.com.", []netip.Addr{addr("198.51.100.10"), addr("2001:db8::10"), addr("198.51.100.11")}},
		{"ip4", "api.company.com", []netip.Addr{addr("198.51.100.10"), addr("198.51.100.11")}},
		{"ip6", "api.company.com", []netip.Addr{addr("2001:db8::10")}},
		{"ip", "203.0.113.1", []netip.Addr{addr("203.0.113.1")}},
	}
	for _, tc := range cases {
		got, err := r.LookupNetIP(ctx, tc.network, tc.host)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("LookupNetIP(%s, %s) = %v, %v; want %v", tc.network, tc.host, got, err, tc.want)
		}
	}
	_, err := r.LookupNetIP(ctx, "ip", "evil.example")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("unknown name: %v, want a not-found *net.DNSError", err)
	}
	only4 := StaticResolver{"v4.example": {addr("198.51.100.1")}}
	if _, err := only4.LookupNetIP(ctx, "ip6", "v4.example"); !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("no address of the family: %v, want not found", err)
	}
	var _ Resolver = StaticResolver{}
}
