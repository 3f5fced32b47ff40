package egress

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h).
const ip6tSoOriginalDst = 80

// TLS alert descriptions the transparent proxy answers with.
const (
	alertHandshakeFailure = 40
	alertUnrecognizedName = 112
)

// serveTransparent serves a connection the host's nftables redirected to the transparent port:
// port 80 by its Host header, port 443 by its TLS SNI, both dialled at the addresses the gateway
// resolves for the name; anything else (and 80/443 without a name) by the address rules and the
// addresses pinned by the sandbox's DNS answers.
func (s *sandbox) serveTransparent(c *net.TCPConn) {
	orig, err := s.g.origDst(c)
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil || !orig.IsValid() || orig.Addr().Unmap() == local.Addr().Unmap() {
		d := Decision{Proto: "tcp", Reason: "connection to the transparent port that was not redirected (no original destination)"}
		if orig.IsValid() {
			d.Addr, d.Port = orig.Addr(), orig.Port()
		}
		s.report(d)
		reset(c)
		return
	}
	orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
	if r := s.g.denyReason(orig.Addr(), orig.Port(), s.policy()); r != "" {
		s.refuseReserved(c, orig, r)
		return
	}
	switch orig.Port() {
	case 80:
		s.transparentHTTP(c, orig)
	case 443:
		s.transparentTLS(c, orig)
	default:
		rst := func(string) { reset(c) }
		s.transparentAddr(c, orig, nil, "tcp", rst, func(error) { reset(c) })
	}
}

// reservedHeadTimeout is how long a connection to an address that is always denied may take to
// show its HTTP request or TLS ClientHello (to be refused with a readable reason) before it is reset.
const reservedHeadTimeout = 300 * time.Millisecond

