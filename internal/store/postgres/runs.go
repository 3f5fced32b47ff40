package postgres

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

// runFields are a run's stored forms, in runCols' order from status on (code aside).
func runFields(r store.Run) ([]any, error) {
	errJSON, err := checkJSON("error", r.Error)
	if err != nil {
		return nil, err
	}
	if len(r.Result) > 0 && !json.Valid(r.Result) {
		return nil, fmt.Errorf("result is not valid JSON")
	}
	var outputs any
	if len(r.Outputs) > 0 {
		b, err := json.Marshal(r.Outputs)
		if err != nil {
			return nil, fmt.Errorf("outputs: %w", err)
		}
		outputs = string(b)
	}
	var display any
	if r.Display != nil {
		display = []byte(*r.Display)
	}
	var exit any
	if r.ExitCode != nil {
		exit = *r.ExitCode
	}
	return []any{r.Status, r.TimeoutSeconds, r.Async, exit, []byte(r.Stdout), []byte(r.Stderr), r.StdoutTruncated,
		r.StderrTruncated, bytesOrNil(r.Result), errJSON, ptime(r.StartedAt), ptime(r.FinishedAt), r.DurationMS,
		r.CPUMS, r.MemoryPeakBytes, r.NetworkAllowed, r.NetworkDenied, r.ContextReset, display, outputs,
		r.OutputsTruncated}, nil
}

// CreateRun inserts a run; store.ErrConflict on a duplicate ID, store.ErrNotFound if its sandbox
// does not exist.
func (d *DB) CreateRun(ctx context.Context, r store.Run) error {
	return insertRun(ctx, d.db, r)
}

// execer is a *sql.DB or *sql.Tx.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// insertRun is CreateRun on db, a pool or a transaction.
func insertRun(ctx context.Context, db execer, r store.Run) error {
	f, err := runFields(r)
	if err != nil {
		return fmt.Errorf("create run %s: %w", r.ID, err)
	}
	// In runCols' order: code, created_at and context_id, which only an insert writes, go between.
	a := []any{r.ID, r.SandboxID, r.AccountID, f[0], []byte(r.Code)}
	a = append(a, f[1:10]...) // timeout_seconds … error
	a = append(a, r.CreatedAt.UTC())
	a = append(a, f[10:17]...) // started_at … network_denied
	a = append(a, r.Context)
	a = append(a, f[17:]...) // context_reset … outputs_truncated
	_, err = db.ExecContext(ctx, `INSERT INTO runs (`+runCols+`) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
		$10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)`, a...)
	if err != nil {
		return fmt.Errorf("create run %s: %w", r.ID, classify(err))
	}
	return nil
}

// StartRun records run r for the first time as it starts: sb as UpdateSandbox does, then r
// inserted, then ev, in one transaction. The sandbox's conditional update comes first: a start
// after the sandbox's end (a sweeper's, committed first) is refused with ErrFinal.
func (d *DB) StartRun(ctx context.Context, r store.Run, sb store.Sandbox, ev *store.Event) error {
	return d.write(ctx, func(tx *sql.Tx) error {
		if err := updateSandbox(ctx, tx, sb); err != nil {
			return err
		}
		if err := insertRun(ctx, tx, r); err != nil {
			return err
		}
		if ev != nil {
			return addEvent(ctx, tx, *ev)
		}
		return nil
	})
}

// UpdateRun overwrites every field of the run with r.ID but ID, SandboxID, AccountID, Code and
// CreatedAt; store.ErrNotFound if there is none, store.ErrFinal if it is final.
func (d *DB) UpdateRun(ctx context.Context, r store.Run) error {
	return d.RecordRun(ctx, r, nil, nil)
}

// RecordRun writes a step of a run in one transaction: run r as UpdateRun does, then sb's mutable
// fields as UpdateSandbox does (when sb is not nil), then the event ev (when not nil). Nothing is
// written if any part fails.
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
			if err := updateContext(ctx, tx, *c); err != nil {
				return err
			}
		}
		if err := updateRun(ctx, tx, r); err != nil {
			return err
		}
		if sb != nil {
			if err := updateSandbox(ctx, tx, *sb); err != nil {
				return err
			}
		}
		if ev != nil {
			return addEvent(ctx, tx, *ev)
		}
		return nil
	})
}

