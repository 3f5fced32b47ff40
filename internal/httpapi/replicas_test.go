package httpapi_test

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/httpapi"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/postgres"
	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
)

// flakyStore is a store whose database can be made unreachable: then every read of accounts and
// sandboxes fails with store.ErrUnavailable, as the postgres store's do.
type flakyStore struct {
	store.Store
	down atomic.Bool
}

func (f *flakyStore) AccountByKeyHash(ctx context.Context, h []byte) (store.Account, error) {
	if f.down.Load() {
		return store.Account{}, store.ErrUnavailable
	}
	return f.Store.AccountByKeyHash(ctx, h)
}

// replica serves a service of replica id, advertised at addr, on the database at db.
func replica(t *testing.T, db, id, addr string) (*httptest.Server, *flakyStore) {
	t.Helper()
	ctx := context.Background()
	inner, err := sqlite.Open(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inner.Close() })
	st := &flakyStore{Store: inner}
	return serveReplica(t, st, id, addr), st
}

// serveReplica serves a service of replica id, advertised at addr, on st.
func serveReplica(t *testing.T, st store.Store, id, addr string) *httptest.Server {
	t.Helper()
	ctx := context.Background()
	svc, err := sandbox.New(ctx, sandbox.Config{DataDir: t.TempDir(), Images: defaultImages, Replica: id, Address: addr},
		st, map[string]driver.Driver{"container": fakedriver.New()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(ctx) })
	srv := httptest.NewServer(httpapi.New(svc, httpapi.Options{}))
	t.Cleanup(srv.Close)
	return srv
}

// TestDatabaseUnavailable: a request the database cannot serve is 503 unavailable with
// Retry-After, not a 500.
func TestDatabaseUnavailable(t *testing.T) {
	db := filepath.Join(t.TempDir(), "db")
	srv, st := replica(t, db, "rep_a", "http://127.0.0.1:1")
	key, _, _, err := sandbox.CreateKey(context.Background(), st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	st.down.Store(true)
	code, m, hdr := call(t, "GET", srv.URL+"/api/sandbox", key, "")
	if code != http.StatusServiceUnavailable || m["error"] != "unavailable" || hdr.Get("Retry-After") == "" {
		t.Fatalf("database down: %d %v Retry-After %q, want 503 unavailable with Retry-After", code, m, hdr.Get("Retry-After"))
	}
	st.down.Store(false)
	if code, m, _ := call(t, "GET", srv.URL+"/api/sandbox", key, ""); code != 200 {
		t.Fatalf("database back: %d %v", code, m)
	}
}

// TestForwardFailures: a forward whose owner cannot be connected to is 503 "try again" (the owner
// never saw it); one whose owner took the connection and failed before answering is 502: the
// outcome is unknown (a run may have started), so the caller must not be told to retry blindly.
func TestForwardFailures(t *testing.T) {
	db := filepath.Join(t.TempDir(), "db")
	// The owner's advertised address: a listener that reads each request and hangs up.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var took atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if req, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
				took.Add(1)
				req.Body.Close()
			}
			c.Close()
		}
	}()
	a, st := replica(t, db, "rep_a", "http://"+ln.Addr().String())
	b, _ := replica(t, db, "rep_b", "http://127.0.0.1:1")
	key, _, _, err := sandbox.CreateKey(context.Background(), st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	code, m, _ := call(t, "POST", a.URL+"/api/sandbox/create", key, seedCreate)
	if code != 201 {
		t.Fatalf("create on A: %d %v", code, m)
	}
	id := m["sandbox_id"].(string)

	code, m, hdr := call(t, "POST", b.URL+"/api/sandbox/"+id+"/run", key, `{"code":"print(1)"}`)
	if code != http.StatusBadGateway || m["error"] != "owner_failed" || hdr.Get("Retry-After") != "" || took.Load() != 1 {
		t.Fatalf("owner hung up after taking the run: %d %v (Retry-After %q, requests it took %d), want 502 owner_failed",
			code, m, hdr.Get("Retry-After"), took.Load())
	}

	ln.Close() // now nothing listens there: the connection is refused
	code, m, hdr = call(t, "POST", b.URL+"/api/sandbox/"+id+"/run", key, `{"code":"print(1)"}`)
	if code != http.StatusServiceUnavailable || m["error"] != "unavailable" || hdr.Get("Retry-After") == "" {
		t.Fatalf("owner not listening: %d %v (Retry-After %q), want 503 unavailable", code, m, hdr.Get("Retry-After"))
	}
	if took.Load() != 1 {
		t.Fatalf("the owner took %d requests", took.Load())
	}
}

// TestDatabaseDown: the real thing — a PostgreSQL server that stops while the service runs makes
// its requests 503 unavailable with Retry-After (the postgres store's store.ErrUnavailable), not
// a 500.
func TestDatabaseDown(t *testing.T) {
	ctx := context.Background()
	pg := pgtest.Start(t)
	url := pg.NewDatabase(t)
	st, err := postgres.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	srv := serveReplica(t, st, "rep_a", "http://127.0.0.1:1")
	key, _, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	if code, m, _ := call(t, "GET", srv.URL+"/api/sandbox", key, ""); code != 200 {
		t.Fatalf("database up: %d %v", code, m)
	}
	pg.Stop()
	for _, path := range []string{"/api/sandbox", "/api/usage", "/api/sandbox/sbx_x"} {
		code, m, hdr := call(t, "GET", srv.URL+path, key, "")
		if code != http.StatusServiceUnavailable || m["error"] != "unavailable" || hdr.Get("Retry-After") == "" {
			t.Errorf("GET %s with the database stopped: %d %v Retry-After %q, want 503 unavailable with Retry-After", path, code, m, hdr.Get("Retry-After"))
		}
	}
}
