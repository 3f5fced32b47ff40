package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// ServeDNS answers a sandbox's DNS query (dns.Handler). Names the policy allows get their A and
// AAAA records, resolved by the gateway (CNAME chains followed server-side), without
// always-denied addresses, with a short TTL; the addresses answered are pinned to the name for
// the sandbox. Other query types for allowed names get an empty answer. Names the policy does not
// allow, and names that resolve only to always-denied addresses, get NXDOMAIN. Config.OnAnswer
// sees an answer before it leaves.
func (s *sandbox) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	m.Authoritative = false
	defer func() { s.writeDNS(w, r, m) }()

	if r.Opcode != dns.OpcodeQuery {
		m.Rcode = dns.RcodeNotImplemented
		return
	}
	if len(r.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return
	}
	select {
	case s.dnsSem <- struct{}{}:
		defer func() { <-s.dnsSem }()
	default:
		m.Rcode = dns.RcodeServerFailure // too many queries in flight: the client retries
		return
	}
	q := r.Question[0]
	name := normalizeName(q.Name)
	if q.Qclass != dns.ClassINET {
		m.Rcode = dns.RcodeRefused
		return
	}
	if err := checkName(name); err != nil {
		m.Rcode = dns.RcodeNameError
		s.dnsDenied(name, fmt.Sprintf("invalid host name: %v", err))
		return
	}
	pol := s.policy() // one policy for the whole answer
	if !pol.AllowsName(name, 0) {
		m.Rcode = dns.RcodeNameError
		s.dnsDenied(name, fmt.Sprintf("%s is not on the allow list", name))
		return
	}
	if q.Qtype != dns.TypeA && q.Qtype != dns.TypeAAAA {
		s.dnsAllowed(name) // NOERROR, no records
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, lookupTimeout)
	defer cancel()
	all, err := s.lookup(ctx, name)
	if err != nil {
		var de *net.DNSError
		if errors.As(err, &de) && de.IsNotFound {
			m.Rcode = dns.RcodeNameError
		} else {
			m.Rcode = dns.RcodeServerFailure
		}
		return
	}
	var ok []netip.Addr
	var why string
	for _, a := range all {
		if r := s.g.denyReason(a, 0, pol); r != "" {
			if why == "" {
				why = r
			}
			continue
		}
		ok = append(ok, a)
	}
	if len(ok) == 0 {
		m.Rcode = dns.RcodeNameError
		if why != "" {
			s.dnsDenied(name, fmt.Sprintf("%s resolves only to always-denied addresses (%s)", name, why))
		}
		return
	}
	if f := s.g.cfg.OnAnswer; f != nil {
		ports, anyPort := pol.NamePorts(name)
		if err := f(s.id, Answer{Name: name, Addrs: ok, Ports: ports, AnyPort: anyPort, TTL: s.g.pinTTL}); err != nil {
			m.Rcode = dns.RcodeServerFailure
			s.dnsDenied(name, fmt.Sprintf("the answer could not be pinned for connections by address: %v", err))
			return
		}
	}
	s.pin(name, ok)
	s.dnsAllowed(name)
	hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET, Ttl: dnsTTL}
	for _, a := range ok {
		switch {
		case q.Qtype == dns.TypeA && a.Is4():
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IP(a.AsSlice())})
		case q.Qtype == dns.TypeAAAA && a.Is6():
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: net.IP(a.AsSlice())})
		}
	}
}

func (s *sandbox) writeDNS(w dns.ResponseWriter, r, m *dns.Msg) {
	size := dns.MinMsgSize
	if opt := r.IsEdns0(); opt != nil {
		size = max(min(int(opt.UDPSize()), 1232), dns.MinMsgSize)
		m.SetEdns0(uint16(size), false)
	}
	if _, tcp := w.LocalAddr().(*net.TCPAddr); tcp {
		size = dns.MaxMsgSize
	}
	m.Truncate(size)
	w.WriteMsg(m)
}

// isReverse: reverse lookups (PTR under .arpa) are not egress attempts and are not reported.
// The root (resolver priming) is not reported either.
func isReverse(name string) bool {
	return name == "" || name == "arpa" || strings.HasSuffix(name, ".arpa")
}

// dnsAllowed reports an allowed name the first time the sandbox asks for it.
func (s *sandbox) dnsAllowed(name string) {
	if isReverse(name) {
		return
	}
	s.mu.Lock()
	_, seen := s.dnsAllowedNames[name]
	if !seen {
		if len(s.dnsAllowedNames) >= maxNames {
			clear(s.dnsAllowedNames)
		}
		s.dnsAllowedNames[name] = struct{}{}
	}
	s.mu.Unlock()
	if !seen {
		s.report(Decision{Allowed: true, Host: name, Port: DNSPort, Proto: "dns"})
	}
}

// dnsDenied reports a denied name, once per dnsDenyRepeat (resolvers retry, and ask for A and
// AAAA together).
func (s *sandbox) dnsDenied(name, reason string) {
	if isReverse(name) {
		return
	}
	now := time.Now()
	s.mu.Lock()
	last, seen := s.dnsDeniedNames[name]
	recent := seen && now.Sub(last) < dnsDenyRepeat
	if !recent {
		if len(s.dnsDeniedNames) >= maxNames {
			for n, t := range s.dnsDeniedNames {
				if now.Sub(t) >= dnsDenyRepeat {
					delete(s.dnsDeniedNames, n)
				}
			}
			if len(s.dnsDeniedNames) >= maxNames {
				clear(s.dnsDeniedNames)
			}
		}
		s.dnsDeniedNames[name] = now
	}
	s.mu.Unlock()
	if !recent {
		s.report(Decision{Host: truncate(name, 253), Port: DNSPort, Proto: "dns", Reason: reason})
	}
}
