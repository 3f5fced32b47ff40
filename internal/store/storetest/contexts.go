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
