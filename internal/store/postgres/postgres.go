// Package postgres implements store.Store on PostgreSQL, through database/sql and pgx's stdlib
// adapter (github.com/jackc/pgx/v5): the store several sandboxd API replicas share.
//
// # Concurrency across replicas
//
// Every Store value, in any process, is a client of one database; what must hold across them is
// held by the database:
//
//   - CreateSandbox locks the account's row (SELECT … FOR UPDATE) before it counts the account's
//     live sandboxes, so concurrent creates of one account — through any replica — take turns,
//     and creates of different accounts do not wait for each other. CreateContext does the same
//     with the sandbox's row.
//   - A run or a sandbox is final once (see store's Finality): every update carries the condition
//     "not final yet" in its WHERE clause. Under READ COMMITTED a second writer of the same row
//     waits for the first to commit and then re-checks the condition on the committed row, so it
//     changes nothing and is told store.ErrFinal.
//   - Leadership locks (TryLock) are session advisory locks, each held on a connection of its own
//     taken out of the pool; they end with the session, so a replica that dies (or loses its
//     connection) gives its locks up.
//   - Migrations run in one transaction under a transaction advisory lock: replicas starting
//     together migrate once, the others wait and find the schema current.
//
// # Encoding
//
// Times are timestamptz (microsecond precision) and come back in UTC. Code, output, a run's
// result and display are bytea (they may hold NUL or invalid UTF-8, which text refuses); JSON
// columns are text holding valid JSON, NULL when unset.
//
// # Errors
//
// As in package sqlite: store.ErrNotFound, store.ErrConflict, store.ErrQuota, store.ErrFinal;
// and store.ErrUnavailable when the server cannot be reached or the connection is lost.
package postgres

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/migrate"
)

// Advisory lock classes (the first key of the two-key form): the second key is 0 for the
// migration lock, hashtext(name) for a leadership lock.
const (
	lockClassMigrate = 0x5bd0
	lockClassLeader  = 0x5bd1
)

// maxConns bounds the connection pool of one Store.
const maxConns = 16

// DB is a store.Store on a PostgreSQL database. It is safe for concurrent use.
type DB struct {
	db *sql.DB
}

var _ store.Store = (*DB)(nil)

// Open connects to the database at url (postgres://user@host/db?…, or libpq's key=value form)
// and brings its schema up to date.
func Open(ctx context.Context, url string) (*DB, error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	d := &DB{db: db}
	if err := d.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store: %w", classify(err))
	}
	return d, nil
}

// Close closes the connection pool.
func (d *DB) Close() error { return d.db.Close() }

//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrate applies, in one transaction under the migration lock, every migration the database has
// not had yet. A database whose schema is newer than this binary knows is refused.
func (d *DB) migrate(ctx context.Context) error {
	ms, err := migrate.Load(migrationFiles)
	if err != nil {
		return err
	}
	return d.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1, 0)`, lockClassMigrate); err != nil {
			return fmt.Errorf("migration lock: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
			version    integer PRIMARY KEY,
			name       text NOT NULL,
			applied_at timestamptz NOT NULL)`); err != nil {
			return fmt.Errorf("schema_version: %w", err)
		}
		return migrate.Apply(ctx, tx, ms, func(m migrate.Migration) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, now())`,
				m.Version, m.Name)
			return err
		})
	})
}

// write runs fn in a READ COMMITTED transaction and commits it if fn returns nil.
func (d *DB) write(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// read runs fn in a read-only REPEATABLE READ transaction: everything fn reads comes from one
// snapshot (a listing and its total agree).
func (d *DB) read(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
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
// a unique violation store.ErrConflict, a foreign key violation store.ErrNotFound, and a server
// that cannot be reached, a lost connection or a server shutting down store.ErrUnavailable.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return store.ErrNotFound
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "23505": // unique_violation
			return fmt.Errorf("%w: %w", store.ErrConflict, err)
		case pe.Code == "23503": // foreign_key_violation
			return fmt.Errorf("%w: refers to a missing record: %w", store.ErrNotFound, err)
		case strings.HasPrefix(pe.Code, "08"), // connection exceptions
			pe.Code == "57P01", pe.Code == "57P02", pe.Code == "57P03": // admin/crash shutdown, cannot connect now
			return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
		}
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	if errors.As(err, &ce) || errors.As(err, &ne) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) || errors.Is(err, sql.ErrConnDone) ||
		pgconn.SafeToRetry(err) || strings.Contains(err.Error(), "conn closed") {
		return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
	}
	return err
}

// args collects a statement's arguments and names their placeholders ($1, $2, …).
type args []any

// p appends v and returns its placeholder.
func (a *args) p(v any) string {
	*a = append(*a, v)
	return "$" + strconv.Itoa(len(*a))
}

// checkJSON is nil for nil or empty j, and j as text otherwise; it must be valid JSON.
func checkJSON(field string, j json.RawMessage) (any, error) {
	if len(j) == 0 {
		return nil, nil
	}
	if !json.Valid(j) {
		return nil, fmt.Errorf("%s is not valid JSON", field)
	}
	return string(j), nil
}

// bytesOrNil is nil (NULL) for nil j, else j's bytes (a bytea column holding JSON as it came).
func bytesOrNil(j json.RawMessage) any {
	if len(j) == 0 {
		return nil
	}
	return []byte(j)
}

func ptime(t *time.Time) any {
	if t == nil {
		return nil
	}
	return t.UTC()
}

func nullTime(t sql.NullTime) *time.Time {
	if !t.Valid {
		return nil
	}
	u := t.Time.UTC()
	return &u
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

// page is the LIMIT/OFFSET clause, its arguments appended to a; limit <= 0 means no limit.
func page(a *args, offset, limit int) string {
	var lim any // NULL: no limit
	if limit > 0 {
		lim = limit
	}
	return " LIMIT " + a.p(lim) + " OFFSET " + a.p(max(offset, 0))
}

// scanner is a *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }

// querier is a *sql.DB or *sql.Tx.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// queryAll runs query and scans every row with scan.
func queryAll[T any](ctx context.Context, q querier, scan func(scanner) (T, error), query string, a ...any) ([]T, error) {
	rows, err := q.QueryContext(ctx, query, a...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// changed returns nil if res changed a row; otherwise why not: the record id of table does not
// exist (store.ErrNotFound) or is final (store.ErrFinal).
func changed(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, res sql.Result, table, id string) error {
	n, err := res.RowsAffected()
	if err != nil || n > 0 {
		return err
	}
	var exists bool
	if err := q.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+table+` WHERE id = $1)`, id).Scan(&exists); err != nil {
		return err
	}
	if !exists {
		return store.ErrNotFound
	}
	return store.ErrFinal
}
