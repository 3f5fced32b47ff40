package storetest

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// RunShared runs the cases about several API replicas on one database: open must return two
// Store values (as two processes would open them) on one new, empty database, and arrange for
// both to be closed when t ends.
func RunShared(t *testing.T, open func(t *testing.T) (store.Store, store.Store)) {
	tests := []struct {
		name string
		fn   func(t *testing.T, a, b store.Store)
	}{
		{"QuotaAcrossStores", testQuotaAcross},
		{"FinishAcrossStores", testFinishRace},
		{"LockAcrossStores", testLockAcross},
		{"ReplicasAcrossStores", testReplicasAcross},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := open(t)
			tc.fn(t, a, b)
		})
	}
}

func testReplicas(t *testing.T, st store.Store) {
	ok(t, st.RegisterReplica(ctx, "rep_a", "http://127.0.0.1:1"))
	ok(t, st.RegisterReplica(ctx, "rep_b", "http://127.0.0.1:2"))
	reps, err := st.Replicas(ctx)
	ok(t, err)
	if len(reps) != 2 || reps[0].ID != "rep_a" || reps[1].ID != "rep_b" || reps[1].Address != "http://127.0.0.1:2" {
		t.Fatalf("replicas %s", show(reps))
	}
	for _, r := range reps {
		if r.LostAt != nil || r.HeartbeatAt.IsZero() || r.StartedAt.IsZero() || r.HeartbeatAt.Location() != time.UTC {
			t.Fatalf("new replica %s", show(r))
		}
	}
	stale, err := st.MarkStaleReplicas(ctx, time.Hour)
	ok(t, err)
	if len(stale) != 0 {
		t.Fatalf("fresh replicas declared stale: %s", show(stale))
	}
	ok(t, st.Heartbeat(ctx, "rep_a"))
	wantErr(t, "heartbeat of an unknown replica", st.Heartbeat(ctx, "rep_missing"), store.ErrReplicaLost)

	stale, err = st.MarkStaleReplicas(ctx, 0)
	ok(t, err)
	if len(stale) != 2 || stale[0].LostAt == nil {
		t.Fatalf("stale replicas %s, want both, lost", show(stale))
	}
	wantErr(t, "heartbeat of a lost replica", st.Heartbeat(ctx, "rep_a"), store.ErrReplicaLost)
	stale, err = st.MarkStaleReplicas(ctx, 0)
	ok(t, err)
	if len(stale) != 0 {
		t.Fatalf("lost replicas declared lost again: %s", show(stale))
	}

	// A lost replica that starts again is alive again.
	ok(t, st.RegisterReplica(ctx, "rep_a", "http://127.0.0.1:3"))
	ok(t, st.Heartbeat(ctx, "rep_a"))
	reps, err = st.Replicas(ctx)
	ok(t, err)
	lost := map[string]bool{}
	for _, r := range reps {
		lost[r.ID] = r.LostAt != nil
	}
	same(t, "lost replicas", lost, map[string]bool{"rep_a": false, "rep_b": true})
}

func testLocks(t *testing.T, st store.Store) { testLockAcross(t, st, st) }

// testLockAcross: a lock taken through a is not to be had through b until released.
func testLockAcross(t *testing.T, a, b store.Store) {
	l, err := a.TryLock(ctx, "reaper")
	ok(t, err)
	if l == nil {
		t.Fatal("a free lock was not taken")
	}
	again, err := b.TryLock(ctx, "reaper")
	ok(t, err)
	if again != nil {
		t.Fatal("a held lock was taken a second time")
	}
	other, err := b.TryLock(ctx, "other")
	ok(t, err)
	if other == nil {
		t.Fatal("a lock of another name was not taken")
	}
	other.Release()
	l.Release()
	l.Release() // idempotent
	l2, err := b.TryLock(ctx, "reaper")
	ok(t, err)
	if l2 == nil {
		t.Fatal("a released lock was not taken again")
	}
	l2.Release()
}

