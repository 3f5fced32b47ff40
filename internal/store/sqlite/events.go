package sqlite

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/sandboxd/sandboxd/internal/store"
)

const eventCols = `id, account_id, type, at, sandbox_id, run_id, agent_id, detail`

const addEventSQL = `INSERT INTO events (` + eventCols + `) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`

// AddEvent appends an audit event; store.ErrConflict on a duplicate ID. The account, sandbox and
// run it names need not exist (an auth.failed event has no account).
func (d *DB) AddEvent(ctx context.Context, ev store.Event) error {
	return d.addEvent(ctx, nil, ev)
}

// addEvent is AddEvent, in tx when tx is not nil.
func (d *DB) addEvent(ctx context.Context, tx *sql.Tx, ev store.Event) error {
	var e enc
	args := []any{ev.ID, ev.AccountID, ev.Type, e.time(ev.At), ev.SandboxID, ev.RunID, ev.AgentID,
		e.json("detail", ev.Detail)}
	if e.err != nil {
		return fmt.Errorf("add event %s: %w", ev.ID, e.err)
	}
	_, err := d.exec(ctx, tx, addEventSQL, args...)
	if err != nil {
		return fmt.Errorf("add event %s: %w", ev.ID, classify(err))
	}
	return nil
}

// ListEvents returns the page of events matching f, oldest first (by At, then in insertion
// order), and how many match f in all.
func (d *DB) ListEvents(ctx context.Context, f store.EventFilter) ([]store.Event, int, error) {
	var e enc
	var conds []string
	var args []any
	if f.AccountID != "" {
		conds, args = append(conds, "account_id = ?"), append(args, f.AccountID)
	}
	if f.SandboxID != "" {
		conds, args = append(conds, "sandbox_id = ?"), append(args, f.SandboxID)
	}
	if f.Type != "" {
		conds, args = append(conds, "type = ?"), append(args, f.Type)
	}
	if !f.From.IsZero() {
		conds, args = append(conds, "at >= ?"), append(args, e.time(f.From))
	}
	if !f.To.IsZero() {
		conds, args = append(conds, "at < ?"), append(args, e.time(f.To))
	}
	if e.err != nil {
		return nil, 0, fmt.Errorf("list events: %w", e.err)
	}
	lim, limArgs := page(f.Offset, f.Limit)
	var out []store.Event
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT `+eventCols+` FROM events`+where(conds)+
			` ORDER BY at, seq`+lim, append(args[:len(args):len(args)], limArgs...)...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			ev, err := scanEvent(rows)
			if err != nil {
				return err
			}
			out = append(out, ev)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if f.Limit <= 0 && f.Offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM events`+where(conds), args...).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list events: %w", classify(err))
	}
	return out, total, nil
}

func scanEvent(s scanner) (store.Event, error) {
	var ev store.Event
	var at string
	var detail sql.NullString
	if err := s.Scan(&ev.ID, &ev.AccountID, &ev.Type, &at, &ev.SandboxID, &ev.RunID, &ev.AgentID, &detail); err != nil {
		return store.Event{}, err
	}
	var err error
	if ev.At, err = parseTime(at); err != nil {
		return store.Event{}, err
	}
	ev.Detail = rawJSON(detail)
	return ev, nil
}
