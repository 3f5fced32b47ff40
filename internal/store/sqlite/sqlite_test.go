package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/migrate"
	"github.com/sandboxd/sandboxd/internal/store/storetest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

var ctx = context.Background()

func open(t *testing.T, path string) *DB {
	t.Helper()
	d, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func ok(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return open(t, filepath.Join(t.TempDir(), "sandboxd.db"))
	})
}

// TestShared: two Store values on one file, as serve and `sandboxd keys create` open it.
func TestShared(t *testing.T) {
	storetest.RunShared(t, func(t *testing.T) (store.Store, store.Store) {
		p := filepath.Join(t.TempDir(), "sandboxd.db")
		return open(t, p), open(t, p)
	})
}

var t0 = time.Date(2026, 4, 6, 14, 23, 11, 123456789, time.UTC)

// fill writes one record of each kind.
func fill(t *testing.T, st store.Store) {
	t.Helper()
	ok(t, st.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "acme", Plan: "free", CreatedAt: t0}))
	ok(t, st.AddKey(ctx, "acct_1", "key_1", []byte("hash-1"), t0))
	ok(t, st.CreateSandbox(ctx, store.Sandbox{ID: "sbx_1", AccountID: "acct_1", AgentID: "a", Mode: "container",
		Status: store.SandboxReady, Config: json.RawMessage(`{"image":"x"}`), CreatedAt: t0, ReadyAt: &t0,
		ExpiresAt: t0.Add(time.Hour)}, 3))
	ok(t, st.CreateRun(ctx, store.Run{ID: "run_1", SandboxID: "sbx_1", AccountID: "acct_1", Status: "completed",
		Code: "print(1)", Stdout: "1\n", CreatedAt: t0, CPUMS: 5}))
	ok(t, st.AddEvent(ctx, store.Event{ID: "evt_1", AccountID: "acct_1", Type: "sandbox.created", At: t0, SandboxID: "sbx_1"}))
}

// check verifies the records fill wrote, at nanosecond precision.
func check(t *testing.T, st store.Store) {
	t.Helper()
	a, err := st.AccountByKeyHash(ctx, []byte("hash-1"))
	ok(t, err)
	if a.Name != "acme" || !a.CreatedAt.Equal(t0) || a.CreatedAt != t0 {
		t.Fatalf("account %+v", a)
	}
	sb, err := st.GetSandbox(ctx, "acct_1", "sbx_1")
	ok(t, err)
	if sb.CreatedAt != t0 || *sb.ReadyAt != t0 || string(sb.Config) != `{"image":"x"}` || sb.Status != store.SandboxReady {
		t.Fatalf("sandbox %+v", sb)
	}
	r, err := st.GetRun(ctx, "sbx_1", "run_1")
	ok(t, err)
	if r.Stdout != "1\n" || r.CreatedAt != t0 || r.CPUMS != 5 {
		t.Fatalf("run %+v", r)
	}
	evs, total, err := st.ListEvents(ctx, store.EventFilter{AccountID: "acct_1"})
	ok(t, err)
	if total != 1 || evs[0].ID != "evt_1" || evs[0].At != t0 {
		t.Fatalf("events %+v", evs)
	}
}

func schemaVersions(t *testing.T, d *DB) []int {
	t.Helper()
	rows, err := d.r.QueryContext(ctx, `SELECT version FROM schema_version ORDER BY version`)
	ok(t, err)
	defer rows.Close()
	var vs []int
	for rows.Next() {
		var v int
		ok(t, rows.Scan(&v))
		vs = append(vs, v)
	}
	ok(t, rows.Err())
	return vs
}

func TestReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sandboxd.db")
	ms, err := migrate.Load(migrationFiles)
	ok(t, err)

	d, err := Open(ctx, path)
	ok(t, err)
	fill(t, d)
	ok(t, d.Close())

	for i := range 2 {
		d := open(t, path)
		check(t, d)
		if got := schemaVersions(t, d); len(got) != len(ms) || got[len(got)-1] != len(ms) {
			t.Fatalf("open %d: schema versions %v, want 1..%d once each", i+2, got, len(ms))
		}
		ok(t, d.Close())
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sandboxd.db")
	d, err := Open(ctx, path)
	ok(t, err)
	_, err = d.w.ExecContext(ctx, `INSERT INTO schema_version (version, name, applied_at) VALUES (999, 'future', '')`)
	ok(t, err)
	ok(t, d.Close())
	if d, err := Open(ctx, path); err == nil || !strings.Contains(err.Error(), "newer") {
		if d != nil {
			d.Close()
		}
		t.Fatalf("open of a newer schema: %v", err)
	}
}