// refuseReserved refuses a connection to an address no name or rule can open (the host, other
// sandboxes, loopback, metadata, unlisted private ranges), whatever Host or SNI it names: HTTP
// with a 403 and the reason, TLS with an alert, anything else — and a client waiting for the
// server to speak first — with a reset, all within reservedHeadTimeout.
func (s *sandbox) refuseReserved(c *net.TCPConn, orig netip.AddrPort, reason string) {
	d := Decision{Addr: orig.Addr(), Port: orig.Port(), Proto: "tcp", Reason: reason}
	defer func() { s.report(d) }()
	switch orig.Port() {
	case 80:
		if req, err := newHeadReader(c, reservedHeadTimeout).next(true); err == nil {
			d.Proto, d.Host = "http", hostOnly(req.Host)
			writeStatus(c, http.StatusForbidden, "denied: "+reason)
			return
		}
	case 443:
		c.SetReadDeadline(time.Now().Add(reservedHeadTimeout))
		sni, _, isTLS, _ := peekClientHello(c)
		if isTLS {
			d.Proto, d.Host = "https", sni
			sendAlert(c, alertHandshakeFailure)
			return
		}
	}
	reset(c)
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// transparentAddr forwards a connection to its original destination if the address rules or
// the sandbox's pinned names allow it; buf is what was already read from the client.
func (s *sandbox) transparentAddr(c *net.TCPConn, orig netip.AddrPort, buf []byte, proto string, deny func(reason string), fail func(error)) {
	up, denied, err := s.open(orig.Addr().String(), orig.Port(), proto, netip.AddrPort{})
	if denied != "" {
		deny(denied)
		return
	}
	if err != nil {
		fail(err)
		return
	}
	defer s.untrackClose(up)
	s.splice(c, buf, up, nil)
}

func (s *sandbox) transparentTLS(c *net.TCPConn, orig netip.AddrPort) {
	c.SetReadDeadline(time.Now().Add(s.g.headTimeout))
	sni, raw, isTLS, err := peekClientHello(c)
	c.SetReadDeadline(time.Time{})
	if len(raw) == 0 && !isTimeout(err) {
		return // closed without sending anything
	}
	if sni == "" { // not TLS, no SNI, or nothing sent in time: the address rules decide
		proto, deny := "https", func(string) { sendAlert(c, alertHandshakeFailure) }
		if !isTLS {
			proto, deny = "tcp", func(string) { reset(c) }
		}
		s.transparentAddr(c, orig, raw, proto, deny, func(error) { deny("") })
		return
	}
	up, denied, err := s.open(sni, orig.Port(), "https", orig)
	if denied != "" {
		sendAlert(c, alertUnrecognizedName)
		return
	}
	if err != nil {
		sendAlert(c, alertHandshakeFailure)
		return
	}
	defer s.untrackClose(up)
	s.splice(c, raw, up, nil)
}

func (s *sandbox) transparentHTTP(c *net.TCPConn, orig netip.AddrPort) {
	h := newHeadReader(c, s.g.headTimeout)
	h.lim.record = true
	req, err := h.next(true)
	raw := h.lim.rec
	h.lim.record, h.lim.rec = false, nil
	switch {
	case errors.Is(err, errHeadTooLarge):
		s.report(Decision{Addr: orig.Addr(), Port: orig.Port(), Proto: "http", Reason: "request head too large"})
		writeStatus(c, http.StatusRequestHeaderFieldsTooLarge, "request head too large")
		return
	case err != nil && len(raw) == 0 && !isTimeout(err):
		return // closed without sending anything
	case err != nil: // not HTTP, or nothing sent in time: the address rules decide, the bytes go on as they came
		s.transparentAddr(c, orig, raw, "tcp", func(string) { reset(c) }, func(error) { reset(c) })
		return
	case req.Host == "": // HTTP/1.0 without Host
		deny := func(reason string) { writeStatus(c, http.StatusForbidden, "denied: "+reason) }
		fail := func(err error) { writeStatus(c, http.StatusBadGateway, "cannot reach "+orig.String()+": "+err.Error()) }
		s.transparentAddr(c, orig, raw, "http", deny, fail)
		return
	}
	for {
		host, _, err := splitHostPortDefault(req.Host, orig.Port())
		if err != nil {
			writeStatus(c, http.StatusBadRequest, err.Error())
			return
		}
		if !s.forwardHTTP(c, h.br, req, host, orig.Port(), orig) {
			return
		}
		if req, err = h.next(false); err != nil {
			if errors.Is(err, errHeadTooLarge) {
				writeStatus(c, http.StatusRequestHeaderFieldsTooLarge, "request head too large")
			}
			return
		}
		if req.Host == "" {
			writeStatus(c, http.StatusBadRequest, "missing Host header")
			return
		}
	}
}

// originalDst reads the destination a connection had before the host's DNAT.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	v4 := false
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok && la.IP.To4() != nil {
		v4 = true
	}
	var ap netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		if v4 {
			// struct sockaddr_in fits in the 16-byte start of an ipv6_mreq.
			m, err := unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
			if err != nil {
				serr = err
				return
			}
			b := m.Multiaddr
			ap = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4]))
			return
		}
		// struct sockaddr_in6 fits in the start of an ip6_mtuinfo.
		info, err := unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, ip6tSoOriginalDst)
		if err != nil {
			serr = err
			return
		}
		var p [2]byte
		binary.NativeEndian.PutUint16(p[:], info.Addr.Port)
		ap = netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), binary.BigEndian.Uint16(p[:]))
	})
	if err == nil {
		err = serr
	}
	return ap, err
}

// peekClientHello reads a TLS ClientHello from c (the caller sets the deadline) without
// answering it, and returns its SNI, every byte read (to be forwarded as it came: possibly more
// than the ClientHello) and whether it was a ClientHello at all; err is why not. It reads at most
// maxHeadBytes.
func peekClientHello(c net.Conn) (sni string, raw []byte, isTLS bool, err error) {
	rc := &recordConn{Conn: c}
	cfg := &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		sni, isTLS = h.ServerName, true
		return nil, errPeeked
	}}
	err = tls.Server(rc, cfg).Handshake()
	if isTLS {
		err = nil
	}
	return sni, rc.buf, isTLS, err
}

var errPeeked = errors.New("peeked")

// recordConn keeps what is read, discards what is written (crypto/tls's alert after errPeeked).
type recordConn struct {
	net.Conn
	buf []byte
}

func (r *recordConn) Read(p []byte) (int, error) {
	room := maxHeadBytes - len(r.buf)
	if room <= 0 {
		return 0, errHeadTooLarge
	}
	if len(p) > room {
		p = p[:room]
	}
	n, err := r.Conn.Read(p)
	r.buf = append(r.buf, p[:n]...)
	return n, err
}

func (r *recordConn) Write(p []byte) (int, error) { return len(p), nil }
func (r *recordConn) Close() error                { return nil }

// sendAlert answers a ClientHello with a fatal TLS alert and ends the connection.
func sendAlert(c net.Conn, desc byte) {
	c.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := c.Write([]byte{21, 3, 3, 0, 2, 2, desc}); err != nil { // alert record, TLS 1.2, fatal
		return
	}
	lingerClose(c)
}
