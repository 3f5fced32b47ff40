package storetest

import (
	"errors"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// testContexts: contexts round-trip, the per-sandbox limit counts only contexts not deleted,
// EndContexts ends them all, and runs keep the context they ran in.
func testContexts(t *testing.T, st store.Store) {
	ctx := t.Context()
	a := account(t, st, "acct_ctx")
	sb := createSandbox(t, st, sandbox("sbx_ctx", a.ID, at(0), store.SandboxReady))
	other := createSandbox(t, st, sandbox("sbx_ctx2", a.ID, at(0), store.SandboxReady))
	mk := func(id, sandboxID string, i int) store.Context {
		return store.Context{ID: id, SandboxID: sandboxID, AccountID: a.ID, Status: store.ContextReady, CreatedAt: at(secs(i))}
	}
	steps := []struct {
		name  string
		c     store.Context
		limit int
		want  error
	}{
		{"first", mk("ctx_1", sb.ID, 1), 2, nil},
		{"second", mk("ctx_2", sb.ID, 2), 2, nil},
		{"over the limit", mk("ctx_3", sb.ID, 3), 2, store.ErrQuota},
		{"other sandbox has its own limit", mk("ctx_4", other.ID, 4), 2, nil},
		{"duplicate", mk("ctx_1", other.ID, 5), -1, store.ErrConflict},
	}
	for _, s := range steps {
		err := st.CreateContext(ctx, s.c, s.limit)
		if s.want == nil {
			ok(t, err)
		} else {
			wantErr(t, s.name, err, s.want)
		}
	}
	got, err := st.GetContext(ctx, sb.ID, "ctx_1")
	ok(t, err)
	same(t, "context", canonContext(got, false), canonContext(mk("ctx_1", sb.ID, 1), true))
	if _, err := st.GetContext(ctx, other.ID, "ctx_1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("context of another sandbox: %v, want ErrNotFound", err)
	}
	// Update: reset, then deleted frees a place under the limit.
	got.Status, got.ResetReason, got.Runs = store.ContextReset, "the interpreter exited", 3
	ok(t, st.UpdateContext(ctx, got))
	again, err := st.GetContext(ctx, sb.ID, "ctx_1")
	ok(t, err)
	same(t, "updated context", canonContext(again, false), canonContext(got, true))
	wantErr(t, "update of a missing context", st.UpdateContext(ctx, mk("ctx_none", sb.ID, 0)), store.ErrNotFound)
	got.Status, got.DeletedAt = store.ContextDeleted, ptr(at(secs(9)))
	ok(t, st.UpdateContext(ctx, got))
	ok(t, st.CreateContext(ctx, mk("ctx_3", sb.ID, 3), 2))
	list, err := st.ListContexts(ctx, sb.ID)
	ok(t, err)
	var ids []string
	for _, c := range list {
		ids = append(ids, c.ID)
	}
	same(t, "list", ids, []string{"ctx_1", "ctx_2", "ctx_3"})
	n, err := st.EndContexts(ctx, sb.ID, "sandbox destroyed", at(secs(10)))
	ok(t, err)
	if n != 2 {
		t.Errorf("EndContexts changed %d, want 2", n)
	}
	list, err = st.ListContexts(ctx, sb.ID)
	ok(t, err)
	for _, c := range list {
		if c.Status != store.ContextDeleted || c.DeletedAt == nil {
			t.Errorf("%s after EndContexts: %s %v", c.ID, c.Status, c.DeletedAt)
		}
	}
	// A deleted record is final: a run that ends after its sandbox's contexts were ended writes
	// its ready copy in vain (no error), and a missing one is still ErrNotFound.
	stale := mk("ctx_2", sb.ID, 2)
	stale.Runs = 5
	ok(t, st.UpdateContext(ctx, stale))
	after, err := st.GetContext(ctx, sb.ID, "ctx_2")
	ok(t, err)
	if after.Status != store.ContextDeleted || after.DeletedAt == nil || after.Runs == 5 || after.ResetReason != "sandbox destroyed" {
		t.Errorf("deleted context after an update: %+v", after)
	}
	// A run keeps its context and the reset it reported.
	r := run("run_ctx", sb.ID, a.ID, at(0), "queued")
	r.Context = "ctx_2"
	ok(t, st.CreateRun(ctx, r))
	r.ContextReset = "the interpreter exited with status 7"
	ok(t, st.UpdateRun(ctx, r))
	gr, err := st.GetRun(ctx, sb.ID, r.ID)
	ok(t, err)
	if gr.Context != "ctx_2" || gr.ContextReset != r.ContextReset {
		t.Errorf("run context %q reset %q", gr.Context, gr.ContextReset)
	}
	if gr.Display != nil || gr.Outputs != nil || gr.OutputsTruncated {
		t.Errorf("run without rich results: display %v outputs %v truncated %v", gr.Display, gr.Outputs, gr.OutputsTruncated)
	}
	// And its rich results.
	d := "   a\n0  1"
	r.Display, r.OutputsTruncated = &d, true
	r.Outputs = []store.RunOutput{{Type: "image/png", Kind: "figure", Path: "/.outputs/run_ctx/0.png", Size: 10}}
	ok(t, st.UpdateRun(ctx, r))
	gr, err = st.GetRun(ctx, sb.ID, r.ID)
	ok(t, err)
	if gr.Display == nil || *gr.Display != d || !gr.OutputsTruncated || len(gr.Outputs) != 1 || gr.Outputs[0] != r.Outputs[0] {
		t.Errorf("run rich results: display %v outputs %+v truncated %v", gr.Display, gr.Outputs, gr.OutputsTruncated)
	}
}

func canonContext(c store.Context, want bool) store.Context {
	c.CreatedAt = canonTime(c.CreatedAt, want)
	c.DeletedAt = canonPtime(c.DeletedAt, want)
	return c
}

func secs(i int) time.Duration { return time.Duration(i) * time.Second }

// testRecordContextRun: a context run's end and its context's record in one commit; nothing
// written when a part fails; a deleted context left as it is while the run's end is written.
func testRecordContextRun(t *testing.T, st store.Store) {
	ctx := t.Context()
	a := account(t, st, "acct_crr")
	sb := createSandbox(t, st, sandbox("sbx_crr", a.ID, at(0), store.SandboxRunning))
	mkCtx := func(id string) store.Context {
		c := store.Context{ID: id, SandboxID: sb.ID, AccountID: a.ID, Status: store.ContextReady, CreatedAt: at(0)}
		ok(t, st.CreateContext(ctx, c, -1))
		return c
	}
	live, gone := mkCtx("ctx_crr_live"), mkCtx("ctx_crr_gone")
	gone.Status, gone.DeletedAt = store.ContextDeleted, ptr(at(secs(1)))
	ok(t, st.UpdateContext(ctx, gone))
	mkRun := func(id, status string) store.Run {
		r := run(id, sb.ID, a.ID, at(0), status)
		r.Context = live.ID
		ok(t, st.CreateRun(ctx, r))
		return r
	}
	ended := func(r store.Run, status string) store.Run {
		r.Status, r.FinishedAt = status, ptr(at(secs(2)))
		return r
	}
	ready := sb
	ready.Status = store.SandboxReady
	runs := func(c store.Context, n int, status, reason string) store.Context {
		c.Runs, c.Status, c.ResetReason = n, status, reason
		return c
	}
	final := mkRun("run_crr_final", "queued")
	ok(t, st.UpdateRun(ctx, ended(final, "completed")))
	tests := []struct {
		name       string
		run        store.Run
		c          store.Context
		wantErr    error
		wantRun    string
		wantCtx    store.Context // the context's record after the call
		wantGoneOK bool          // the deleted context still deleted
	}{
		{"run and context", ended(mkRun("run_crr_1", "running"), "completed"), runs(live, 1, store.ContextReady, ""), nil,
			"completed", runs(live, 1, store.ContextReady, ""), true},
		{"a reset", ended(mkRun("run_crr_2", "running"), "failed"), runs(live, 2, store.ContextReset, "the interpreter exited"), nil,
			"failed", runs(live, 2, store.ContextReset, "the interpreter exited"), true},
		{"final run: nothing written", ended(final, "error"), runs(live, 9, store.ContextReady, ""), store.ErrFinal,
			"completed", runs(live, 2, store.ContextReset, "the interpreter exited"), true},
		{"missing context: nothing written", ended(mkRun("run_crr_3", "running"), "completed"),
			store.Context{ID: "ctx_crr_none", SandboxID: sb.ID, AccountID: a.ID, Status: store.ContextReady, Runs: 1}, store.ErrNotFound,
			"running", runs(live, 2, store.ContextReset, "the interpreter exited"), true},
		{"deleted context left as it is", ended(mkRun("run_crr_4", "running"), "completed"), runs(gone, 7, store.ContextReady, ""), nil,
			"completed", runs(live, 2, store.ContextReset, "the interpreter exited"), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := st.RecordContextRun(ctx, tc.run, &ready, nil, tc.c)
			if tc.wantErr == nil {
				ok(t, err)
			} else {
				wantErr(t, "RecordContextRun", err, tc.wantErr)
			}
			gr, err := st.GetRun(ctx, sb.ID, tc.run.ID)
			ok(t, err)
			if gr.Status != tc.wantRun {
				t.Errorf("run %s: %s, want %s", tc.run.ID, gr.Status, tc.wantRun)
			}
			gc, err := st.GetContext(ctx, sb.ID, live.ID)
			ok(t, err)
			if gc.Runs != tc.wantCtx.Runs || gc.Status != tc.wantCtx.Status || gc.ResetReason != tc.wantCtx.ResetReason {
				t.Errorf("context: runs %d %s %q, want %d %s %q", gc.Runs, gc.Status, gc.ResetReason,
					tc.wantCtx.Runs, tc.wantCtx.Status, tc.wantCtx.ResetReason)
			}
			gg, err := st.GetContext(ctx, sb.ID, gone.ID)
			ok(t, err)
			if gg.Status != store.ContextDeleted || gg.Runs != 0 {
				t.Errorf("deleted context after the call: %s runs %d", gg.Status, gg.Runs)
			}
		})
	}
}
