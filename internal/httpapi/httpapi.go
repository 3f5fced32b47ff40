// Package httpapi is the only package that speaks HTTP: one route table, handlers that return
// errors, one error→status table and the {error, message, code, docs} envelope. It authenticates
// callers, decodes requests strictly and hands them to the sandbox service.
package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
)

// Options configure the handler.
type Options struct {
	Version    string
	RatePerSec float64       // requests per second per account (default 100)
	RateBurst  int           // burst per account (default 200)
	Logger     *slog.Logger  // receives internal errors and (debug) requests (nil: nothing is logged)
	Metrics    http.Handler  // served at GET /metrics without a key (nil: no route)
	KeepAlive  time.Duration // interval of keep-alive comments in event streams (default 15s)
}

// Body size limits.
const (
	maxBody    = 1 << 20
	maxRunBody = 4 << 20 // code is ≤ 1 MiB, but JSON escaping can grow it
)

type server struct {
	svc  *sandbox.Service
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	limiters map[string]*rate.Limiter // by API key hash

	api        http.Handler // the whole handler New returns: what /mcp's tools call in-process
	mcpHandler http.Handler // MCP's transport, behind /mcp's authentication
}

// New returns the API's http.Handler.
func New(svc *sandbox.Service, opts Options) http.Handler {
	if opts.RatePerSec <= 0 {
		opts.RatePerSec = 100
	}
	if opts.RateBurst <= 0 {
		opts.RateBurst = 200
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.KeepAlive <= 0 {
		opts.KeepAlive = 15 * time.Second
	}
	s := &server{svc: svc, opts: opts, log: opts.Logger, limiters: map[string]*rate.Limiter{}}
	s.mcpHandler = newMCPHandler(opts.Version, opts.Logger)
	mux := http.NewServeMux()
	s.api = mux
	for _, rt := range s.routes() {
		if rt.handler != nil { // GET /metrics has none without Options.Metrics
			mux.Handle(rt.pattern, rt.handler)
		}
	}
	mux.Handle("/", s.handle(func(w http.ResponseWriter, r *http.Request, _ store.Account) error {
		return apiError(http.StatusNotFound, "not_found", fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path))
	}, false))
	return mux
}

// route is one entry of the route table: a net/http pattern ("METHOD /path") and its handler.
type route struct {
	pattern string
	handler http.Handler
}

// routes is the API's one route table: New serves it, Routes lists it, and api/openapi.json
// describes it (a test holds them together).
func (s *server) routes() []route {
	rs := []route{
		{"GET /health", s.handle(s.health, false)},
		{"GET /metrics", s.opts.Metrics},
		{MCPPath, s.handle(s.mcp, true)}, // every method: the MCP transport answers what it does not serve
	}
	for _, p := range []string{"/api", "/api/v1"} {
		rs = append(rs, []route{
			{"POST " + p + "/sandbox/create", s.handle(s.create, true)},
			{"GET " + p + "/sandbox", s.handle(s.list, true)},
			{"GET " + p + "/sandbox/{id}", s.handle(s.get, true)},
			{"DELETE " + p + "/sandbox/{id}", s.handle(s.delete, true)},
			{"POST " + p + "/sandbox/{id}/run", s.handle(s.run, true)},
			{"GET " + p + "/sandbox/{id}/runs", s.handle(s.listRuns, true)},
			{"GET " + p + "/sandbox/{id}/runs/{run_id}", s.handle(s.getRun, true)},
			{"POST " + p + "/sandbox/{id}/runs/{run_id}/cancel", s.handle(s.cancelRun, true)},
			{"GET " + p + "/sandbox/{id}/runs/{run_id}/events", s.handle(s.runEvents, true)},
			{"POST " + p + "/sandbox/{id}/contexts", s.handle(s.createContext, true)},
			{"GET " + p + "/sandbox/{id}/contexts", s.handle(s.listContexts, true)},
			{"GET " + p + "/sandbox/{id}/contexts/{context_id}", s.handle(s.getContext, true)},
			{"DELETE " + p + "/sandbox/{id}/contexts/{context_id}", s.handle(s.deleteContext, true)},
			{"PUT " + p + "/sandbox/{id}/files", s.handle(s.putFile, true)},
			{"GET " + p + "/sandbox/{id}/files", s.handle(s.getFile, true)},
			{"DELETE " + p + "/sandbox/{id}/files", s.handle(s.deleteFile, true)},
			{"GET " + p + "/usage", s.handle(s.usage, true)},
			{"GET " + p + "/audit", s.handle(s.audit, true)},
			{"GET " + p + "/images", s.handle(s.images, true)},
			{"GET " + p + "/openapi.json", s.handle(s.openAPI, false)},
		}...)
	}
	return rs
}

