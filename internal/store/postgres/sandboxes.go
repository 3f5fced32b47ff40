package postgres

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/sandboxd/sandboxd/internal/store"
)

const sandboxCols = `id, account_id, agent_id, mode, status, config, created_at, ready_at, expires_at,
	destroyed_at, destroy_reason, error, disk_used_bytes, image_digest, replica`

// liveIn is the SQL list of the live statuses; finalIn of the final ones.
const (
	liveIn  = `('` + store.SandboxProvisioning + `', '` + store.SandboxReady + `', '` + store.SandboxRunning + `')`
	finalIn = `('` + store.SandboxDestroyed + `', '` + store.SandboxError + `')`
)

// CreateSandbox inserts sb if the account has fewer than limit live sandboxes (limit < 0:
// unlimited), else returns store.ErrQuota. The account's row is locked (FOR UPDATE) before the
// count, so concurrent creates of one account, through any Store on the database, take turns.
// store.ErrConflict if the ID is taken; store.ErrNotFound if the account does not exist.
func (d *DB) CreateSandbox(ctx context.Context, sb store.Sandbox, limit int) error {
	config, err := checkJSON("config", sb.Config)
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, err)
	}
	errJSON, err := checkJSON("error", sb.Error)
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, err)
	}
	err = d.write(ctx, func(tx *sql.Tx) error {
		if limit >= 0 {
			var id string
			if err := tx.QueryRowContext(ctx, `SELECT id FROM accounts WHERE id = $1 FOR UPDATE`, sb.AccountID).Scan(&id); err != nil {
				return err
			}
			var live int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM sandboxes
				WHERE account_id = $1 AND status IN `+liveIn, sb.AccountID).Scan(&live); err != nil {
				return err
			}
			if live >= limit {
				return fmt.Errorf("%w (%d live, limit %d)", store.ErrQuota, live, limit)
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO sandboxes (`+sandboxCols+`)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)`,
			sb.ID, sb.AccountID, sb.AgentID, sb.Mode, sb.Status, config, sb.CreatedAt.UTC(), ptime(sb.ReadyAt),
			sb.ExpiresAt.UTC(), ptime(sb.DestroyedAt), sb.DestroyReason, errJSON, sb.DiskUsedBytes, sb.ImageDigest, sb.Replica)
		return err
	})
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, classify(err))
	}
	return nil
}

// UpdateSandbox overwrites Status, ReadyAt, DestroyedAt, DestroyReason, Error and DiskUsedBytes
// of the sandbox with sb.ID; store.ErrNotFound if there is none, store.ErrFinal if it is final.
func (d *DB) UpdateSandbox(ctx context.Context, sb store.Sandbox) error {
	return d.write(ctx, func(tx *sql.Tx) error { return updateSandbox(ctx, tx, sb) })
}

func updateSandbox(ctx context.Context, tx *sql.Tx, sb store.Sandbox) error {
	errJSON, err := checkJSON("error", sb.Error)
	if err != nil {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, err)
	}
	res, err := tx.ExecContext(ctx, `UPDATE sandboxes SET status = $1, ready_at = $2, destroyed_at = $3,
		destroy_reason = $4, error = $5, disk_used_bytes = $6 WHERE id = $7 AND status NOT IN `+finalIn,
		sb.Status, ptime(sb.ReadyAt), ptime(sb.DestroyedAt), sb.DestroyReason, errJSON, sb.DiskUsedBytes, sb.ID)
	if err == nil {
		err = changed(ctx, tx, res, "sandboxes", sb.ID)
	}
	if err != nil {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, classify(err))
	}
	return nil
}

