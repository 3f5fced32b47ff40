package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/store"
)

// Run statuses the service adds to the driver's outcomes.
const (
	RunQueued  = "queued"
	RunRunning = "running"
	RunError   = "error" // the service failed, not the code
)

// Run queues code in a sandbox. With req.Async it returns at once (accepted=true, the run queued);
// otherwise it waits for the run to end and returns it. A caller that goes away while waiting
// leaves the run to finish; its record keeps the outcome.
func (s *Service) Run(ctx context.Context, acct store.Account, sandboxID string, req api.RunRequest) (r api.Run, accepted bool, err error) {
	code, timeout, err := validateRun(req)
	if err != nil {
		return api.Run{}, false, err
	}
	// A sandbox live here is known by its record in memory (this replica writes it); any other is
	// read from the store, which also tells another tenant's sandbox from none (both: not found).
	s.mu.Lock()
	lv := s.live[sandboxID]
	s.mu.Unlock()
	var rec store.Sandbox
	if lv != nil {
		lv.mu.Lock()
		rec = lv.rec
		lv.mu.Unlock()
	}
	if lv == nil || rec.AccountID != acct.ID {
		rec, err = s.st.GetSandbox(ctx, acct.ID, sandboxID)
		if errors.Is(err, store.ErrNotFound) {
			return api.Run{}, false, errorf(KindNotFound, "no sandbox %q", sandboxID)
		} else if err != nil {
			return api.Run{}, false, internal("get sandbox", err)
		}
	}
	if lv == nil {
		if err := s.elsewhere(rec); err != nil {
			return api.Run{}, false, err
		}
		return api.Run{}, false, errorf(KindSandboxDestroyed, "sandbox %s is %s: create a new one", sandboxID, rec.Status)
	}
	var cx store.Context
	if req.Context != "" {
		if cx, err = s.runContext(ctx, rec, req.Context); err != nil {
			return api.Run{}, false, err
		}
	}
	jctx, cancel := context.WithCancel(lv.ctx)
	j := &job{env: req.Env, ctx: jctx, cancel: cancel, done: make(chan struct{}), out: newOutputLog(), run: store.Run{
		ID: newID("run_"), SandboxID: sandboxID, AccountID: acct.ID, Status: RunQueued, Code: code,
		TimeoutSeconds: timeout, Async: req.Async, CreatedAt: now(), Context: req.Context,
	}}
	var queued store.Run
	lv.mu.Lock()
	switch {
	case lv.closing:
		err = errorf(KindSandboxDestroyed, "sandbox %s is being destroyed", sandboxID)
	case lv.rec.Status == store.SandboxProvisioning:
		err = errorf(KindSandboxNotReady, "sandbox %s is still provisioning: poll GET /api/sandbox/%s until it is ready", sandboxID, sandboxID)
	case len(lv.queue) >= MaxQueuedRuns:
		err = errorf(KindRunQueueFull, "sandbox %s already has %d runs waiting", sandboxID, MaxQueuedRuns)
	default:
		// Idle (nothing queued or running) and synchronous: recorded as it starts, in one commit.
		j.unrecorded = !req.Async && len(lv.jobs) == 0
		if j.unrecorded && req.Context != "" {
			j.cx = &cx
		}
		if !j.unrecorded {
			if err = s.st.CreateRun(ctx, j.run); err != nil {
				err = internal("record run", err)
			}
		}
		if err == nil {
			queued = j.run // the worker owns j.run once it is queued
			lv.queue = append(lv.queue, j)
			lv.jobs[j.run.ID] = j
			select {
			case lv.wake <- struct{}{}:
			default:
			}
		}
	}
	lv.mu.Unlock()
	if err != nil {
		cancel()
		return api.Run{}, false, err
	}
	if req.Async {
		return runView(queued), true, nil
	}
	select {
	case <-j.done:
		if j.err != nil {
			return api.Run{}, false, j.err
		}
		return runView(j.run), false, nil
	case <-ctx.Done():
		return api.Run{}, false, ctx.Err()
	}
}