func TestPragmas(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "sandboxd.db"))
	for _, tc := range []struct {
		pool, pragma, want string
	}{
		{"writer", "journal_mode", "wal"},
		{"writer", "synchronous", "1"}, // NORMAL
		{"writer", "foreign_keys", "1"},
		{"writer", "busy_timeout", fmt.Sprint(busyTimeout.Milliseconds())},
		{"reader", "journal_mode", "wal"},
		{"reader", "foreign_keys", "1"},
		{"reader", "query_only", "1"},
		{"reader", "busy_timeout", fmt.Sprint(busyTimeout.Milliseconds())},
	} {
		db := d.w
		if tc.pool == "reader" {
			db = d.r
		}
		var got string
		ok(t, db.QueryRowContext(ctx, "PRAGMA "+tc.pragma).Scan(&got))
		if got != tc.want {
			t.Errorf("%s: PRAGMA %s = %s, want %s", tc.pool, tc.pragma, got, tc.want)
		}
	}
	if _, err := d.r.ExecContext(ctx, `INSERT INTO accounts VALUES ('a', 'b', 'c', 'd')`); err == nil {
		t.Error("a reader connection wrote")
	}
}

// TestTwoHandles opens the file twice, as the server and the keys command do: the concurrency
// check holds across them and no "database is locked" escapes.
func TestTwoHandles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sandboxd.db")
	d1, d2 := open(t, path), open(t, path)
	ok(t, d1.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "acme", Plan: "free", CreatedAt: t0}))

	const n = 40
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		st := d1
		if i%2 == 1 {
			st = d2
		}
		wg.Go(func() {
			sb := store.Sandbox{ID: fmt.Sprintf("sbx_%d", i), AccountID: "acct_1", Status: store.SandboxReady,
				CreatedAt: t0, ExpiresAt: t0}
			errs[i] = st.CreateSandbox(ctx, sb, 3)
			// Unconditioned writes and reads alongside.
			if err := st.AddEvent(ctx, store.Event{ID: fmt.Sprintf("evt_%d", i), AccountID: "acct_1", Type: "x", At: t0}); err != nil {
				errs[i] = errors.Join(errs[i], err)
			}
			if _, _, err := st.ListEvents(ctx, store.EventFilter{AccountID: "acct_1"}); err != nil {
				errs[i] = errors.Join(errs[i], err)
			}
		})
	}
	wg.Wait()
	created := 0
	for i, err := range errs {
		switch {
		case err == nil:
			created++
		case !errors.Is(err, store.ErrQuota) || strings.Contains(err.Error(), "locked"):
			t.Errorf("worker %d: %v", i, err)
		}
	}
	if created != 3 {
		t.Fatalf("%d sandboxes created, want 3", created)
	}
	_, total, err := d2.ListEvents(ctx, store.EventFilter{})
	ok(t, err)
	if total != n {
		t.Fatalf("%d events, want %d", total, n)
	}
}

func TestMissingReferences(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "sandboxd.db"))
	err := d.CreateSandbox(ctx, store.Sandbox{ID: "sbx_1", AccountID: "acct_none", CreatedAt: t0, ExpiresAt: t0}, -1)
	if !errors.Is(err, store.ErrNotFound) {
		t.Errorf("sandbox of an unknown account: %v", err)
	}
	err = d.CreateRun(ctx, store.Run{ID: "run_1", SandboxID: "sbx_none", CreatedAt: t0})
	if !errors.Is(err, store.ErrNotFound) {
		t.Errorf("run of an unknown sandbox: %v", err)
	}
	err = d.AddKey(ctx, "acct_none", "key_1", []byte("h"), t0)
	if !errors.Is(err, store.ErrNotFound) {
		t.Errorf("key of an unknown account: %v", err)
	}
}

func TestInvalidValues(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "sandboxd.db"))
	ok(t, d.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "acme", CreatedAt: t0}))
	for name, err := range map[string]error{
		"invalid JSON": d.CreateSandbox(ctx, store.Sandbox{ID: "sbx_1", AccountID: "acct_1", CreatedAt: t0,
			ExpiresAt: t0, Config: json.RawMessage(`{"a":`)}, -1),
		"time past year 9999": d.AddEvent(ctx, store.Event{ID: "evt_1", At: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}),
		"empty key hash":      d.AddKey(ctx, "acct_1", "key_1", nil, t0),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, total, err := d.ListSandboxes(ctx, store.SandboxFilter{}); err != nil || total != 0 {
		t.Fatalf("sandboxes after an invalid create: %d, %v", total, err)
	}
}