// testQuotaAcross races creates through two Store values: exactly limit succeed.
func testQuotaAcross(t *testing.T, s1, s2 store.Store) {
	const rounds, workers, limit = 3, 50, 3
	for round := range rounds {
		a := account(t, s1, fmt.Sprintf("acct_%d", round))
		start := make(chan struct{})
		errs := make([]error, workers)
		var wg sync.WaitGroup
		for i := range workers {
			st := s1
			if i%2 == 1 {
				st = s2
			}
			wg.Go(func() {
				<-start
				errs[i] = st.CreateSandbox(ctx, sandbox(fmt.Sprintf("sbx_%d_%02d", round, i), a.ID, base, store.SandboxProvisioning), limit)
			})
		}
		close(start)
		wg.Wait()
		created := 0
		for i, err := range errs {
			switch {
			case err == nil:
				created++
			case errors.Is(err, store.ErrQuota):
			default:
				t.Errorf("round %d, create %d: %v (want nil or ErrQuota)", round, i, err)
			}
		}
		_, n, err := s2.ListSandboxes(ctx, store.SandboxFilter{AccountID: a.ID})
		ok(t, err)
		if created != limit || n != limit {
			t.Fatalf("round %d: %d creates succeeded, %d recorded; want %d", round, created, n, limit)
		}
	}
}

// testFinishRace ends one running run from two writers at once (the replica running it, and one
// recovering a lost replica's runs): exactly one final record and one event, the first's.
func testFinishRace(t *testing.T, s1, s2 store.Store) {
	a := account(t, s1, "acct_a")
	sb := createSandbox(t, s1, sandbox("sbx_1", a.ID, base, store.SandboxRunning))
	for round := range 10 {
		r := run(fmt.Sprintf("run_%d", round), sb.ID, a.ID, base, "running")
		ok(t, s1.CreateRun(ctx, r))
		start := make(chan struct{})
		var errs [2]error
		var wg sync.WaitGroup
		for i, st := range []store.Store{s1, s2} {
			wg.Go(func() {
				<-start
				x := r
				x.Status, x.Stdout = []string{"completed", "error"}[i], fmt.Sprintf("finisher %d", i)
				x.FinishedAt = ptr(at(time.Second))
				ev := store.Event{ID: fmt.Sprintf("evt_%d_%d", round, i), AccountID: a.ID, Type: "run.finished", At: base, SandboxID: sb.ID, RunID: r.ID}
				errs[i] = st.RecordRun(ctx, x, nil, &ev)
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil && winner < 0:
				winner = i
			case errors.Is(err, store.ErrFinal):
			default:
				t.Fatalf("round %d, finisher %d: %v (want one nil and one ErrFinal)", round, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: no finisher won: %v", round, errs)
		}
		got, err := s2.GetRun(ctx, sb.ID, r.ID)
		ok(t, err)
		if want := fmt.Sprintf("finisher %d", winner); got.Stdout != want {
			t.Fatalf("round %d: run holds %q, want the winner's %q", round, got.Stdout, want)
		}
		evs, _, err := s1.ListEvents(ctx, store.EventFilter{AccountID: a.ID, Type: "run.finished"})
		ok(t, err)
		n := 0
		for _, e := range evs {
			if e.RunID == r.ID {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("round %d: %d run.finished events, want 1", round, n)
		}
	}
}

// testReplicasAcross: what one Store declares, the other sees.
func testReplicasAcross(t *testing.T, s1, s2 store.Store) {
	ok(t, s1.RegisterReplica(ctx, "rep_a", "http://a"))
	ok(t, s2.RegisterReplica(ctx, "rep_b", "http://b"))
	ok(t, s2.Heartbeat(ctx, "rep_a"))
	stale, err := s2.MarkStaleReplicas(ctx, 0)
	ok(t, err)
	if len(stale) != 2 {
		t.Fatalf("stale %s", show(stale))
	}
	wantErr(t, "heartbeat of a lost replica through the other store", s1.Heartbeat(ctx, "rep_a"), store.ErrReplicaLost)
}

// testHostileBytes: what sandbox code prints (and a caller sends as code) is bytes, NUL and
// invalid UTF-8 included; the run's record keeps them rather than failing to be written.
func testHostileBytes(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	const hostile = "a\x00b\xff\xfe\xc3(\u2028z"
	r := run("run_1", sb.ID, a.ID, base, "queued")
	r.Code = "print(" + hostile + ")"
	ok(t, st.CreateRun(ctx, r))
	r.Status, r.Stdout, r.Stderr, r.Display = "completed", hostile, hostile+hostile, ptr(hostile)
	ok(t, st.UpdateRun(ctx, r))
	got, err := st.GetRun(ctx, sb.ID, r.ID)
	ok(t, err)
	same(t, "run with hostile bytes", canonRun(got, false), canonRun(r, true))
}
