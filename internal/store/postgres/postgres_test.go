package postgres

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/migrate"
	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/store/storetest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var ctx = context.Background()

func open(t *testing.T, url string) *DB {
	t.Helper()
	d, err := Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestConformance(t *testing.T) {
	srv := pgtest.Shared(t)
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, srv.NewDatabase(t)) })
}

// TestShared: two Store values on one database, as two replicas open it.
func TestShared(t *testing.T) {
	srv := pgtest.Shared(t)
	storetest.RunShared(t, func(t *testing.T) (store.Store, store.Store) {
		url := srv.NewDatabase(t)
		return open(t, url), open(t, url)
	})
}

// TestMigrateTogether: replicas starting at once on a new database migrate it once (the others
// wait for the migration lock and find the schema current).
func TestMigrateTogether(t *testing.T) {
	url := pgtest.Shared(t).NewDatabase(t)
	const n = 6
	errs := make([]error, n)
	dbs := make([]*DB, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { dbs[i], errs[i] = Open(ctx, url) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		defer dbs[i].Close()
	}
	var versions, applied int
	if err := dbs[0].db.QueryRow(`SELECT COUNT(*), COUNT(DISTINCT version) FROM schema_version`).Scan(&applied, &versions); err != nil {
		t.Fatal(err)
	}
	ms, err := migrate.Load(migrationFiles)
	if err != nil {
		t.Fatal(err)
	}
	if applied != len(ms) || versions != len(ms) {
		t.Fatalf("schema_version has %d rows (%d versions), want %d", applied, versions, len(ms))
	}
}

// TestLockEndsWithSession: a replica whose connection ends (it died) gives its lock up.
func TestLockEndsWithSession(t *testing.T) {
	url := pgtest.Shared(t).NewDatabase(t)
	a, b := open(t, url), open(t, url)
	l, err := a.TryLock(ctx, "reaper")
	if err != nil || l == nil {
		t.Fatalf("lock: %v %v", l, err)
	}
	if l2, err := b.TryLock(ctx, "reaper"); err != nil || l2 != nil {
		t.Fatalf("held lock taken again: %v %v", l2, err)
	}
	a.Close() // the held connection stays open: it is out of the pool
	discard(l.(*lock).conn)
	// The server ends the session when it sees the connection closed: soon, not at once.
	var l2 store.Lock
	waitfor.True(t, time.Minute, func() bool {
		l2, err = b.TryLock(ctx, "reaper")
		if err != nil {
			t.Fatal(err)
		}
		return l2 != nil
	})
	l2.Release()
}

// TestConnectionLoss: a server that goes away gives store.ErrUnavailable, not a panic nor an
// unclassified error, and no call hangs.
func TestConnectionLoss(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase(t)
	d := open(t, url)
	if err := d.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "a", Plan: "free", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	calls := map[string]func() error{
		"AccountByName": func() error { _, err := d.AccountByName(ctx, "a"); return err },
		"CreateSandbox": func() error {
			return d.CreateSandbox(ctx, store.Sandbox{ID: "sbx_1", AccountID: "acct_1", Status: store.SandboxReady,
				CreatedAt: time.Now(), ExpiresAt: time.Now()}, 3)
		},
		"Heartbeat": func() error { return d.Heartbeat(ctx, "rep_1") },
		"TryLock":   func() error { _, err := d.TryLock(ctx, "reaper"); return err },
		"ListEvents": func() error {
			_, _, err := d.ListEvents(ctx, store.EventFilter{})
			return err
		},
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s with the server gone: %v, want ErrUnavailable", name, err)
		}
	}
	if _, err := Open(ctx, url); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Open with the server gone: %v, want ErrUnavailable", err)
	}
}
