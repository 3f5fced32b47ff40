package postgres

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

const contextCols = `id, sandbox_id, account_id, status, reset_reason, created_at, deleted_at, runs`

// CreateContext inserts c unless its sandbox already has limit contexts that are not deleted
// (store.ErrQuota); the sandbox's row is locked before the count. store.ErrConflict on a
// duplicate ID, store.ErrNotFound if the sandbox does not exist.
func (d *DB) CreateContext(ctx context.Context, c store.Context, limit int) error {
	err := d.write(ctx, func(tx *sql.Tx) error {
		if limit >= 0 {
			var id string
			if err := tx.QueryRowContext(ctx, `SELECT id FROM sandboxes WHERE id = $1 FOR UPDATE`, c.SandboxID).Scan(&id); err != nil {
				return err
			}
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM contexts WHERE sandbox_id = $1 AND status != $2`,
				c.SandboxID, store.ContextDeleted).Scan(&n); err != nil {
				return err
			}
			if n >= limit {
				return fmt.Errorf("%w (%d contexts, limit %d)", store.ErrQuota, n, limit)
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO contexts (`+contextCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
			c.ID, c.SandboxID, c.AccountID, c.Status, c.ResetReason, c.CreatedAt.UTC(), ptime(c.DeletedAt), c.Runs)
		return err
	})
	if err != nil {
		return fmt.Errorf("create context %s: %w", c.ID, classify(err))
	}
	return nil
}

// UpdateContext overwrites Status, ResetReason, DeletedAt and Runs unless the record is deleted
// (then it is left as it is, and that is no error); store.ErrNotFound if there is none.
func (d *DB) UpdateContext(ctx context.Context, c store.Context) error {
	return d.write(ctx, func(tx *sql.Tx) error { return updateContext(ctx, tx, c) })
}

// updateContext is UpdateContext in tx.
func updateContext(ctx context.Context, tx *sql.Tx, c store.Context) error {
	err := func() error {
		res, err := tx.ExecContext(ctx, `UPDATE contexts SET status = $1, reset_reason = $2, deleted_at = $3, runs = $4
			WHERE id = $5 AND status != $6`, c.Status, c.ResetReason, ptime(c.DeletedAt), c.Runs, c.ID, store.ContextDeleted)
		if err != nil {
			return err
		}
		if err := changed(ctx, tx, res, "contexts", c.ID); err != store.ErrFinal {
			return err
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
	c, err := scanContext(d.db.QueryRowContext(ctx, `SELECT `+contextCols+` FROM contexts WHERE id = $1 AND sandbox_id = $2`, id, sandboxID))
	if err != nil {
		return store.Context{}, fmt.Errorf("get context %s of sandbox %s: %w", id, sandboxID, classify(err))
	}
	return c, nil
}

// ListContexts returns a sandbox's contexts, oldest first.
func (d *DB) ListContexts(ctx context.Context, sandboxID string) ([]store.Context, error) {
	out, err := queryAll(ctx, d.db, scanContext, `SELECT `+contextCols+` FROM contexts WHERE sandbox_id = $1 ORDER BY seq`, sandboxID)
	if err != nil {
		return nil, fmt.Errorf("list contexts of sandbox %s: %w", sandboxID, classify(err))
	}
	if out == nil {
		out = []store.Context{}
	}
	return out, nil
}

// EndContexts marks a sandbox's contexts that are not deleted deleted (reason, at).
func (d *DB) EndContexts(ctx context.Context, sandboxID, reason string, at time.Time) (int, error) {
	res, err := d.db.ExecContext(ctx, `UPDATE contexts SET status = $1, reset_reason = $2, deleted_at = $3
		WHERE sandbox_id = $4 AND status != $1`, store.ContextDeleted, reason, at.UTC(), sandboxID)
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
	var deleted sql.NullTime
	if err := s.Scan(&c.ID, &c.SandboxID, &c.AccountID, &c.Status, &c.ResetReason, &c.CreatedAt, &deleted, &c.Runs); err != nil {
		return store.Context{}, err
	}
	c.CreatedAt, c.DeletedAt = c.CreatedAt.UTC(), nullTime(deleted)
	return c, nil
}
