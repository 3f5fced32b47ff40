package egress

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// headReader reads HTTP request heads from a client connection: bounded in size (maxHeadBytes)
// and time (the gateway's head timeout; idleTimeout between requests). It can record the raw bytes read, so that
// a connection that turns out not to speak HTTP can be forwarded as it came.
type headReader struct {
	c       net.Conn
	timeout time.Duration
	lim     limitReader
	br      *bufio.Reader
}

type limitReader struct {
	r      io.Reader
	n      int64 // bytes left; < 0: unlimited
	hit    bool
	record bool
	rec    []byte
}

var errHeadTooLarge = errors.New("request head too large")

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n == 0 {
		l.hit = true
		return 0, errHeadTooLarge
	}
	if l.n > 0 && int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	if l.n > 0 {
		l.n -= int64(n)
	}
	if l.record {
		l.rec = append(l.rec, p[:n]...)
	}
	return n, err
}

func newHeadReader(c net.Conn, timeout time.Duration) *headReader {
	h := &headReader{c: c, timeout: timeout, lim: limitReader{r: c, n: -1}}
	h.br = bufio.NewReaderSize(&h.lim, 4096)
	return h
}

// next reads the next request head. Not the first: it first waits up to idleTimeout for a byte.
func (h *headReader) next(first bool) (*http.Request, error) {
	if !first {
		h.c.SetReadDeadline(time.Now().Add(idleTimeout))
		if _, err := h.br.Peek(1); err != nil {
			return nil, err
		}
	}
	h.c.SetReadDeadline(time.Now().Add(h.timeout))
	h.lim.n, h.lim.hit = maxHeadBytes, false
	req, err := http.ReadRequest(h.br)
	h.lim.n = -1
	h.c.SetReadDeadline(time.Time{})
	if err != nil && h.lim.hit {
		return nil, errHeadTooLarge
	}
	return req, err
}

// serveProxy serves a connection to the HTTP proxy port: CONNECT and absolute-URI requests.
func (s *sandbox) serveProxy(c *net.TCPConn) {
	h := newHeadReader(c, s.g.headTimeout)
	for first := true; ; first = false {
		req, err := h.next(first)
		if err != nil {
			switch {
			case errors.Is(err, errHeadTooLarge):
				writeStatus(c, http.StatusRequestHeaderFieldsTooLarge, "request head too large")
			case first && !errors.Is(err, io.EOF) && !isTimeout(err):
				writeStatus(c, http.StatusBadRequest, "malformed request")
			}
			return
		}
		if req.Method == http.MethodConnect {
			s.proxyConnect(c, h, req)
			return
		}
		if req.URL.Scheme != "http" || req.URL.Host == "" {
			writeStatus(c, http.StatusBadRequest, "this is an egress proxy: send CONNECT host:port, or an absolute http:// URL")
			return
		}
		host, port, err := splitHostPortDefault(req.URL.Host, 80)
		if err != nil {
			writeStatus(c, http.StatusBadRequest, err.Error())
			return
		}
		if !s.forwardHTTP(c, h.br, req, host, port, netip.AddrPort{}) {
			return
		}
	}
}

// proxyConnect serves CONNECT host:port: a 403 before any tunnel when denied, else a tunnel to
// an address the gateway resolved and checked.
func (s *sandbox) proxyConnect(c *net.TCPConn, h *headReader, req *http.Request) {
	host, port, err := splitHostPortDefault(req.Host, 443)
	if err != nil {
		writeStatus(c, http.StatusBadRequest, err.Error())
		return
	}
	proto := "tcp"
	if port == 443 {
		proto = "https"
	}
	up, denied, err := s.open(host, port, proto, netip.AddrPort{})
	if denied != "" {
		writeStatus(c, http.StatusForbidden, "denied: "+denied)
		return
	}
	if err != nil {
		writeStatus(c, http.StatusBadGateway, fmt.Sprintf("cannot reach %s: %v", net.JoinHostPort(host, strconv.Itoa(int(port))), err))
		return
	}
	defer s.untrackClose(up)
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	buf, _ := h.br.Peek(h.br.Buffered())
	s.splice(c, buf, up, nil)
}