// next waits for the next queued run; nil once the sandbox is being destroyed.
func (lv *live) next() *job {
	for {
		lv.mu.Lock()
		if lv.closing {
			lv.mu.Unlock()
			return nil
		}
		if len(lv.queue) > 0 {
			j := lv.queue[0]
			lv.queue = lv.queue[1:]
			lv.mu.Unlock()
			return j
		}
		lv.mu.Unlock()
		select {
		case <-lv.wake:
		case <-lv.ctx.Done():
			return nil
		}
	}
}

// execute runs one job and records its outcome.
func (s *Service) execute(lv *live, drv driver.Driver, j *job) {
	ctx := context.Background()
	defer close(j.done)
	defer j.out.finish()
	defer j.cancel()
	start := now()
	j.finalMu.Lock() // j.run is also read by endRuns
	j.run.Status, j.run.StartedAt = RunRunning, &start
	// The run, the sandbox's status and the audit event: one commit.
	started := s.event(store.Event{AccountID: j.run.AccountID, Type: "run.started", SandboxID: lv.id, RunID: j.run.ID, AgentID: lv.rec.AgentID})
	sb := s.statusRecord(lv, store.SandboxRunning)
	var serr error
	if j.unrecorded {
		serr = s.startUnrecorded(ctx, j, sb, &started)
	} else {
		serr = s.st.RecordRun(ctx, j.run, sb, &started)
	}
	if final := errors.Is(serr, store.ErrFinal); final || errors.Is(serr, errNotRecorded) {
		// The code is not run. Final: another replica ended the run, or its sandbox, before it
		// started (it declared this one lost), and the record stays as that replica wrote it.
		// Not recorded: the caller gets the store's error (j.err), as when a queued run's record
		// fails.
		j.final = true
		if final {
			s.closeRun(ctx, lv, &j.run, "before the run started")
			s.log.Warn("run not started: another replica ended its record", "run", j.run.ID)
		}
		j.finalMu.Unlock()
		s.statusRecord(lv, store.SandboxReady) // in memory only: nothing was written
		lv.mu.Lock()
		delete(lv.jobs, j.run.ID)
		lv.mu.Unlock()
		return
	} else if serr != nil {
		s.log.Error("record run start", "run", j.run.ID, "err", serr)
	}
	j.finalMu.Unlock()
	lv.net.start(j.run.ID)

	lv.execMu.Lock()
	var cx store.Context
	var cxEnd *store.Context // the context's record, written with the run's end
	var cerr error
	if j.run.Context != "" {
		cx, cerr = s.contextBefore(lv.id, j)
	}
	var res driver.ExecResult
	var err error
	if cerr == nil && cx.Status == store.ContextDeleted {
		cerr = errorf(KindNotFound, "context %s was deleted before the run started", cx.ID)
	}
	if cerr != nil {
		err = cerr
	} else {
		timeout := time.Duration(j.run.TimeoutSeconds) * time.Second
		res, err = drv.Exec(j.ctx, lv.id, driver.ExecRequest{
			Code: j.run.Code, Timeout: timeout, Env: j.env, MaxOutput: MaxOutputBytes,
			OnOutput: j.out.add, Context: j.run.Context,
			Agent:       driver.AgentInfo{AgentID: lv.rec.AgentID, SandboxID: lv.id, RunID: j.run.ID},
			OnAgentCall: s.newAgentCalls(lv, j.run.ID, timeout).handle,
		})
		if j.run.Context != "" {
			var reset string
			if cxEnd, reset = s.contextAfter(cx, res, err); reset != "" {
				j.run.ContextReset = reset
				res.Stderr = append([]byte(resetNotice(reset)), res.Stderr...)
			}
		}
	}
	lv.execMu.Unlock()
	end := now()
	allowed, denied := s.endNetwork(lv, j.run.ID)
	var ready *store.Sandbox
	if lv.ctx.Err() == nil {
		ready = s.statusRecord(lv, store.SandboxReady)
	}
	j.finalMu.Lock()
	recorded := j.final // DELETE recorded it cancelled while the driver was slow to stop it
	if !recorded {
		s.endRecord(j, res, err, start, end, allowed, denied)
	}
	run := j.run
	finished := s.event(store.Event{AccountID: run.AccountID, Type: "run.finished", SandboxID: lv.id, RunID: run.ID, AgentID: lv.rec.AgentID,
		Detail: obj("status", run.Status, "exit_code", run.ExitCode, "duration_ms", run.DurationMS)})
	if !recorded {
		// The run's end, the sandbox ready again, the audit event and the context's run count and
		// status: one commit.
		if err := s.recordEnd(ctx, run, ready, &finished, cxEnd); errors.Is(err, store.ErrFinal) {
			// Another replica ended it first (it declared this one lost): its record stays. If
			// that replica ended only the sandbox (the run was made after it listed the runs),
			// the run's own end is written without the sandbox's.
			if err := s.st.RecordRun(ctx, run, nil, &finished); err != nil && !errors.Is(err, store.ErrFinal) {
				s.log.Error("record run end", "run", run.ID, "err", err)
			}
			s.log.Warn("run record ended by another replica", "run", run.ID)
		} else if err != nil {
			s.log.Error("record run end", "run", run.ID, "err", err)
		}
	}
	j.finalMu.Unlock()
	if recorded {
		s.writeStatus(lv, ready)
		s.addEvent(ctx, finished)
		s.writeContext(ctx, cxEnd)
	}
	s.cfg.Observer.RunFinished(lv.rec.Mode, run.Status, end.Sub(start))
	lv.mu.Lock()
	delete(lv.jobs, run.ID)
	lv.mu.Unlock()
	if errors.Is(err, driver.ErrNotFound) {
		s.sandboxLost(lv, err)
	}
}

