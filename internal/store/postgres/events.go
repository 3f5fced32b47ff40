package postgres

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/sandboxd/sandboxd/internal/store"
)

const eventCols = `id, account_id, type, at, sandbox_id, run_id, agent_id, detail`

// AddEvent appends an audit event; store.ErrConflict on a duplicate ID. The account, sandbox and
// run it names need not exist.
func (d *DB) AddEvent(ctx context.Context, ev store.Event) error {
	return d.write(ctx, func(tx *sql.Tx) error { return addEvent(ctx, tx, ev) })
}

func addEvent(ctx context.Context, tx *sql.Tx, ev store.Event) error {
	detail, err := checkJSON("detail", ev.Detail)
	if err != nil {
		return fmt.Errorf("add event %s: %w", ev.ID, err)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO events (`+eventCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
		ev.ID, ev.AccountID, ev.Type, ev.At.UTC(), ev.SandboxID, ev.RunID, ev.AgentID, detail)
	if err != nil {
		return fmt.Errorf("add event %s: %w", ev.ID, classify(err))
	}
	return nil
}

// ListEvents returns the page of events matching f, oldest first (by At, then in insertion
// order), and how many match f in all.
func (d *DB) ListEvents(ctx context.Context, f store.EventFilter) ([]store.Event, int, error) {
	var a args
	var conds []string
	if f.AccountID != "" {
		conds = append(conds, "account_id = "+a.p(f.AccountID))
	}
	if f.SandboxID != "" {
		conds = append(conds, "sandbox_id = "+a.p(f.SandboxID))
	}
	if f.Type != "" {
		conds = append(conds, "type = "+a.p(f.Type))
	}
	if !f.From.IsZero() {
		conds = append(conds, "at >= "+a.p(f.From.UTC()))
	}
	if !f.To.IsZero() {
		conds = append(conds, "at < "+a.p(f.To.UTC()))
	}
	filter := slicesClone(a)
	lim := page(&a, f.Offset, f.Limit)
	var out []store.Event
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = queryAll(ctx, tx, scanEvent, `SELECT `+eventCols+` FROM events`+where(conds)+` ORDER BY at, seq`+lim, a...)
		if err != nil {
			return err
		}
		if f.Limit <= 0 && f.Offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM events`+where(conds), filter...).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list events: %w", classify(err))
	}
	return out, total, nil
}

func scanEvent(s scanner) (store.Event, error) {
	var ev store.Event
	var detail sql.NullString
	if err := s.Scan(&ev.ID, &ev.AccountID, &ev.Type, &ev.At, &ev.SandboxID, &ev.RunID, &ev.AgentID, &detail); err != nil {
		return store.Event{}, err
	}
	ev.At, ev.Detail = ev.At.UTC(), rawJSON(detail)
	return ev, nil
}
