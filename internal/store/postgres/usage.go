package postgres

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// Usage returns an account's usage per UTC day, oldest first, leaving out days with nothing (as
// package sqlite's Usage, which documents the rules).
func (d *DB) Usage(ctx context.Context, accountID string, from, to, now time.Time) ([]store.UsageDay, error) {
	a := args{accountID}
	conds := []string{"account_id = $1"}
	if !from.IsZero() {
		conds = append(conds, "created_at >= "+a.p(from.UTC()))
	}
	if !to.IsZero() {
		conds = append(conds, "created_at < "+a.p(to.UTC()))
	}
	days := store.UsageDays{}
	err := d.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT created_at, destroyed_at FROM sandboxes`+where(conds), a...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var created time.Time
			var dst sql.NullTime
			if err := rows.Scan(&created, &dst); err != nil {
				return err
			}
			created, end := created.UTC(), now
			if dst.Valid {
				end = dst.Time
			}
			days.AddSandbox(created, end)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, err = tx.QueryContext(ctx, `SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), COUNT(*),
			COALESCE(SUM(cpu_ms), 0) FROM runs`+where(conds)+` GROUP BY 1`, a...)
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