// errNotRecorded: startUnrecorded could not record the run at all (job.err says why).
var errNotRecorded = errors.New("the run could not be recorded")

// startUnrecorded records the start of a run that has no record yet (job.unrecorded): its insert,
// its sandbox's status sb and its event in one commit (store.StartRun). If that commit is refused
// — the sandbox is final (another replica ended it) or the store failed — the run is recorded
// queued, as any other, and its start then written as usual (RecordRun), so the caller's handling
// of a final record or of a failed write is the usual one too. If even the queued record fails,
// it returns errNotRecorded (with j.err set): the code is not run. j.finalMu is held.
func (s *Service) startUnrecorded(ctx context.Context, j *job, sb *store.Sandbox, started *store.Event) error {
	if sb != nil {
		err := s.st.StartRun(ctx, j.run, *sb, started)
		if err == nil {
			j.unrecorded = false
			return nil
		}
		if !errors.Is(err, store.ErrFinal) {
			s.log.Error("record run start", "run", j.run.ID, "err", err)
		}
	}
	queued := j.run
	queued.Status, queued.StartedAt = RunQueued, nil
	if err := s.st.CreateRun(ctx, queued); err != nil {
		j.err = internal("record run", err)
		return errNotRecorded
	}
	j.unrecorded = false
	return s.st.RecordRun(ctx, j.run, sb, started)
}

// recordEnd writes a run's end (store.RecordRun), with its context's record when cx is not nil
// (store.RecordContextRun). If that commit fails for any other reason than ErrFinal — the run or
// the sandbox ended elsewhere, for which the caller writes the run alone — the context is not
// what keeps the run's end from being written: the run's end is written without it, then the
// context.
func (s *Service) recordEnd(ctx context.Context, run store.Run, sb *store.Sandbox, ev *store.Event, cx *store.Context) error {
	if cx == nil {
		return s.st.RecordRun(ctx, run, sb, ev)
	}
	err := s.st.RecordContextRun(ctx, run, sb, ev, *cx)
	if err == nil {
		return nil
	}
	if !errors.Is(err, store.ErrFinal) {
		s.log.Error("record context run end: writing the run and its context apart", "run", run.ID, "err", err)
		err = s.st.RecordRun(ctx, run, sb, ev)
	}
	s.writeContext(ctx, cx)
	return err
}