// forwardHTTP forwards one plain-HTTP request to host:port (checked, resolved and dialled by the
// gateway; orig as in open) and its response back. It reports whether the client connection
// may carry another request.
func (s *sandbox) forwardHTTP(c *net.TCPConn, br *bufio.Reader, req *http.Request, host string, port uint16, orig netip.AddrPort) bool {
	up, denied, err := s.open(host, port, "http", orig)
	if denied != "" {
		writeStatus(c, http.StatusForbidden, "denied: "+denied)
		return false
	}
	if err != nil {
		writeStatus(c, http.StatusBadGateway, fmt.Sprintf("cannot reach %s: %v", net.JoinHostPort(host, strconv.Itoa(int(port))), err))
		return false
	}
	defer s.untrackClose(up)

	upgrade := req.Header.Get("Upgrade") // kept only for a connection upgrade (websockets)
	if !headerHasToken(req.Header, "Connection", "upgrade") {
		upgrade = ""
	}
	removeHopHeaders(req.Header)
	if upgrade != "" {
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", upgrade)
	}
	if _, ok := req.Header["User-Agent"]; !ok {
		req.Header["User-Agent"] = []string{""} // Request.Write would add Go's
	}
	if strings.EqualFold(req.Header.Get("Expect"), "100-continue") {
		req.Header.Del("Expect")
		if _, err := io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			return false
		}
	}
	clientClose := req.Close
	req.Close = upgrade == "" // one request per upstream connection
	req.RequestURI = ""
	if err := req.Write(up); err != nil {
		writeStatus(c, http.StatusBadGateway, "sending the request upstream failed: "+err.Error())
		return false
	}
	ubr := bufio.NewReader(up)
	var resp *http.Response
	for {
		if resp, err = http.ReadResponse(ubr, req); err != nil {
			writeStatus(c, http.StatusBadGateway, "reading the upstream response failed: "+err.Error())
			return false
		}
		// Interim responses (100 Continue, 103 Early Hints) are dropped: the client got its own
		// 100 Continue above, and hints are optional.
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		resp.Body.Close()
	}
	defer resp.Body.Close()

	if resp.StatusCode == http.StatusSwitchingProtocols && upgrade != "" {
		resp.Header.Del("Keep-Alive")
		if err := resp.Write(c); err != nil {
			return false
		}
		cbuf, _ := br.Peek(br.Buffered())
		ubuf, _ := ubr.Peek(ubr.Buffered())
		s.splice(c, cbuf, up, ubuf)
		return false
	}
	removeHopHeaders(resp.Header)
	keep := !clientClose
	chunked := len(resp.TransferEncoding) > 0 && resp.TransferEncoding[0] == "chunked"
	if !req.ProtoAtLeast(1, 1) {
		resp.TransferEncoding, chunked, keep = nil, false, false
	}
	if resp.ContentLength < 0 && !chunked && bodyAllowed(req.Method, resp.StatusCode) {
		keep = false // the body ends when the connection does
	}
	resp.Close = !keep
	if err := resp.Write(c); err != nil {
		return false
	}
	return keep
}

func bodyAllowed(method string, status int) bool {
	return method != http.MethodHead && status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}

// hopHeaders are removed when forwarding, in both directions, with those Connection names and
// every Proxy-* header.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				h.Del(f)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
	for k := range h {
		if strings.HasPrefix(k, "Proxy-") {
			delete(h, k)
		}
	}
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h[http.CanonicalHeaderKey(key)] {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), token) {
				return true
			}
		}
	}
	return false
}

// splitHostPortDefault splits "host:port", "host", "[v6]:port" or "[v6]".
func splitHostPortDefault(hp string, def uint16) (string, uint16, error) {
	if hp == "" {
		return "", 0, errors.New("missing host")
	}
	host, portStr, err := net.SplitHostPort(hp)
	if err != nil {
		// No port: a bare name, IPv4, or bracketed IPv6.
		if strings.HasPrefix(hp, "[") && strings.HasSuffix(hp, "]") {
			return hp[1 : len(hp)-1], def, nil
		}
		if strings.Contains(hp, ":") {
			return "", 0, fmt.Errorf("bad host %q", truncate(hp, 64))
		}
		return hp, def, nil
	}
	if host == "" {
		return "", 0, errors.New("missing host")
	}
	port, err := parsePort(portStr)
	if err != nil {
		return "", 0, err
	}
	return host, port, nil
}

// writeStatus answers with a plain-text one-line reason and ends the connection: it half-closes
// it and discards what the client still sends for a moment, so that the client reads the answer
// rather than a reset. The caller closes the connection.
func writeStatus(c net.Conn, code int, reason string) {
	reason = strings.NewReplacer("\r", " ", "\n", " ").Replace(reason)
	body := "sandboxd egress: " + reason + "\n"
	c.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
		code, http.StatusText(code), len(body), body); err != nil {
		return
	}
	lingerClose(c)
}

// lingerClose half-closes c and discards up to 64 KiB of input for up to half a second.
func lingerClose(c net.Conn) {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
