package main

import (
	"context"
	"net"
	"testing"

	"github.com/miekg/dns"
)

// TestUpstreamResolver: the gateway's resolver asks the --upstream server it is given (here one
// on loopback of the test's) and nothing else; a malformed --upstream is an error.
func TestUpstreamResolver(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		if q.Question[0].Qtype == dns.TypeA && q.Question[0].Name == "api.company.com." {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 10)})
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })

	r, err := upstreamResolver(pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	got, err := r.LookupNetIP(context.Background(), "ip4", "api.company.com")
	if err != nil || len(got) != 1 || got[0].String() != "192.0.2.10" {
		t.Errorf("api.company.com: %v %v, want 192.0.2.10 from the upstream", got, err)
	}
	if got, err := r.LookupNetIP(context.Background(), "ip4", "evil.example"); err == nil {
		t.Errorf("evil.example: %v, want not found", got)
	}
	for _, bad := range []string{"", "dns.example", "10.0.0.1:0", "10.0.0.1:x", "[::1]"} {
		if _, err := upstreamResolver(bad); err == nil {
			t.Errorf("--upstream %q taken", bad)
		}
	}
	if _, err := upstreamResolver("10.96.0.10"); err != nil {
		t.Errorf("--upstream 10.96.0.10: %v", err)
	}
}