// writeContext writes the context record cx (nil: nothing), logging a failure.
func (s *Service) writeContext(ctx context.Context, cx *store.Context) {
	if cx == nil {
		return
	}
	if err := s.st.UpdateContext(ctx, *cx); err != nil {
		s.log.Error("record context", "context", cx.ID, "err", err)
	}
}

// sandboxLost ends sandbox lv, which its driver says is gone (it ended by itself: driver.GoneError),
// with destroy reason sandbox_lost and why in its record's error: every later run would fail.
// The sandbox's own goroutine calls it, which destroy waits for: the end runs on its own.
func (s *Service) sandboxLost(lv *live, err error) {
	reason := "the driver no longer knows the sandbox"
	var ge *driver.GoneError
	if errors.As(err, &ge) {
		reason = ge.Reason
	}
	s.log.Warn("the sandbox ended by itself: destroying it", "sandbox", lv.id, "reason", reason)
	lv.mu.Lock()
	if lv.closing {
		lv.mu.Unlock()
		return
	}
	lv.rec.Error = obj("error", ReasonSandboxLost, "message", reason)
	lv.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.destroy(lv, ReasonSandboxLost)
	}()
}

// endRecord fills in the final record of job j from the driver's answer (j.finalMu held).
func (s *Service) endRecord(j *job, res driver.ExecResult, err error, start, end time.Time, allowed, denied int64) {
	j.run.FinishedAt = &end
	j.run.NetworkAllowed, j.run.NetworkDenied = allowed, denied
	var gone *driver.GoneError
	if errors.As(err, &gone) {
		j.run.Status = RunError
		j.run.Error = obj("type", "SandboxLost", "message", "the sandbox ended by itself: "+gone.Reason, "traceback", "")
		j.run.DurationMS = end.Sub(start).Milliseconds()
	} else if err != nil {
		s.log.Error("execute run", "sandbox", j.run.SandboxID, "run", j.run.ID, "err", err)
		j.run.Status = RunError
		j.run.Error = obj("type", "ServiceError", "message", "the sandbox failed to execute the run: "+publicMessage(err), "traceback", "")
		j.run.DurationMS = end.Sub(start).Milliseconds()
	} else {
		exit := res.ExitCode
		j.run.Status, j.run.ExitCode = string(res.Status), &exit
		j.run.Stdout, j.run.Stderr = string(res.Stdout), string(res.Stderr)
		j.run.StdoutTruncated, j.run.StderrTruncated = res.StdoutTruncated, res.StderrTruncated
		j.run.Result = res.Result
		j.run.Display, j.run.OutputsTruncated = res.Display, res.OutputsTruncated
		s.keepRunOutputs(&j.run, res.Outputs)
		if res.Error != nil {
			j.run.Error, _ = json.Marshal(res.Error)
		} else if res.Signal != 0 && res.Status == driver.StatusFailed {
			// The interpreter died without a word (a crash in C code): say how.
			name := unix.SignalName(syscall.Signal(res.Signal))
			j.run.Error = obj("type", "Signal", "message", fmt.Sprintf("the run's Python process was killed by signal %d (%s)", res.Signal, name),
				"traceback", "")
		}
		if !res.Started.IsZero() {
			t := res.Started.UTC().Truncate(time.Millisecond)
			j.run.StartedAt = &t
		}
		j.run.DurationMS = res.Duration.Milliseconds()
		j.run.CPUMS = res.CPU.Milliseconds()
		j.run.MemoryPeakBytes = res.MemoryPeak
	}
	j.final = true
}

