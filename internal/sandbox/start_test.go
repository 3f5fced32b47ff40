package sandbox_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
)

// A synchronous run that finds its sandbox idle is recorded as it starts (store.StartRun): while
// it runs, its record is there, running, with its event; a run made meanwhile is recorded queued
// as before; both end with one record each.
func TestSyncRunRecordedAsItStarts(t *testing.T) {
	e := newEnv(t, "pro")
	ctx := context.Background()
	if err := e.svc.Close(ctx); err != nil {
		t.Fatal(err)
	}
	calls := &runCalls{Store: e.st}
	e.st = calls
	e.svc = e.open(t)
	id := e.create(t, nil)
	done := make(chan api.Run, 1)
	go func() {
		code := "sleep:300"
		r, _, err := e.svc.Run(ctx, e.acct, id, api.RunRequest{Code: &code})
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	e.waitExec(t, 1)
	runs, _, err := e.st.ListRuns(ctx, id, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 1 || runs[0].Status != sandbox.RunRunning || runs[0].StartedAt == nil {
		t.Fatalf("runs while the first runs: %+v", runs)
	}
	if evs := events(t, e.st, id, "run.started"); len(evs) != 1 || evs[0].RunID != runs[0].ID {
		t.Fatalf("run.started events: %+v", evs)
	}
	queued := e.run(t, id, "print(2)", true)
	if got, err := e.st.GetRun(ctx, id, queued.RunID); err != nil || got.Status != sandbox.RunQueued {
		t.Fatalf("the run made meanwhile: %+v %v", got, err)
	}
	first := <-done
	if first.RunID != runs[0].ID || first.Status != "completed" {
		t.Fatalf("first run: %+v", first)
	}
	e.waitFinishedEvents(t, id, 2)
	runs, _, err = e.st.ListRuns(ctx, id, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 2 || runs[0].Status != "completed" || runs[1].Status != "completed" {
		t.Fatalf("runs at the end: %+v", runs)
	}
	// The idle synchronous run: one commit at its start; the one made meanwhile: inserted queued.
	if s, c := calls.start.Load(), calls.create.Load(); s != 1 || c != 1 {
		t.Fatalf("StartRun %d, CreateRun %d calls; want 1 and 1", s, c)
	}
}

// runCalls is a Store that counts how runs are first recorded.
type runCalls struct {
	store.Store
	start, create atomic.Int32
}

func (c *runCalls) StartRun(ctx context.Context, r store.Run, sb store.Sandbox, ev *store.Event) error {
	c.start.Add(1)
	return c.Store.StartRun(ctx, r, sb, ev)
}

func (c *runCalls) CreateRun(ctx context.Context, r store.Run) error {
	c.create.Add(1)
	return c.Store.CreateRun(ctx, r)
}

// A synchronous run whose sandbox another replica ended (having declared this one lost) before
// it started is not run; the caller gets its record, ended with ReplicaLost.
func TestUnrecordedRunOfEndedSandbox(t *testing.T) {
	e := newEnv(t, "pro")
	ctx := context.Background()
	id := e.create(t, nil)
	rec, err := e.st.GetSandbox(ctx, "", id)
	if err != nil {
		t.Fatal(err)
	}
	end := time.Now().UTC()
	rec.Status, rec.DestroyedAt, rec.DestroyReason = store.SandboxDestroyed, &end, sandbox.ReasonReplicaLost
	if err := e.st.UpdateSandbox(ctx, rec); err != nil {
		t.Fatal(err)
	}
	r := e.run(t, id, "print(1)", false)
	if r.Status != sandbox.RunError || !strings.Contains(string(r.Error), "ReplicaLost") {
		t.Fatalf("run: %s %s", r.Status, r.Error)
	}
	if got, err := e.st.GetRun(ctx, id, r.RunID); err != nil || got.Status != sandbox.RunError {
		t.Fatalf("its record: %+v %v", got, err)
	}
	if n := e.drv.Ended(); n != 0 {
		t.Fatalf("%d runs reached the driver, want 0", n)
	}
}

// failingRuns is a Store that cannot record new runs while down is set.
type failingRuns struct {
	store.Store
	down *atomic.Bool
}

var errDown = errors.New("database down")

func (f failingRuns) StartRun(ctx context.Context, r store.Run, sb store.Sandbox, ev *store.Event) error {
	if f.down.Load() {
		return errDown
	}
	return f.Store.StartRun(ctx, r, sb, ev)
}

func (f failingRuns) CreateRun(ctx context.Context, r store.Run) error {
	if f.down.Load() {
		return errDown
	}
	return f.Store.CreateRun(ctx, r)
}

// A synchronous run that cannot be recorded is not run: its caller gets an internal error, as when
// a queued run's record fails, and the sandbox serves the next run.
func TestUnrecordedRunNotRecorded(t *testing.T) {
	e := newEnv(t, "pro")
	ctx := context.Background()
	if err := e.svc.Close(ctx); err != nil {
		t.Fatal(err)
	}
	var down atomic.Bool
	e.st = failingRuns{Store: e.st, down: &down}
	e.svc = e.open(t)
	id := e.create(t, nil)
	down.Store(true)
	code := "print(1)"
	if _, _, err := e.svc.Run(ctx, e.acct, id, api.RunRequest{Code: &code}); sandbox.KindOf(err) != sandbox.KindInternal || !errors.Is(err, errDown) {
		t.Fatalf("run that cannot be recorded: %v, want an internal error wrapping the store's", err)
	}
	if n := e.drv.Ended(); n != 0 {
		t.Fatalf("%d runs reached the driver, want 0", n)
	}
	down.Store(false)
	if r := e.run(t, id, "print(1)", false); r.Status != "completed" {
		t.Fatalf("next run: %+v", r)
	}
	if rec, err := e.st.GetSandbox(ctx, "", id); err != nil || rec.Status != store.SandboxReady {
		t.Fatalf("sandbox after: %+v %v", rec, err)
	}
}