// Routes lists the pattern ("METHOD /path", as net/http writes it) of every route New serves,
// GET /metrics included (New serves it when Options.Metrics is set), and MCPPath (no method: the
// MCP transport takes them all); the catch-all that answers 404 not_found is not a route.
func Routes() []string {
	var out []string
	for _, rt := range (&server{}).routes() {
		out = append(out, rt.pattern)
	}
	return out
}

// httpError is an error httpapi itself classifies.
type httpError struct {
	status int
	code   string
	msg    string
	header map[string]string
}

func (e *httpError) Error() string { return e.msg }

func apiError(status int, code, msg string) error {
	return &httpError{status: status, code: code, msg: msg}
}

// statusOf maps the service's error kinds to HTTP statuses.
var statusOf = map[sandbox.Kind]int{
	sandbox.KindInvalid:             http.StatusBadRequest,
	sandbox.KindUnsupported:         http.StatusBadRequest,
	sandbox.KindUnsupportedInMode:   http.StatusBadRequest,
	sandbox.KindImageNotApproved:    http.StatusForbidden,
	sandbox.KindNotFound:            http.StatusNotFound,
	sandbox.KindConcurrencyLimit:    http.StatusTooManyRequests,
	sandbox.KindRunQueueFull:        http.StatusTooManyRequests,
	sandbox.KindSandboxDestroyed:    http.StatusConflict,
	sandbox.KindSandboxNotReady:     http.StatusConflict,
	sandbox.KindContextLimit:        http.StatusConflict,
	sandbox.KindCapacityExhausted:   http.StatusServiceUnavailable,
	sandbox.KindInsufficientStorage: http.StatusInsufficientStorage,
	sandbox.KindProvisioningFailed:  http.StatusInternalServerError,
	sandbox.KindPathNotAllowed:      http.StatusForbidden,
	sandbox.KindPayloadTooLarge:     http.StatusRequestEntityTooLarge,
	sandbox.KindConflict:            http.StatusConflict,
	sandbox.KindUnavailable:         http.StatusServiceUnavailable,
	sandbox.KindImageNotReady:       http.StatusServiceUnavailable,
	sandbox.KindInternal:            http.StatusInternalServerError,
}

type handlerFunc func(w http.ResponseWriter, r *http.Request, acct store.Account) error

// handle wraps a handler with authentication, rate limiting, error rendering and logging.
func (s *server) handle(h handlerFunc, auth bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		var acct store.Account
		err := func() error {
			if !auth {
				return nil
			}
			var err error
			var key string
			if acct, key, err = s.authenticate(r); err != nil {
				return err
			}
			if !s.limiter(string(sandbox.HashKey(key))).Allow() {
				return &httpError{status: http.StatusTooManyRequests, code: "rate_limited",
					msg: "too many requests for this API key: slow down", header: map[string]string{"Retry-After": "1"}}
			}
			return nil
		}()
		routed := false // served by the replica that owns the sandbox (forward.go)
		if err == nil && auth {
			routed, err = s.route(sw, r, acct)
		}
		if err == nil && !routed {
			err = h(sw, r, acct)
		}
		if err != nil {
			s.writeError(sw, r, err)
		}
		s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", sw.status, "ms", time.Since(start).Milliseconds())
	})
}

// authenticate returns the caller's account and API key.
func (s *server) authenticate(r *http.Request) (store.Account, string, error) {
	key := keyOf(r)
	unauthorized := apiError(http.StatusUnauthorized, "unauthorized", "missing or unknown API key: send it as X-AgentCop-Key: <key> or Authorization: Bearer <key>")
	if key == "" {
		return store.Account{}, "", unauthorized
	}
	acct, err := s.svc.Authenticate(r.Context(), key)
	if sandbox.KindOf(err) == sandbox.KindNotFound {
		s.svc.AuthFailed(r.Context(), "unknown key", r.RemoteAddr)
		return store.Account{}, "", unauthorized
	}
	return acct, key, err
}