// setStatus sets and records the status of a live sandbox, unless it is recorded as ended.
func (s *Service) setStatus(lv *live, status string) {
	s.writeStatus(lv, s.statusRecord(lv, status))
}

// statusRecord sets the status of a live sandbox and returns the record to write, or nil when it
// is recorded as ended (DELETE records before the running run has stopped).
func (s *Service) statusRecord(lv *live, status string) *store.Sandbox {
	lv.mu.Lock()
	defer lv.mu.Unlock()
	if lv.rec.Status == store.SandboxDestroyed || lv.rec.Status == store.SandboxError {
		return nil
	}
	lv.rec.Status = status
	rec := lv.rec
	return &rec
}

// writeStatus writes rec, a record statusRecord returned (nil: nothing to write).
func (s *Service) writeStatus(lv *live, rec *store.Sandbox) {
	if rec == nil {
		return
	}
	if err := s.st.UpdateSandbox(context.Background(), *rec); err != nil {
		s.log.Error("record sandbox status", "sandbox", lv.id, "err", err)
	}
}

// finishCancelled records a run that was cancelled before it started.
func (s *Service) finishCancelled(ctx context.Context, lv *live, j *job) {
	t := now()
	j.run.Status, j.run.FinishedAt = string(driver.StatusCancelled), &t
	if err := s.st.UpdateRun(ctx, j.run); err != nil {
		s.log.Error("record run cancelled", "run", j.run.ID, "err", err)
	}
	s.audit(ctx, store.Event{AccountID: j.run.AccountID, Type: "run.finished", SandboxID: lv.id, RunID: j.run.ID, AgentID: lv.rec.AgentID,
		Detail: obj("status", j.run.Status)})
	lv.mu.Lock()
	delete(lv.jobs, j.run.ID)
	lv.mu.Unlock()
	j.cancel()
	j.out.finish()
	close(j.done)
}

// GetRun returns one run of a sandbox.
func (s *Service) GetRun(ctx context.Context, acct store.Account, sandboxID, runID string) (api.Run, error) {
	if _, err := s.st.GetSandbox(ctx, acct.ID, sandboxID); errors.Is(err, store.ErrNotFound) {
		return api.Run{}, errorf(KindNotFound, "no sandbox %q", sandboxID)
	} else if err != nil {
		return api.Run{}, internal("get sandbox", err)
	}
	r, err := s.st.GetRun(ctx, sandboxID, runID)
	if errors.Is(err, store.ErrNotFound) {
		return api.Run{}, errorf(KindNotFound, "no run %q in sandbox %s", runID, sandboxID)
	} else if err != nil {
		return api.Run{}, internal("get run", err)
	}
	return runView(r), nil
}

// ListRuns returns a page of a sandbox's runs, newest first.
func (s *Service) ListRuns(ctx context.Context, acct store.Account, sandboxID string, page, limit int) (api.RunList, error) {
	if _, err := s.st.GetSandbox(ctx, acct.ID, sandboxID); errors.Is(err, store.ErrNotFound) {
		return api.RunList{}, errorf(KindNotFound, "no sandbox %q", sandboxID)
	} else if err != nil {
		return api.RunList{}, internal("get sandbox", err)
	}
	runs, total, err := s.st.ListRuns(ctx, sandboxID, (page-1)*limit, limit)
	if err != nil {
		return api.RunList{}, internal("list runs", err)
	}
	out := api.RunList{Runs: []api.Run{}, Total: total, Page: page}
	for _, r := range runs {
		out.Runs = append(out.Runs, runView(r))
	}
	return out, nil
}