func updateRun(ctx context.Context, tx *sql.Tx, r store.Run) error {
	f, err := runFields(r)
	if err != nil {
		return fmt.Errorf("update run %s: %w", r.ID, err)
	}
	res, err := tx.ExecContext(ctx, `UPDATE runs SET status = $1, timeout_seconds = $2, async = $3,
		exit_code = $4, stdout = $5, stderr = $6, stdout_truncated = $7, stderr_truncated = $8, result = $9,
		error = $10, started_at = $11, finished_at = $12, duration_ms = $13, cpu_ms = $14, memory_peak_bytes = $15,
		network_allowed = $16, network_denied = $17, context_reset = $18, display = $19, outputs = $20,
		outputs_truncated = $21 WHERE id = $22 AND status IN ('queued', 'running')`, append(f, r.ID)...)
	if err == nil {
		err = changed(ctx, tx, res, "runs", r.ID)
	}
	if err != nil {
		return fmt.Errorf("update run %s: %w", r.ID, classify(err))
	}
	return nil
}

// GetRun returns the run runID of the sandbox sandboxID, or store.ErrNotFound.
func (d *DB) GetRun(ctx context.Context, sandboxID, runID string) (store.Run, error) {
	r, err := scanRun(d.db.QueryRowContext(ctx, `SELECT `+runCols+` FROM runs WHERE id = $1 AND sandbox_id = $2`,
		runID, sandboxID))
	if err != nil {
		return store.Run{}, fmt.Errorf("get run %s of sandbox %s: %w", runID, sandboxID, classify(err))
	}
	return r, nil
}

// ListRuns returns a page of a sandbox's runs, newest first (by CreatedAt, then the later
// inserted first), and how many it has in all. limit <= 0 means no limit.
func (d *DB) ListRuns(ctx context.Context, sandboxID string, offset, limit int) ([]store.Run, int, error) {
	a := args{sandboxID}
	lim := page(&a, offset, limit)
	var out []store.Run
	total := 0
	err := d.read(ctx, func(tx *sql.Tx) error {
		var err error
		out, err = queryAll(ctx, tx, scanRun, `SELECT `+runCols+` FROM runs WHERE sandbox_id = $1
			ORDER BY created_at DESC, seq DESC`+lim, a...)
		if err != nil {
			return err
		}
		if limit <= 0 && offset <= 0 {
			total = len(out)
			return nil
		}
		return tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM runs WHERE sandbox_id = $1`, sandboxID).Scan(&total)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list runs of sandbox %s: %w", sandboxID, classify(err))
	}
	return out, total, nil
}

// EndOpenRuns sets every queued or running run of a sandbox to status, with Error errJSON (nil:
// none) and FinishedAt at, and returns how many it changed. Other fields are left as they are.
func (d *DB) EndOpenRuns(ctx context.Context, sandboxID, status string, errJSON json.RawMessage, at time.Time) (int, error) {
	e, err := checkJSON("error", errJSON)
	if err != nil {
		return 0, fmt.Errorf("end open runs of sandbox %s: %w", sandboxID, err)
	}
	res, err := d.db.ExecContext(ctx, `UPDATE runs SET status = $1, error = $2, finished_at = $3
		WHERE sandbox_id = $4 AND status IN ('queued', 'running')`, status, e, at.UTC(), sandboxID)
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
	var code, stdout, stderr, result, display []byte
	var errJSON, outputs sql.NullString
	var started, finished sql.NullTime
	if err := s.Scan(&r.ID, &r.SandboxID, &r.AccountID, &r.Status, &code, &r.TimeoutSeconds, &r.Async, &exit,
		&stdout, &stderr, &r.StdoutTruncated, &r.StderrTruncated, &result, &errJSON, &r.CreatedAt, &started,
		&finished, &r.DurationMS, &r.CPUMS, &r.MemoryPeakBytes, &r.NetworkAllowed, &r.NetworkDenied, &r.Context,
		&r.ContextReset, &display, &outputs, &r.OutputsTruncated); err != nil {
		return store.Run{}, err
	}
	if exit.Valid {
		c := int(exit.Int64)
		r.ExitCode = &c
	}
	r.Code, r.Stdout, r.Stderr = string(code), string(stdout), string(stderr)
	r.CreatedAt = r.CreatedAt.UTC()
	r.StartedAt, r.FinishedAt = nullTime(started), nullTime(finished)
	if result != nil {
		r.Result = json.RawMessage(result)
	}
	r.Error = rawJSON(errJSON)
	if display != nil {
		s := string(display)
		r.Display = &s
	}
	if outputs.Valid {
		if err := json.Unmarshal([]byte(outputs.String), &r.Outputs); err != nil {
			return store.Run{}, fmt.Errorf("stored outputs of run %s: %w", r.ID, err)
		}
	}
	return r, nil
}
