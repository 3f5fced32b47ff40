package sqlite

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/sandboxd/sandboxd/internal/store"
)

const sandboxCols = `id, account_id, agent_id, mode, status, config, created_at, ready_at, expires_at,
	destroyed_at, destroy_reason, error, disk_used_bytes, image_digest, replica`

// liveIn is the SQL list of the live statuses.
const liveIn = `('` + store.SandboxProvisioning + `', '` + store.SandboxReady + `', '` + store.SandboxRunning + `')`

// CreateSandbox inserts sb if the account has fewer than limit live sandboxes (limit < 0:
// unlimited), else returns store.ErrQuota. The count and the insert are one BEGIN IMMEDIATE
// transaction, so concurrent creates, in this process or another, cannot both pass the check.
// store.ErrConflict if the ID is taken; store.ErrNotFound if the account does not exist.
func (d *DB) CreateSandbox(ctx context.Context, sb store.Sandbox, limit int) error {
	var e enc
	args := []any{sb.ID, sb.AccountID, sb.AgentID, sb.Mode, sb.Status, e.json("config", sb.Config),
		e.time(sb.CreatedAt), e.ptime(sb.ReadyAt), e.time(sb.ExpiresAt), e.ptime(sb.DestroyedAt),
		sb.DestroyReason, e.json("error", sb.Error), sb.DiskUsedBytes, sb.ImageDigest, sb.Replica}
	if e.err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, e.err)
	}
	err := d.write(ctx, func(tx *sql.Tx) error {
		if limit >= 0 {
			var live int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM sandboxes
				WHERE account_id = ? AND status IN `+liveIn, sb.AccountID).Scan(&live); err != nil {
				return err
			}
			if live >= limit {
				return fmt.Errorf("%w (%d live, limit %d)", store.ErrQuota, live, limit)
			}
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO sandboxes (`+sandboxCols+`)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, args...)
		return err
	})
	if err != nil {
		return fmt.Errorf("create sandbox %s: %w", sb.ID, classify(err))
	}
	return nil
}

const updateSandboxSQL = `UPDATE sandboxes
	SET status = ?, ready_at = ?, destroyed_at = ?, destroy_reason = ?, error = ?, disk_used_bytes = ?
	WHERE id = ? AND status NOT IN ('` + store.SandboxDestroyed + `', '` + store.SandboxError + `')`

// UpdateSandbox overwrites Status, ReadyAt, DestroyedAt, DestroyReason, Error and DiskUsedBytes
// of the sandbox with sb.ID; the other fields of sb are ignored. store.ErrNotFound if there is
// none, store.ErrFinal if it is destroyed or failed (a final record is never written again).
func (d *DB) UpdateSandbox(ctx context.Context, sb store.Sandbox) error {
	return d.updateSandbox(ctx, nil, sb)
}

// updateSandbox is UpdateSandbox, in tx when tx is not nil.
func (d *DB) updateSandbox(ctx context.Context, tx *sql.Tx, sb store.Sandbox) error {
	var e enc
	args := []any{sb.Status, e.ptime(sb.ReadyAt), e.ptime(sb.DestroyedAt), sb.DestroyReason,
		e.json("error", sb.Error), sb.DiskUsedBytes, sb.ID}
	if e.err != nil {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, e.err)
	}
	res, err := d.exec(ctx, tx, updateSandboxSQL, args...)
	if err != nil {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, classify(err))
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, err)
	} else if n == 0 {
		return fmt.Errorf("update sandbox %s: %w", sb.ID, d.whyUnchanged(ctx, tx, "sandboxes", sb.ID))
	}
	return nil
}

// whyUnchanged tells why a conditional update of record id of table changed no row: it does not
// exist (store.ErrNotFound), or it is final (store.ErrFinal).
func (d *DB) whyUnchanged(ctx context.Context, tx *sql.Tx, table, id string) error {
	q := `SELECT COUNT(*) FROM ` + table + ` WHERE id = ?`
	var row *sql.Row
	if tx != nil {
		row = tx.QueryRowContext(ctx, q, id)
	} else {
		row = d.queryRow(ctx, q, id)
	}
	var n int
	if err := row.Scan(&n); err != nil {
		return classify(err)
	}
	if n == 0 {
		return store.ErrNotFound
	}
	return store.ErrFinal
}

// GetSandbox returns the sandbox id of accountID ("" = any account), or store.ErrNotFound.
func (d *DB) GetSandbox(ctx context.Context, accountID, id string) (store.Sandbox, error) {
	q := `SELECT ` + sandboxCols + ` FROM sandboxes WHERE id = ?`
	args := []any{id}
	if accountID != "" {
		q += ` AND account_id = ?`
		args = append(args, accountID)
	}
	sb, err := scanSandbox(d.queryRow(ctx, q, args...))
	if err != nil {
		return store.Sandbox{}, fmt.Errorf("get sandbox %s: %w", id, classify(err))
	}
	return sb, nil
}

// ListSandboxes returns the page of sandboxes matching f, newest first (by CreatedAt, then the
// later inserted first), and how many match f in all.
func (d *DB) ListSandboxes(ctx context.Context, f store.SandboxFilter) ([]store.Sandbox, int, error) {
	var conds []string
	var args []any
	if f.AccountID != "" {
		conds, args = append(conds, "account_id = ?"), append(args, f.AccountID)
	}
	if f.Status != "" {
		conds, args = append(conds, "status = ?"), append(args, f.Status)
	}
	if f.AgentID != "" {
		conds, args = append(conds, "agent_id = ?"), append(args, f.AgentID)
	}
	lim, limArgs := page(f.Offset, f.Limit)
	var out []store.Sandbox
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = querySandboxes(ctx, tx, `SELECT `+sandboxCols+` FROM sandboxes`+where(conds)+
			` ORDER BY created_at DESC, seq DESC`+lim, append(args[:len(args):len(args)], limArgs...)...)
		if err != nil {
			return err
		}
		if f.Limit <= 0 && f.Offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM sandboxes`+where(conds), args...).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list sandboxes: %w", classify(err))
	}
	return out, total, nil
}