// CancelRun kills a queued or running run and returns it; a finished run is returned as it is.
func (s *Service) CancelRun(ctx context.Context, acct store.Account, sandboxID, runID string) (api.Run, error) {
	if _, err := s.GetRun(ctx, acct, sandboxID, runID); err != nil {
		return api.Run{}, err
	}
	s.mu.Lock()
	lv := s.live[sandboxID]
	s.mu.Unlock()
	if lv != nil {
		lv.mu.Lock()
		j := lv.jobs[runID]
		queuedAt := -1
		for i, q := range lv.queue {
			if q == j {
				queuedAt = i
			}
		}
		if queuedAt >= 0 {
			lv.queue = append(lv.queue[:queuedAt], lv.queue[queuedAt+1:]...)
		}
		lv.mu.Unlock()
		if j != nil {
			if queuedAt >= 0 {
				s.finishCancelled(ctx, lv, j)
			} else {
				j.cancel()
			}
			select {
			case <-j.done:
			case <-ctx.Done():
				return api.Run{}, ctx.Err()
			}
		}
	}
	return s.GetRun(ctx, acct, sandboxID, runID)
}

// runView is the API's run object.
func runView(r store.Run) api.Run {
	out := api.Run{
		RunID: r.ID, SandboxID: r.SandboxID, Status: r.Status, ExitCode: r.ExitCode, Stdout: r.Stdout, Stderr: r.Stderr,
		StdoutTruncated: r.StdoutTruncated, StderrTruncated: r.StderrTruncated, Result: r.Result, Error: r.Error,
		CreatedAt: r.CreatedAt, StartedAt: r.StartedAt, FinishedAt: r.FinishedAt,
		Usage:   api.RunUsage{CPUMS: r.CPUMS, MemoryPeakBytes: r.MemoryPeakBytes},
		Network: api.RunNetwork{Allowed: r.NetworkAllowed, Denied: r.NetworkDenied},
	}
	if r.FinishedAt != nil {
		d := r.DurationMS
		out.DurationMS = &d
	}
	if out.Result == nil {
		out.Result = json.RawMessage("null")
	}
	out.Display, out.OutputsTruncated = r.Display, r.OutputsTruncated
	out.Outputs = []api.RunOutput{}
	for _, o := range r.Outputs {
		out.Outputs = append(out.Outputs, api.RunOutput(o))
	}
	out.Context = optional(r.Context)
	if r.ContextReset != "" {
		out.ContextReset = &api.ContextReset{Reason: r.ContextReset}
	}
	if out.Error == nil {
		out.Error = json.RawMessage("null")
	}
	return out
}

// closeRun makes sure a run whose start was refused as final (another replica ended its record,
// or its sandbox's, having declared this one lost) has a final record, and sets *r to it: the
// other replica's, or, when that one ended only the sandbox (the run was made after it listed
// the runs), an error written here. A caller waiting on the run gets that record, never a run
// left queued.
func (s *Service) closeRun(ctx context.Context, lv *live, r *store.Run, when string) {
	rec, err := s.st.GetRun(ctx, lv.id, r.ID)
	if err != nil {
		s.log.Error("read run ended elsewhere", "run", r.ID, "err", err)
		return
	}
	if !store.FinalRun(rec.Status) {
		t := now()
		rec.Status, rec.FinishedAt = RunError, &t
		rec.Error = obj("type", "ReplicaLost", "message", "this replica was declared lost and its sandbox ended "+when, "traceback", "")
		ev := s.event(store.Event{AccountID: rec.AccountID, Type: "run.finished", SandboxID: lv.id, RunID: rec.ID, AgentID: lv.rec.AgentID,
			Detail: obj("status", rec.Status, "exit_code", nil, "duration_ms", 0, "reason", ReasonReplicaLost)})
		if err := s.st.RecordRun(ctx, rec, nil, &ev); errors.Is(err, store.ErrFinal) {
			if rec, err = s.st.GetRun(ctx, lv.id, r.ID); err != nil {
				return
			}
		} else if err != nil {
			s.log.Error("record run ended elsewhere", "run", r.ID, "err", err)
			return
		}
	}
	*r = rec
}