// GetSandbox returns the sandbox id of accountID ("" = any account), or store.ErrNotFound.
func (d *DB) GetSandbox(ctx context.Context, accountID, id string) (store.Sandbox, error) {
	var a args
	q := `SELECT ` + sandboxCols + ` FROM sandboxes WHERE id = ` + a.p(id)
	if accountID != "" {
		q += ` AND account_id = ` + a.p(accountID)
	}
	sb, err := scanSandbox(d.db.QueryRowContext(ctx, q, a...))
	if err != nil {
		return store.Sandbox{}, fmt.Errorf("get sandbox %s: %w", id, classify(err))
	}
	return sb, nil
}

// ListSandboxes returns the page of sandboxes matching f, newest first (by CreatedAt, then the
// later inserted first), and how many match f in all.
func (d *DB) ListSandboxes(ctx context.Context, f store.SandboxFilter) ([]store.Sandbox, int, error) {
	var a args
	var conds []string
	if f.AccountID != "" {
		conds = append(conds, "account_id = "+a.p(f.AccountID))
	}
	if f.Status != "" {
		conds = append(conds, "status = "+a.p(f.Status))
	}
	if f.AgentID != "" {
		conds = append(conds, "agent_id = "+a.p(f.AgentID))
	}
	filter := slicesClone(a)
	lim := page(&a, f.Offset, f.Limit)
	var out []store.Sandbox
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = queryAll(ctx, tx, scanSandbox, `SELECT `+sandboxCols+` FROM sandboxes`+where(conds)+
			` ORDER BY created_at DESC, seq DESC`+lim, a...)
		if err != nil {
			return err
		}
		if f.Limit <= 0 && f.Offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM sandboxes`+where(conds), filter...).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list sandboxes: %w", classify(err))
	}
	return out, total, nil
}

// LiveSandboxes returns every live sandbox of every account (of every replica), oldest first.
func (d *DB) LiveSandboxes(ctx context.Context) ([]store.Sandbox, error) {
	out, err := queryAll(ctx, d.db, scanSandbox, `SELECT `+sandboxCols+` FROM sandboxes
		WHERE status IN `+liveIn+` ORDER BY created_at, seq`)
	if err != nil {
		return nil, fmt.Errorf("live sandboxes: %w", classify(err))
	}
	return out, nil
}

// SandboxUsage sums the runs of a sandbox; one without runs (or without a record) has zero usage.
func (d *DB) SandboxUsage(ctx context.Context, sandboxID string) (store.SandboxUsage, error) {
	var u store.SandboxUsage
	err := d.db.QueryRowContext(ctx, `SELECT COUNT(*),
			COUNT(CASE WHEN status IN ('queued', 'running') THEN 1 END),
			COALESCE(SUM(cpu_ms), 0), COALESCE(MAX(memory_peak_bytes), 0)
		FROM runs WHERE sandbox_id = $1`, sandboxID).Scan(&u.RunsTotal, &u.RunsActive, &u.CPUMS, &u.MemoryPeakBytes)
	if err != nil {
		return store.SandboxUsage{}, fmt.Errorf("usage of sandbox %s: %w", sandboxID, classify(err))
	}
	return u, nil
}

func scanSandbox(s scanner) (store.Sandbox, error) {
	var sb store.Sandbox
	var config, errJSON sql.NullString
	var ready, destroyed sql.NullTime
	if err := s.Scan(&sb.ID, &sb.AccountID, &sb.AgentID, &sb.Mode, &sb.Status, &config, &sb.CreatedAt, &ready,
		&sb.ExpiresAt, &destroyed, &sb.DestroyReason, &errJSON, &sb.DiskUsedBytes, &sb.ImageDigest, &sb.Replica); err != nil {
		return store.Sandbox{}, err
	}
	sb.CreatedAt, sb.ExpiresAt = sb.CreatedAt.UTC(), sb.ExpiresAt.UTC()
	sb.ReadyAt, sb.DestroyedAt = nullTime(ready), nullTime(destroyed)
	sb.Config, sb.Error = rawJSON(config), rawJSON(errJSON)
	return sb, nil
}

// slicesClone copies the filter's arguments before page appends its own.
func slicesClone(a args) []any { return append([]any(nil), a...) }
