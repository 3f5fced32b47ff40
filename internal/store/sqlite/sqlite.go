// Package sqlite implements store.Store on an embedded SQLite database (modernc.org/sqlite: pure
// Go, no cgo).
//
// # Durability
//
// The database runs in WAL mode with synchronous=NORMAL. A transaction is durable against a crash
// of the process as soon as it commits: its pages are in the WAL file (in the OS page cache), and
// the next Open replays them. Only a crash of the host (power loss, kernel panic) can lose the
// last transactions committed before it; the database is never corrupted either way. FULL would
// fsync the WAL on every commit to survive host crashes too, at a cost on every run update and
// audit event; the API promises that a crash of the service loses nothing, which NORMAL keeps.
//
// # Concurrency
//
// A DB holds two connection pools on the same file:
//
//   - one writer connection, through which every write goes. Multi-statement writes are
//     BEGIN IMMEDIATE transactions, so they take the database's write lock up front; in this
//     process writers queue for the connection and never meet SQLITE_BUSY. That is what makes
//     the count-then-insert of CreateSandbox atomic.
//   - several read-only connections (PRAGMA query_only). In WAL mode they read a consistent
//     snapshot without blocking the writer or each other; a listing and its total come from one
//     read transaction, so they agree.
//
// Another process may open the same file at the same time (the `sandboxd keys create` command
// does while the server runs): every connection waits up to busyTimeout for a lock held by the
// other process instead of failing with "database is locked".
//
// A file is served by one server (serve locks its data directory): one replica. Its leadership
// locks (TryLock) are held in this process, by file and name; replica times are this process's
// clock.
//
// # Encoding
//
// Times are stored as TEXT in a fixed-width UTC form with nanoseconds
// ("2026-04-06T14:23:11.123456789Z"): the strings sort like the instants, so ordering and range
// filters work on them, and times round-trip exactly; they come back as UTC. Years 0–9999 are
// supported; a time outside them is an error. JSON columns are TEXT; a nil (or empty)
// json.RawMessage is NULL and comes back nil; anything else must be valid JSON. Listings are
// ordered by time, ties broken by insertion order.
//
// # Schema
//
// The schema is the embedded migrations/NNNN_name.sql files, applied in order, each recorded in
// the schema_version table, all in one transaction at Open. A database whose schema is newer than
// this binary knows is refused.
//
// # Errors
//
// Errors carry the operation and the record's ID. A missing record is store.ErrNotFound, a
// duplicate ID or unique value store.ErrConflict, a reference to a missing record (a sandbox of
// an unknown account, a run of an unknown sandbox, a key of an unknown account)
// store.ErrNotFound; test them with errors.Is.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	sqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/migrate"
)

// busyTimeout is how long a connection waits for a lock held by another process.
const busyTimeout = 10 * time.Second

// timeLayout is the stored form of every time; t must be UTC.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// DB is a store.Store on one SQLite file. It is safe for concurrent use.
type DB struct {
	path string  // the database file's absolute path
	w    *sql.DB // exactly one connection: every write
	r    *sql.DB // read-only connections
	ws   stmtCache
	rs   stmtCache
}

var _ store.Store = (*DB)(nil)

// Open opens (creating it if need be) the database file at path and brings its schema up to date.
// path is a file system path; an in-memory database is not supported (the two pools would see
// two different databases).
func Open(ctx context.Context, path string) (*DB, error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") {
		return nil, fmt.Errorf("open store: %q is not a database file path", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	ms := busyTimeout.Milliseconds()
	w, err := sql.Open("sqlite", dsn(abs, url.Values{
		"_txlock": {"immediate"},
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", ms),
			"foreign_keys(1)",
			"journal_mode(WAL)",
			"synchronous(NORMAL)",
		},
	}))
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)

	d := &DB{path: abs, w: w, ws: stmtCache{db: w}}
	// The first connection sets WAL mode (persistent in the file) before any reader opens.
	if err := d.migrate(ctx); err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}

	if err := d.ws.prime(ctx, insertRunSQL, updateRunSQL, updateSandboxSQL, addEventSQL); err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}

	r, err := sql.Open("sqlite", dsn(abs, url.Values{
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", ms),
			"foreign_keys(1)",
			"query_only(1)",
		},
	}))
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	n := min(max(runtime.GOMAXPROCS(0), 2), 8)
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	r.SetConnMaxIdleTime(5 * time.Minute)
	if err := r.PingContext(ctx); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	d.r, d.rs.db = r, r
	return d, nil
}