// keyOf returns the API key a request carries: X-AgentCop-Key, else Authorization: Bearer.
func keyOf(r *http.Request) string {
	key := r.Header.Get("X-AgentCop-Key")
	if key == "" {
		if a := r.Header.Get("Authorization"); len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
			key = strings.TrimSpace(a[7:])
		}
	}
	return key
}

// limiter returns the rate limiter of an API key, by its hash (only valid keys get one).
func (s *server) limiter(keyHash string) *rate.Limiter {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.limiters[keyHash]
	if !ok {
		l = rate.NewLimiter(rate.Limit(s.opts.RatePerSec), s.opts.RateBurst)
		s.limiters[keyHash] = l
	}
	return l
}

func (s *server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var he *httpError
	var mbe *http.MaxBytesError
	var se *sandbox.Error
	env := api.Error{}
	switch {
	case errors.As(err, &he):
		env.Code, env.Error, env.Message = he.status, he.code, he.msg
		for k, v := range he.header {
			w.Header().Set(k, v)
		}
	case errors.As(err, &mbe):
		env.Code, env.Error, env.Message = http.StatusRequestEntityTooLarge, "payload_too_large",
			fmt.Sprintf("request body is over the limit of %d bytes", mbe.Limit)
	case r.Context().Err() != nil: // the client went away: whatever failed failed because of it
		env.Code, env.Error, env.Message = 499, "client_closed_request", "the request ended before the answer was ready"
	case errors.Is(err, store.ErrUnavailable): // the database is down (or out of reach): not a bug of the service
		s.log.Warn("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		env.Code, env.Error, env.Message = http.StatusServiceUnavailable, string(sandbox.KindUnavailable),
			"the service's database is out of reach; try again"
		w.Header().Set("Retry-After", "5")
	case errors.As(err, &se):
		env.Code, env.Error, env.Message = statusOf[se.Kind], string(se.Kind), se.Message
		if env.Code == 0 {
			env.Code = http.StatusInternalServerError
		}
		if se.Kind == sandbox.KindConcurrencyLimit || se.Kind == sandbox.KindRunQueueFull {
			w.Header().Set("Retry-After", "5")
		}
		if se.RetryAfter > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(se.RetryAfter.Seconds()))))
		}
		if se.Kind == sandbox.KindInternal {
			s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
			env.Message = "internal error: the service failed; it has been logged"
		}
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		env.Code, env.Error, env.Message = 499, "client_closed_request", "the request ended before the answer was ready"
	default:
		s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		env.Code, env.Error, env.Message = http.StatusInternalServerError, string(sandbox.KindInternal), "internal error: the service failed; it has been logged"
	}
	env.Docs = "/docs/errors#" + env.Error
	writeJSON(w, env.Code, env)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// decode reads a JSON body strictly: unknown fields, wrong types and trailing data are errors.
func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		return err
	}
	if err := decodeJSON(raw, v); err != nil {
		return err
	}
	// encoding/json matches names case-insensitively, keeps the last of duplicate keys and takes
	// null for anything: the contract is stricter.
	if err := exactKeys(json.NewDecoder(bytes.NewReader(raw)), reflect.TypeOf(v).Elem(), ""); err != nil {
		return apiError(http.StatusBadRequest, "invalid_request", err.Error())
	}
	return nil
}

func decodeJSON(raw []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &mbe):
			return err
		case errors.Is(err, io.EOF):
			return apiError(http.StatusBadRequest, "invalid_request", "request body is empty: a JSON object is required")
		case errors.As(err, &te):
			return apiError(http.StatusBadRequest, "invalid_request", fmt.Sprintf("field %q must be of JSON type %s, not %s", te.Field, jsonType(te.Type.Kind().String()), te.Value))
		case errors.As(err, &se):
			return apiError(http.StatusBadRequest, "invalid_request", fmt.Sprintf("request body is not valid JSON (at byte %d): %v", se.Offset, se))
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return apiError(http.StatusBadRequest, "invalid_request", "unknown field "+strings.TrimPrefix(err.Error(), "json: unknown field "))
		default:
			return apiError(http.StatusBadRequest, "invalid_request", "request body is not valid JSON: "+strings.TrimPrefix(err.Error(), "json: "))
		}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return apiError(http.StatusBadRequest, "invalid_request", "request body has data after the JSON object")
	}
	return nil
}

