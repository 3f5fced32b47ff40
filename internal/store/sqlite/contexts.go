package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

const contextCols = `id, sandbox_id, account_id, status, reset_reason, created_at, deleted_at, runs`

// CreateContext inserts c unless its sandbox already has limit contexts that are not deleted
// (store.ErrQuota); store.ErrConflict on a duplicate ID.
func (d *DB) CreateContext(ctx context.Context, c store.Context, limit int) error {
	var e enc
	args := []any{c.ID, c.SandboxID, c.AccountID, c.Status, c.ResetReason, e.time(c.CreatedAt), e.ptime(c.DeletedAt), c.Runs}
	if e.err != nil {
		return fmt.Errorf("create context %s: %w", c.ID, e.err)
	}
	err := d.write(ctx, func(tx *sql.Tx) error {
		if limit >= 0 {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM contexts WHERE sandbox_id = ? AND status != ?`,
				c.SandboxID, store.ContextDeleted).Scan(&n); err != nil {
				return err
			}
			if n >= limit {
				return fmt.Errorf("%w (%d contexts, limit %d)", store.ErrQuota, n, limit)
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO contexts (`+contextCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, args...)
		return err
	})
	if err != nil {
		return fmt.Errorf("create context %s: %w", c.ID, classify(err))
	}
	return nil
}

// UpdateContext overwrites Status, ResetReason, DeletedAt and Runs unless the record is deleted
// (a deleted record is final: a run that ends after its sandbox's contexts were ended must not
// bring its context back); store.ErrNotFound if there is none.
func (d *DB) UpdateContext(ctx context.Context, c store.Context) error {
	return d.write(ctx, func(tx *sql.Tx) error { return d.updateContext(ctx, tx, c) })
}

// updateContext is UpdateContext in tx.
func (d *DB) updateContext(ctx context.Context, tx *sql.Tx, c store.Context) error {
	var e enc
	args := []any{c.Status, c.ResetReason, e.ptime(c.DeletedAt), c.Runs, c.ID, store.ContextDeleted}
	if e.err != nil {
		return fmt.Errorf("update context %s: %w", c.ID, e.err)
	}
	err := func() error {
		res, err := d.exec(ctx, tx, `UPDATE contexts SET status = ?, reset_reason = ?, deleted_at = ?, runs = ?
			WHERE id = ? AND status != ?`, args...)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n > 0 {
			return err
		}
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM contexts WHERE id = ?`, c.ID).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return store.ErrNotFound
		}
		return nil // deleted: left as it is
	}()
	if err != nil {
		return fmt.Errorf("update context %s: %w", c.ID, classify(err))
	}
	return nil
}

// GetContext returns context id of sandbox sandboxID, or store.ErrNotFound.
func (d *DB) GetContext(ctx context.Context, sandboxID, id string) (store.Context, error) {
	c, err := scanContext(d.queryRow(ctx, `SELECT `+contextCols+` FROM contexts WHERE id = ? AND sandbox_id = ?`, id, sandboxID))
	if err != nil {
		return store.Context{}, fmt.Errorf("get context %s of sandbox %s: %w", id, sandboxID, classify(err))
	}
	return c, nil
}

// ListContexts returns a sandbox's contexts, oldest first.
func (d *DB) ListContexts(ctx context.Context, sandboxID string) ([]store.Context, error) {
	rows, err := d.r.QueryContext(ctx, `SELECT `+contextCols+` FROM contexts WHERE sandbox_id = ? ORDER BY seq`, sandboxID)
	if err != nil {
		return nil, fmt.Errorf("list contexts of sandbox %s: %w", sandboxID, classify(err))
	}
	defer rows.Close()
	out := []store.Context{}
	for rows.Next() {
		c, err := scanContext(rows)
		if err != nil {
			return nil, fmt.Errorf("list contexts of sandbox %s: %w", sandboxID, err)
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list contexts of sandbox %s: %w", sandboxID, classify(err))
	}
	return out, nil
}

// EndContexts marks a sandbox's contexts that are not deleted deleted (reason, at).
func (d *DB) EndContexts(ctx context.Context, sandboxID, reason string, at time.Time) (int, error) {
	var e enc
	t := e.time(at)
	if e.err != nil {
		return 0, fmt.Errorf("end contexts of sandbox %s: %w", sandboxID, e.err)
	}
	res, err := d.exec(ctx, nil, `UPDATE contexts SET status = ?, reset_reason = ?, deleted_at = ?
		WHERE sandbox_id = ? AND status != ?`, store.ContextDeleted, reason, t, sandboxID, store.ContextDeleted)
	if err != nil {
		return 0, fmt.Errorf("end contexts of sandbox %s: %w", sandboxID, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("end contexts of sandbox %s: %w", sandboxID, err)
	}
	return int(n), nil
}

func scanContext(s scanner) (store.Context, error) {
	var c store.Context
	var created string
	var deleted sql.NullString
	if err := s.Scan(&c.ID, &c.SandboxID, &c.AccountID, &c.Status, &c.ResetReason, &created, &deleted, &c.Runs); err != nil {
		return store.Context{}, err
	}
	var err error
	if c.CreatedAt, err = parseTime(created); err != nil {
		return store.Context{}, err
	}
	if c.DeletedAt, err = parsePtime(deleted); err != nil {
		return store.Context{}, err
	}
	return c, nil
}