// LiveSandboxes returns every live sandbox of every account (of every replica), oldest first.
func (d *DB) LiveSandboxes(ctx context.Context) ([]store.Sandbox, error) {
	out, err := querySandboxes(ctx, d.r, `SELECT `+sandboxCols+` FROM sandboxes
		WHERE status IN `+liveIn+` ORDER BY created_at, seq`)
	if err != nil {
		return nil, fmt.Errorf("live sandboxes: %w", classify(err))
	}
	return out, nil
}

// SandboxUsage sums the runs of a sandbox; one without runs (or without a record) has zero usage.
func (d *DB) SandboxUsage(ctx context.Context, sandboxID string) (store.SandboxUsage, error) {
	var u store.SandboxUsage
	err := d.queryRow(ctx, `SELECT COUNT(*),
			COUNT(CASE WHEN status IN ('queued', 'running') THEN 1 END),
			COALESCE(SUM(cpu_ms), 0), COALESCE(MAX(memory_peak_bytes), 0)
		FROM runs WHERE sandbox_id = ?`, sandboxID).Scan(&u.RunsTotal, &u.RunsActive, &u.CPUMS, &u.MemoryPeakBytes)
	if err != nil {
		return store.SandboxUsage{}, fmt.Errorf("usage of sandbox %s: %w", sandboxID, classify(err))
	}
	return u, nil
}

// querier is a *sql.DB or *sql.Tx.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func querySandboxes(ctx context.Context, q querier, query string, args ...any) ([]store.Sandbox, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Sandbox
	for rows.Next() {
		sb, err := scanSandbox(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, sb)
	}
	return out, rows.Err()
}

func scanSandbox(s scanner) (store.Sandbox, error) {
	var sb store.Sandbox
	var config, errJSON, ready, destroyed sql.NullString
	var created, expires string
	if err := s.Scan(&sb.ID, &sb.AccountID, &sb.AgentID, &sb.Mode, &sb.Status, &config, &created, &ready,
		&expires, &destroyed, &sb.DestroyReason, &errJSON, &sb.DiskUsedBytes, &sb.ImageDigest, &sb.Replica); err != nil {
		return store.Sandbox{}, err
	}
	var err error
	if sb.CreatedAt, err = parseTime(created); err != nil {
		return store.Sandbox{}, err
	}
	if sb.ExpiresAt, err = parseTime(expires); err != nil {
		return store.Sandbox{}, err
	}
	if sb.ReadyAt, err = parsePtime(ready); err != nil {
		return store.Sandbox{}, err
	}
	if sb.DestroyedAt, err = parsePtime(destroyed); err != nil {
		return store.Sandbox{}, err
	}
	sb.Config, sb.Error = rawJSON(config), rawJSON(errJSON)
	return sb, nil
}