func jsonType(goKind string) string {
	switch goKind {
	case "string":
		return "string"
	case "bool":
		return "boolean"
	case "int", "int64", "float64":
		return "number"
	case "slice":
		return "array"
	case "map", "struct", "ptr":
		return "object"
	}
	return goKind
}

// page reads ?page= and ?limit=.
func page(r *http.Request) (page, limit int, err error) {
	page, limit = 1, 50
	if v := r.URL.Query().Get("page"); v != "" {
		if page, err = strconv.Atoi(v); err != nil || page < 1 {
			return 0, 0, apiError(http.StatusBadRequest, "invalid_request", "page must be a whole number from 1")
		}
	}
	if v := r.URL.Query().Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 500 {
			return 0, 0, apiError(http.StatusBadRequest, "invalid_request", "limit must be a whole number from 1 to 500")
		}
	}
	return page, limit, nil
}

// timeParam reads an RFC 3339 time or a YYYY-MM-DD day (UTC midnight).
func timeParam(r *http.Request, name string, def time.Time) (time.Time, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t.UTC(), nil
	}
	if t, err := time.Parse(time.DateOnly, v); err == nil {
		return t, nil
	}
	return time.Time{}, apiError(http.StatusBadRequest, "invalid_request", fmt.Sprintf("%s must be an RFC 3339 time or a YYYY-MM-DD day, not %q", name, v))
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// exactKeys walks the JSON value at dec's position against Go type t: object keys must be a
// struct's json names exactly (case included), no key may repeat, and null only goes where the Go
// type can hold it (pointer, slice, map, interface, json.RawMessage). path names the value in
// errors ("config.resources.cpu").
func exactKeys(dec *json.Decoder, t reflect.Type, path string) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil {
		switch t.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Map, reflect.Interface:
			return nil
		}
		name := path
		if name == "" {
			name = "the body"
		}
		return fmt.Errorf("field %q must not be null", name)
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	delim, ok := tok.(json.Delim)
	if !ok {
		return nil // a scalar: its type was checked by the decoder
	}
	switch delim {
	case '[':
		for dec.More() {
			if err := exactKeys(dec, elemOf(t), path+"[]"); err != nil {
				return err
			}
		}
	case '{':
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return err
			}
			key := kt.(string)
			full := key
			if path != "" {
				full = path + "." + key
			}
			if seen[key] {
				return fmt.Errorf("field %q appears twice", full)
			}
			seen[key] = true
			var ft reflect.Type = anyType
			switch t.Kind() {
			case reflect.Struct:
				f, ok := fieldByJSONName(t, key)
				if !ok {
					return fmt.Errorf("unknown field %q (names are case-sensitive)", full)
				}
				ft = f
			case reflect.Map:
				ft = t.Elem()
			}
			if err := exactKeys(dec, ft, full); err != nil {
				return err
			}
		}
	}
	_, err = dec.Token() // the closing delimiter
	return err
}

var anyType = reflect.TypeOf((*any)(nil)).Elem()

func elemOf(t reflect.Type) reflect.Type {
	if t.Kind() == reflect.Slice || t.Kind() == reflect.Array {
		return t.Elem()
	}
	return anyType
}

// fieldByJSONName finds the field of struct t whose json name is exactly name. A json.RawMessage
// field, or one of interface type, takes anything (returned as any).
func fieldByJSONName(t reflect.Type, name string) (reflect.Type, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if tag == "-" || !f.IsExported() {
			continue
		}
		if tag == "" {
			tag = f.Name
		}
		if tag != name {
			continue
		}
		if f.Type == reflect.TypeOf(json.RawMessage(nil)) {
			return anyType, true
		}
		return f.Type, true
	}
	return nil, false
}