// TestStoredTimes pins the stored form, which the ordering of the text columns relies on.
func TestStoredTimes(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "sandboxd.db"))
	zoned := t0.In(time.FixedZone("", -7*3600))
	ok(t, d.AddEvent(ctx, store.Event{ID: "evt_1", Type: "x", At: zoned}))
	ok(t, d.AddEvent(ctx, store.Event{ID: "evt_2", Type: "x", At: time.Time{}}))
	var a1, a2 string
	ok(t, d.r.QueryRowContext(ctx, `SELECT at FROM events WHERE id = 'evt_1'`).Scan(&a1))
	ok(t, d.r.QueryRowContext(ctx, `SELECT at FROM events WHERE id = 'evt_2'`).Scan(&a2))
	if a1 != "2026-04-06T14:23:11.123456789Z" || a2 != "0001-01-01T00:00:00.000000000Z" {
		t.Fatalf("stored times %q, %q", a1, a2)
	}
	evs, _, err := d.ListEvents(ctx, store.EventFilter{})
	ok(t, err)
	if evs[0].ID != "evt_2" || !evs[0].At.IsZero() || evs[1].At != t0 {
		t.Fatalf("events %+v", evs)
	}
}

func TestOpenPaths(t *testing.T) {
	for _, p := range []string{"", ":memory:", "file:x.db"} {
		if d, err := Open(ctx, p); err == nil {
			d.Close()
			t.Errorf("Open(%q): no error", p)
		}
	}
	// Characters that mean something in a URI are part of the file name.
	dir := t.TempDir()
	path := filepath.Join(dir, "a b?c#d%20e.db")
	d := open(t, path)
	fill(t, d)
	ok(t, d.Close())
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
	check(t, open(t, path))
	// A relative path is relative to the working directory.
	t.Chdir(dir)
	check(t, open(t, filepath.Base(path)))
}

// TestCrash kills a process that has written records, without closing the store: nothing
// committed is lost.
func TestCrash(t *testing.T) {
	if path := os.Getenv("SANDBOXD_STORE_CRASH_DB"); path != "" {
		d, err := Open(ctx, path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fill(t, d)
		for i := range 100 {
			if err := d.AddEvent(ctx, store.Event{ID: fmt.Sprintf("evt_x%d", i), AccountID: "acct_2", Type: "x", At: t0}); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
		}
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	path := filepath.Join(t.TempDir(), "sandboxd.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrash$", "-test.count=1")
	cmd.Env = append(os.Environ(), "SANDBOXD_STORE_CRASH_DB="+path)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if _, err := os.Stat(path + "-wal"); err != nil {
		t.Fatalf("no WAL left by the killed process: %v", err)
	}
	d := open(t, path)
	check(t, d)
	_, total, err := d.ListEvents(ctx, store.EventFilter{AccountID: "acct_2"})
	ok(t, err)
	if total != 100 {
		t.Fatalf("%d events after the crash, want 100", total)
	}
}

// TestStatementCacheWhileWriting: a statement prepared for the first time while a write
// transaction holds the writer's one connection waits for it — and must not hold what the
// transaction needs to go on (the cache's lock, which its own statements are looked up under).
// The old cache prepared under its lock: this deadlocked (seen as a stop that never ended).
func TestStatementCacheWhileWriting(t *testing.T) {
	d := open(t, filepath.Join(t.TempDir(), "s.db"))
	inTx, proceed := make(chan struct{}), make(chan struct{})
	done := make(chan error, 2)
	go func() {
		done <- d.write(ctx, func(tx *sql.Tx) error {
			close(inTx)
			<-proceed
			_, err := d.exec(ctx, tx, updateSandboxSQL, "ready", nil, nil, "", nil, 0, "sbx_none")
			return err
		})
	}()
	<-inTx
	go func() {
		_, err := d.exec(ctx, nil, "UPDATE accounts SET plan = plan WHERE id = ?", "acct_none") // never prepared before
		done <- err
	}()
	// The second waits for the writer's connection (preparing its statement) before the
	// transaction goes on.
	waitfor.True(t, time.Minute, func() bool { return d.w.Stats().WaitCount > 0 })
	close(proceed)
	for i := 0; i < 2; i++ {
		select {
		case err := <-done:
			ok(t, err)
		case <-time.After(time.Minute): // (a hang, not a timing: either ends at once or never)
			t.Fatal("deadlock: the transaction and the prepare wait for each other")
		}
	}
}