// dsn is the driver's name for the file at the absolute path abs: a file: URI, so that any
// character of the path is escaped rather than taken for the start of the query.
func dsn(abs string, q url.Values) string {
	u := url.URL{Scheme: "file", Path: abs, RawQuery: q.Encode()}
	return u.String()
}

// Close closes both connection pools.
func (d *DB) Close() error {
	d.ws.close()
	d.rs.close()
	return errors.Join(d.r.Close(), d.w.Close())
}

// migrationFiles are the schema's migrations, named NNNN_description.sql.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrate applies, in one write transaction, every migration the database has not had yet.
func (d *DB) migrate(ctx context.Context) error {
	ms, err := migrate.Load(migrationFiles)
	if err != nil {
		return err
	}
	return d.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version    INTEGER PRIMARY KEY,
			name       TEXT NOT NULL,
			applied_at TEXT NOT NULL)`); err != nil {
			return fmt.Errorf("schema_version: %w", err)
		}
		return migrate.Apply(ctx, tx, ms, func(m migrate.Migration) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)`,
				m.Version, m.Name, time.Now().UTC().Format(timeLayout))
			return err
		})
	})
}

// write runs fn in a write transaction (BEGIN IMMEDIATE on the writer connection) and commits it
// if fn returns nil.
func (d *DB) write(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// read runs fn in a read transaction: everything fn reads comes from one snapshot.
func (d *DB) read(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.r.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// classify adds the store's sentinel to errors it recognises: sql.ErrNoRows is store.ErrNotFound,
// a unique or primary key violation store.ErrConflict, a foreign key violation (the record refers
// to one that does not exist) store.ErrNotFound.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return store.ErrNotFound
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() {
		case sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
			return fmt.Errorf("%w: %w", store.ErrConflict, err)
		case sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
			return fmt.Errorf("%w: refers to a missing record: %w", store.ErrNotFound, err)
		}
	}
	return err
}

// enc converts values to their stored form, keeping the first error.
type enc struct{ err error }

func (e *enc) time(t time.Time) string {
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		if e.err == nil {
			e.err = fmt.Errorf("time %s out of the supported range (years 0-9999)", t.Format(time.RFC3339))
		}
		return ""
	}
	return t.Format(timeLayout)
}

// ptime is NULL for nil.
func (e *enc) ptime(t *time.Time) any {
	if t == nil {
		return nil
	}
	return e.time(*t)
}

// json is NULL for nil or empty; otherwise it must be valid JSON.
func (e *enc) json(field string, j json.RawMessage) any {
	if len(j) == 0 {
		return nil
	}
	if !json.Valid(j) {
		if e.err == nil {
			e.err = fmt.Errorf("%s is not valid JSON", field)
		}
		return nil
	}
	return string(j)
}

// outputs is a run's outputs as JSON; NULL for none.
func (e *enc) outputs(o []store.RunOutput) any {
	if len(o) == 0 {
		return nil
	}
	b, err := json.Marshal(o)
	if err != nil && e.err == nil {
		e.err = fmt.Errorf("outputs: %w", err)
	}
	return string(b)
}

func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("stored time %q: %w", s, err)
	}
	return t.UTC(), nil
}

func parsePtime(s sql.NullString) (*time.Time, error) {
	if !s.Valid {
		return nil, nil
	}
	t, err := parseTime(s.String)
	if err != nil {
		return nil, err
	}
	return &t, nil
}

func rawJSON(s sql.NullString) json.RawMessage {
	if !s.Valid {
		return nil
	}
	return json.RawMessage(s.String)
}

// where joins conditions with AND into a WHERE clause ("" when there are none).
func where(conds []string) string {
	if len(conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(conds, " AND ")
}

// page is the LIMIT/OFFSET clause and its arguments; limit <= 0 means no limit.
func page(offset, limit int) (string, []any) {
	if limit <= 0 {
		limit = -1
	}
	return " LIMIT ? OFFSET ?", []any{limit, max(offset, 0)}
}

// scanner is a *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }
