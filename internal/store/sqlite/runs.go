package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

const runCols = `id, sandbox_id, account_id, status, code, timeout_seconds, async, exit_code, stdout, stderr,
	stdout_truncated, stderr_truncated, result, error, created_at, started_at, finished_at, duration_ms,
	cpu_ms, memory_peak_bytes, network_allowed, network_denied, context_id, context_reset, display, outputs,
	outputs_truncated`

const updateRunSQL = `UPDATE runs SET status = ?, timeout_seconds = ?, async = ?,
	exit_code = ?, stdout = ?, stderr = ?, stdout_truncated = ?, stderr_truncated = ?, result = ?,
	error = ?, started_at = ?, finished_at = ?, duration_ms = ?, cpu_ms = ?, memory_peak_bytes = ?,
	network_allowed = ?, network_denied = ?, context_reset = ?, display = ?, outputs = ?, outputs_truncated = ?
	WHERE id = ? AND status IN ('queued', 'running')`

const insertRunSQL = `INSERT INTO runs (` + runCols + `)
	VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`

// CreateRun inserts a run; store.ErrConflict on a duplicate ID, store.ErrNotFound if its sandbox
// does not exist.
func (d *DB) CreateRun(ctx context.Context, r store.Run) error {
	return d.insertRun(ctx, nil, r)
}

// insertRun is CreateRun, in tx when tx is not nil.
func (d *DB) insertRun(ctx context.Context, tx *sql.Tx, r store.Run) error {
	var e enc
	args := []any{r.ID, r.SandboxID, r.AccountID, r.Status, r.Code, r.TimeoutSeconds, r.Async, r.ExitCode,
		r.Stdout, r.Stderr, r.StdoutTruncated, r.StderrTruncated, e.json("result", r.Result),
		e.json("error", r.Error), e.time(r.CreatedAt), e.ptime(r.StartedAt), e.ptime(r.FinishedAt),
		r.DurationMS, r.CPUMS, r.MemoryPeakBytes, r.NetworkAllowed, r.NetworkDenied, r.Context, r.ContextReset,
		r.Display, e.outputs(r.Outputs), r.OutputsTruncated}
	if e.err != nil {
		return fmt.Errorf("create run %s: %w", r.ID, e.err)
	}
	if _, err := d.exec(ctx, tx, insertRunSQL, args...); err != nil {
		return fmt.Errorf("create run %s: %w", r.ID, classify(err))
	}
	return nil
}

// StartRun records run r for the first time as it starts: sb as UpdateSandbox does (the update
// that refuses a final sandbox), r inserted, then ev, in one transaction.
func (d *DB) StartRun(ctx context.Context, r store.Run, sb store.Sandbox, ev *store.Event) error {
	return d.write(ctx, func(tx *sql.Tx) error {
		if err := d.updateSandbox(ctx, tx, sb); err != nil {
			return err
		}
		if err := d.insertRun(ctx, tx, r); err != nil {
			return err
		}
		if ev != nil {
			return d.addEvent(ctx, tx, *ev)
		}
		return nil
	})
}

// UpdateRun overwrites every field of the run with r.ID but ID, SandboxID, AccountID, Code and
// CreatedAt; store.ErrNotFound if there is none, store.ErrFinal if it is final (its first final
// record stays).
func (d *DB) UpdateRun(ctx context.Context, r store.Run) error {
	return d.updateRun(ctx, nil, r)
}

// RecordRun writes a step of a run in one transaction: run r as UpdateRun does, then sb's mutable
// fields as UpdateSandbox does (when sb is not nil), then the event ev (when not nil). Nothing is
// written if any part fails (store.ErrNotFound when the run or the sandbox does not exist,
// store.ErrFinal when either is final).
func (d *DB) RecordRun(ctx context.Context, r store.Run, sb *store.Sandbox, ev *store.Event) error {
	return d.recordRun(ctx, r, sb, ev, nil)
}

// RecordContextRun is RecordRun that also writes context c as UpdateContext does, in the same
// transaction.
func (d *DB) RecordContextRun(ctx context.Context, r store.Run, sb *store.Sandbox, ev *store.Event, c store.Context) error {
	return d.recordRun(ctx, r, sb, ev, &c)
}

func (d *DB) recordRun(ctx context.Context, r store.Run, sb *store.Sandbox, ev *store.Event, c *store.Context) error {
	return d.write(ctx, func(tx *sql.Tx) error {
		if c != nil {
			if err := d.updateContext(ctx, tx, *c); err != nil {
				return err
			}
		}
		if err := d.updateRun(ctx, tx, r); err != nil {
			return err
		}
		if sb != nil {
			if err := d.updateSandbox(ctx, tx, *sb); err != nil {
				return err
			}
		}
		if ev != nil {
			return d.addEvent(ctx, tx, *ev)
		}
		return nil
	})
}

// updateRun is UpdateRun, in tx when tx is not nil.
func (d *DB) updateRun(ctx context.Context, tx *sql.Tx, r store.Run) error {
	var e enc
	args := []any{r.Status, r.TimeoutSeconds, r.Async, r.ExitCode, r.Stdout, r.Stderr, r.StdoutTruncated,
		r.StderrTruncated, e.json("result", r.Result), e.json("error", r.Error), e.ptime(r.StartedAt),
		e.ptime(r.FinishedAt), r.DurationMS, r.CPUMS, r.MemoryPeakBytes, r.NetworkAllowed, r.NetworkDenied, r.ContextReset,
		r.Display, e.outputs(r.Outputs), r.OutputsTruncated, r.ID}
	if e.err != nil {
		return fmt.Errorf("update run %s: %w", r.ID, e.err)
	}
	res, err := d.exec(ctx, tx, updateRunSQL, args...)
	if err != nil {
		return fmt.Errorf("update run %s: %w", r.ID, classify(err))
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("update run %s: %w", r.ID, err)
	} else if n == 0 {
		return fmt.Errorf("update run %s: %w", r.ID, d.whyUnchanged(ctx, tx, "runs", r.ID))
	}
	return nil
}

// GetRun returns the run runID of the sandbox sandboxID, or store.ErrNotFound.
func (d *DB) GetRun(ctx context.Context, sandboxID, runID string) (store.Run, error) {
	r, err := scanRun(d.queryRow(ctx, `SELECT `+runCols+` FROM runs WHERE id = ? AND sandbox_id = ?`,
		runID, sandboxID))
	if err != nil {
		return store.Run{}, fmt.Errorf("get run %s of sandbox %s: %w", runID, sandboxID, classify(err))
	}
	return r, nil
}

// ListRuns returns a page of a sandbox's runs, newest first (by CreatedAt, then the later
// inserted first), and how many it has in all. limit <= 0 means no limit.
func (d *DB) ListRuns(ctx context.Context, sandboxID string, offset, limit int) ([]store.Run, int, error) {
	lim, limArgs := page(offset, limit)
	var out []store.Run
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT `+runCols+` FROM runs WHERE sandbox_id = ?
			ORDER BY created_at DESC, seq DESC`+lim, append([]any{sandboxID}, limArgs...)...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			r, err := scanRun(rows)
			if err != nil {
				return err
			}
			out = append(out, r)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if limit <= 0 && offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM runs WHERE sandbox_id = ?`, sandboxID).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list runs of sandbox %s: %w", sandboxID, classify(err))
	}
	return out, total, nil
}

// EndOpenRuns sets every queued or running run of a sandbox to status, with Error errJSON (nil:
// none) and FinishedAt at, and returns how many it changed. Other fields are left as they are.
func (d *DB) EndOpenRuns(ctx context.Context, sandboxID, status string, errJSON json.RawMessage, at time.Time) (int, error) {
	var e enc
	args := []any{status, e.json("error", errJSON), e.time(at), sandboxID}
	if e.err != nil {
		return 0, fmt.Errorf("end open runs of sandbox %s: %w", sandboxID, e.err)
	}
	res, err := d.exec(ctx, nil, `UPDATE runs SET status = ?, error = ?, finished_at = ?
		WHERE sandbox_id = ? AND status IN ('queued', 'running')`, args...)
	if err != nil {
		return 0, fmt.Errorf("end open runs of sandbox %s: %w", sandboxID, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("end open runs of sandbox %s: %w", sandboxID, err)
	}
	return int(n), nil
}

func scanRun(s scanner) (store.Run, error) {
	var r store.Run
	var exit sql.NullInt64
	var result, errJSON, started, finished, display, outputs sql.NullString
	var created string
	if err := s.Scan(&r.ID, &r.SandboxID, &r.AccountID, &r.Status, &r.Code, &r.TimeoutSeconds, &r.Async, &exit,
		&r.Stdout, &r.Stderr, &r.StdoutTruncated, &r.StderrTruncated, &result, &errJSON, &created, &started,
		&finished, &r.DurationMS, &r.CPUMS, &r.MemoryPeakBytes, &r.NetworkAllowed, &r.NetworkDenied, &r.Context, &r.ContextReset,
		&display, &outputs, &r.OutputsTruncated); err != nil {
		return store.Run{}, err
	}
	if exit.Valid {
		c := int(exit.Int64)
		r.ExitCode = &c
	}
	var err error
	if r.CreatedAt, err = parseTime(created); err != nil {
		return store.Run{}, err
	}
	if r.StartedAt, err = parsePtime(started); err != nil {
		return store.Run{}, err
	}
	if r.FinishedAt, err = parsePtime(finished); err != nil {
		return store.Run{}, err
	}
	r.Result, r.Error = rawJSON(result), rawJSON(errJSON)
	if display.Valid {
		r.Display = &display.String
	}
	if outputs.Valid {
		if err := json.Unmarshal([]byte(outputs.String), &r.Outputs); err != nil {
			return store.Run{}, fmt.Errorf("stored outputs of run %s: %w", r.ID, err)
		}
	}
	return r, nil
}
