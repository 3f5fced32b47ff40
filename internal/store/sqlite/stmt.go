package sqlite

import (
	"context"
	"database/sql"
	"sync"
)

// maxPrepared bounds a pool's statement cache: the store's statements are constants and the few
// filter combinations of its listings; a text past the bound is prepared for its one call.
const maxPrepared = 128

// stmtCache holds the statements prepared on one pool, by their text. A run makes about ten
// statements; SQLite parsing and planning each one anew cost about a third of the server's CPU
// per run (perf, 2026-12-06), so each text is prepared once per pool (database/sql prepares it
// again on a connection that does not have it yet).
type stmtCache struct {
	db     *sql.DB
	mu     sync.Mutex
	m      map[string]*sql.Stmt
	closed bool // by close: statements prepared after it are not kept
}

// prime prepares the statements qs ahead: the ones used in write transactions, which find the
// writer's one connection taken and so cannot be prepared on first use (see DB.exec).
func (c *stmtCache) prime(ctx context.Context, qs ...string) error {
	for _, q := range qs {
		if _, _, err := c.get(ctx, q); err != nil {
			return err
		}
	}
	return nil
}

// lookup returns the statement prepared for q, or nil.
func (c *stmtCache) lookup(q string) *sql.Stmt {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[q]
}

// get returns the statement prepared for q, preparing it on first use. keep is false when the
// cache is full: the caller closes the statement after its call.
//
// The lock is not held while preparing: preparing waits for a free connection, and the writer's
// only one may be held by a transaction that needs the lock (DB.exec's lookup) to go on.
func (c *stmtCache) get(ctx context.Context, q string) (st *sql.Stmt, keep bool, err error) {
	if st := c.lookup(q); st != nil {
		return st, true, nil
	}
	st, err = c.db.PrepareContext(ctx, q)
	if err != nil {
		return nil, false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if had := c.m[q]; had != nil { // prepared meanwhile by another call
		st.Close()
		return had, true, nil
	}
	if len(c.m) >= maxPrepared || c.closed {
		return st, false, nil
	}
	if c.m == nil {
		c.m = make(map[string]*sql.Stmt)
	}
	c.m[q] = st
	return st, true, nil
}

// close closes every cached statement.
func (c *stmtCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, st := range c.m {
		st.Close()
	}
	c.m, c.closed = nil, true
}

// exec runs the write statement q with args on the writer connection, in tx when tx is not nil.
// In a transaction, only a primed statement is used prepared: preparing waits for a free
// connection, and the writer's only one is the transaction's.
func (d *DB) exec(ctx context.Context, tx *sql.Tx, q string, args ...any) (sql.Result, error) {
	if tx != nil {
		if st := d.ws.lookup(q); st != nil {
			return tx.StmtContext(ctx, st).ExecContext(ctx, args...)
		}
		return tx.ExecContext(ctx, q, args...)
	}
	st, keep, err := d.ws.get(ctx, q)
	if err != nil {
		return nil, err
	}
	if !keep {
		defer st.Close()
	}
	return st.ExecContext(ctx, args...)
}

// queryRow runs the query q, which reads one row, on a read-only connection.
func (d *DB) queryRow(ctx context.Context, q string, args ...any) *sql.Row {
	st, keep, err := d.rs.get(ctx, q)
	if err != nil {
		// The error comes back from Scan, as database/sql's own QueryRowContext reports it.
		return d.r.QueryRowContext(ctx, q, args...)
	}
	if !keep {
		defer st.Close()
	}
	return st.QueryRowContext(ctx, args...)
}
