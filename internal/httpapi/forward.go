package httpapi

import (
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// ForwardedHeader marks a request one replica forwarded to another (its value: the forwarding
// replica's ID). A replica serves such a request itself and never forwards it again, so a request
// crosses at most one hop whatever the replicas believe of each other. A caller that sets it only
// keeps its request where it sent it.
const ForwardedHeader = "X-Sandboxd-Forwarded-By"

// forwardTransport carries forwarded requests: straight to the owner (never through the
// environment's HTTP proxy, which would see the callers' keys), giving up on a connection after
// 5 s (then the owner "does not answer": 503, try again); an answer may take as long as the run
// it waits for. A failure once connected is 502 "outcome unknown": the owner may have acted on it.
var forwardTransport = &http.Transport{
	Proxy:               nil,
	DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
	MaxIdleConnsPerHost: 16,
	IdleConnTimeout:     90 * time.Second,
}

// route serves the request at the replica that owns its sandbox ({id} in the path) when that is
// not this one, and reports whether it did. The request goes on as it came: the same method,
// path, query, body and key (the owner authenticates it and counts it against the key's rate
// limit again); the answer, event streams included, comes back as the owner writes it.
func (s *server) route(w http.ResponseWriter, r *http.Request, acct store.Account) (bool, error) {
	id := r.PathValue("id")
	if id == "" || r.Header.Get(ForwardedHeader) != "" {
		return false, nil
	}
	addr, err := s.svc.Owner(r.Context(), acct, id)
	if err != nil || addr == "" {
		return false, err
	}
	target, err := url.Parse(addr)
	if err != nil || target.Host == "" {
		return false, apiError(http.StatusServiceUnavailable, "unavailable",
			"the replica that runs this sandbox advertises an address that is not a URL: "+addr)
	}
	var unreachable error // the owner did not answer (nothing was written)
	// Whether a connection to the owner was made: a failure before is "try again" (the owner
	// never saw the request), one after is "outcome unknown" (it may have started a run: a retry
	// could run it twice).
	var connected atomic.Bool
	r = r.WithContext(httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) { connected.Store(true) },
	}))
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Header.Set(ForwardedHeader, s.svc.Replica())
		},
		Transport:     forwardTransport,
		FlushInterval: -1, // event streams flow as they are written
		ErrorHandler:  func(_ http.ResponseWriter, _ *http.Request, err error) { unreachable = err },
	}
	rp.ServeHTTP(w, r)
	if unreachable == nil {
		return true, nil
	}
	s.log.Warn("forward to the owner replica", "path", r.URL.Path, "to", addr, "connected", connected.Load(), "err", unreachable)
	if recordsOnly(r) { // the records answer it, as the owner would have, while its end is recorded
		return false, nil
	}
	if connected.Load() {
		return false, &httpError{status: http.StatusBadGateway, code: "owner_failed",
			msg: "the replica that runs this sandbox (" + addr + ") took the request but failed before it answered: its outcome is unknown " +
				"(a run may have started; look at the sandbox's runs before trying again)"}
	}
	return false, &httpError{status: http.StatusServiceUnavailable, code: "unavailable",
		msg:    "the replica that runs this sandbox (" + addr + ") does not answer; try again (if it is gone, its sandbox and runs are recorded ended within seconds)",
		header: map[string]string{"Retry-After": "5"}}
}

// recordsOnly reports whether a request is answered from the records alone, the same by any
// replica: the reads of a sandbox, its runs and its contexts — not a run's live event stream nor
// its files, which are on the owner's host.
func recordsOnly(r *http.Request) bool {
	return r.Method == http.MethodGet && !strings.HasSuffix(r.URL.Path, "/events") && !strings.HasSuffix(r.URL.Path, "/files")
}
