package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// Usage returns an account's usage per UTC day, oldest first, leaving out days with nothing.
//
// A sandbox counts if its CreatedAt is in [from, to) (zero bounds are open), on its creation day:
// one sandbox, and its billed minutes, each started minute of its lifetime and at least one. The
// lifetime ends at DestroyedAt, or at now if it has none (the sandbox is live). A run counts if its
// CreatedAt is in [from, to), on its creation day, with its CPU time.
func (d *DB) Usage(ctx context.Context, accountID string, from, to, now time.Time) ([]store.UsageDay, error) {
	var e enc
	conds := []string{"account_id = ?"}
	args := []any{accountID}
	if !from.IsZero() {
		conds, args = append(conds, "created_at >= ?"), append(args, e.time(from))
	}
	if !to.IsZero() {
		conds, args = append(conds, "created_at < ?"), append(args, e.time(to))
	}
	if e.err != nil {
		return nil, fmt.Errorf("usage of account %s: %w", accountID, e.err)
	}
	days := store.UsageDays{}
	err := d.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT created_at, destroyed_at FROM sandboxes`+where(conds), args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var c string
			var dst sql.NullString
			if err := rows.Scan(&c, &dst); err != nil {
				return err
			}
			created, err := parseTime(c)
			if err != nil {
				return err
			}
			end := now
			if dst.Valid {
				if end, err = parseTime(dst.String); err != nil {
					return err
				}
			}
			days.AddSandbox(created, end)
		}
		if err := rows.Err(); err != nil {
			return err
		}

		// Stored times start with the UTC date: its first 10 characters are the day.
		rows, err = tx.QueryContext(ctx, `SELECT substr(created_at, 1, 10), COUNT(*), COALESCE(SUM(cpu_ms), 0)
			FROM runs`+where(conds)+` GROUP BY 1`, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var d string
			var n int
			var cpuMS int64
			if err := rows.Scan(&d, &n, &cpuMS); err != nil {
				return err
			}
			days.AddRuns(d, n, cpuMS)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("usage of account %s: %w", accountID, classify(err))
	}
	return days.Days(), nil
}
