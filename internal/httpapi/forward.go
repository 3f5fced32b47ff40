package httpapi

import (
	"net/http"
	"net/http/httputil"
	"net/url"

	"github.com/sandboxd/sandboxd/internal/store"
)

// ForwardedHeader marks a request one replica forwarded to another (its value: the forwarding
// replica's ID). A replica serves such a request itself and never forwards it again, so a request
// crosses at most one hop whatever the replicas believe of each other. A caller that sets it only
// keeps its request where it sent it.
const ForwardedHeader = "X-Sandboxd-Forwarded-By"

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
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Header.Set(ForwardedHeader, s.svc.Replica())
		},
		FlushInterval: -1, // event streams flow as they are written
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.log.Warn("forward to owner replica", "path", r.URL.Path, "to", addr, "err", err)
			he := &httpError{status: http.StatusServiceUnavailable, code: "unavailable",
				msg:    "the replica that runs this sandbox (" + addr + ") does not answer; try again (if it is gone, its sandbox is recorded ended within seconds)",
				header: map[string]string{"Retry-After": "5"}}
			s.writeError(w, r, he)
		},
	}
	rp.ServeHTTP(w, r)
	return true, nil
}
