package sandbox_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/postgres"
	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// backend opens a Store value on a database that several replicas share.
type backend func(t *testing.T) store.Store

// backends runs fn for each store implementation, on a new database.
func backends(t *testing.T, fn func(t *testing.T, open backend)) {
	t.Run("sqlite", func(t *testing.T) {
		db := filepath.Join(t.TempDir(), "db")
		fn(t, func(t *testing.T) store.Store {
			st, err := sqlite.Open(context.Background(), db)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			return st
		})
	})
	t.Run("postgres", func(t *testing.T) {
		url := pgtest.Shared(t).NewDatabase(t)
		fn(t, func(t *testing.T) store.Store {
			st, err := postgres.Open(context.Background(), url)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			return st
		})
	})
}

// replicaEnv is a service of replica id on a database shared with other replicas: its own data
// directory, driver and Store value, as a process of its own would have.
func replicaEnv(t *testing.T, open backend, id string, heartbeat, stale time.Duration) (*sandbox.Service, store.Store) {
	t.Helper()
	ctx := context.Background()
	st := open(t)
	svc, err := sandbox.New(ctx, sandbox.Config{
		DataDir: t.TempDir(), Images: []sandbox.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/nonexistent", Default: true}},
		Replica: id, Address: "http://" + id, HeartbeatEvery: heartbeat, StaleAfter: stale,
	}, st, map[string]driver.Driver{"container": fakedriver.New()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(ctx) })
	return svc, st
}

func events(t *testing.T, st store.Store, sandboxID, typ string) []store.Event {
	t.Helper()
	evs, _, err := st.ListEvents(context.Background(), store.EventFilter{SandboxID: sandboxID, Type: typ})
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

// A replica starting leaves the other replicas' sandboxes alone (reconcile used to destroy every
// live record), and its sandboxes record it as their owner.
func TestReconcileLeavesOtherReplicas(t *testing.T) { backends(t, testReconcileLeavesOtherReplicas) }

func testReconcileLeavesOtherReplicas(t *testing.T, db backend) {
	ctx := context.Background()
	a, st := replicaEnv(t, db, "rep_a", time.Second, time.Hour)
	_, acct, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "acme", "pro")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := a.Create(ctx, acct, api.CreateSandboxRequest{AgentID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	replicaEnv(t, db, "rep_b", time.Second, time.Hour)
	rec, err := st.GetSandbox(ctx, "", resp.SandboxID)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != store.SandboxReady || rec.Replica != "rep_a" {
		t.Fatalf("sandbox of rep_a after rep_b started: status %s, replica %q", rec.Status, rec.Replica)
	}
}

// A replica that died (its records stay, its heartbeat stops) has its open runs ended as error
// with a ReplicaLost reason and its live sandboxes destroyed (replica_lost) by another, each with
// one event; its finished runs are left as they are.
func TestSweepEndsLostReplica(t *testing.T) { backends(t, testSweepEndsLostReplica) }

func testSweepEndsLostReplica(t *testing.T, db backend) {
	ctx := context.Background()
	st := db(t)
	_, acct, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	if err := st.RegisterReplica(ctx, "rep_dead", "http://dead"); err != nil {
		t.Fatal(err)
	}
	sb := store.Sandbox{ID: "sbx_1", AccountID: acct.ID, AgentID: "a", Mode: "container", Status: store.SandboxRunning,
		CreatedAt: now, ExpiresAt: now.Add(time.Hour), Replica: "rep_dead"}
	if err := st.CreateSandbox(ctx, sb, -1); err != nil {
		t.Fatal(err)
	}
	for _, r := range []store.Run{
		{ID: "run_running", SandboxID: sb.ID, AccountID: acct.ID, Status: "running", Code: "x", CreatedAt: now},
		{ID: "run_queued", SandboxID: sb.ID, AccountID: acct.ID, Status: "queued", Code: "x", CreatedAt: now},
		{ID: "run_done", SandboxID: sb.ID, AccountID: acct.ID, Status: "completed", Code: "x", CreatedAt: now},
	} {
		if err := st.CreateRun(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	_, st2 := replicaEnv(t, db, "rep_b", 20*time.Millisecond, 200*time.Millisecond)
	// The sandbox's record, then its event: done once both are written.
	waitfor.True(t, time.Minute, func() bool { return len(events(t, st2, sb.ID, "sandbox.destroyed")) > 0 })
	rec, _ := st2.GetSandbox(ctx, "", sb.ID)
	if rec.DestroyReason != sandbox.ReasonReplicaLost {
		t.Fatalf("destroy reason %q", rec.DestroyReason)
	}
	for id, want := range map[string]string{"run_running": "error", "run_queued": "error", "run_done": "completed"} {
		r, err := st2.GetRun(ctx, sb.ID, id)
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != want || (want == "error" && (r.FinishedAt == nil || !strings.Contains(string(r.Error), "replica rep_dead stopped heartbeating while the run ran"))) {
			t.Fatalf("run %s: status %s, error %s", id, r.Status, r.Error)
		}
		var e struct{ Type string }
		if want == "error" && (json.Unmarshal(r.Error, &e) != nil || e.Type != "ReplicaLost") {
			t.Fatalf("run %s: error %s", id, r.Error)
		}
	}
	if n := len(events(t, st2, sb.ID, "sandbox.destroyed")); n != 1 {
		t.Fatalf("%d sandbox.destroyed events, want 1", n)
	}
	if n := len(events(t, st2, sb.ID, "run.finished")); n != 2 {
		t.Fatalf("%d run.finished events, want 2 (the runs it ended)", n)
	}
	reps, err := st2.Replicas(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range reps {
		if (r.ID == "rep_dead") != (r.LostAt != nil) {
			t.Fatalf("replica %s lost at %v", r.ID, r.LostAt)
		}
	}
}

// A replica declared lost while it was only slow (here: it heartbeats less often than the other
// replica's staleness threshold) comes back: it must not resurrect its sandbox or finish its run
// a second time. It destroys what it ran and registers again.
func TestLostReplicaComesBack(t *testing.T) { backends(t, testLostReplicaComesBack) }

func testLostReplicaComesBack(t *testing.T, db backend) {
	ctx := context.Background()
	a, st := replicaEnv(t, db, "rep_slow", 400*time.Millisecond, time.Hour)
	_, acct, _, err := sandbox.CreateKey(ctx, st, sandbox.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := a.Create(ctx, acct, api.CreateSandboxRequest{AgentID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	code := "block"
	r, _, err := a.Run(ctx, acct, resp.SandboxID, api.RunRequest{Code: &code, Async: true})
	if err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, time.Minute, func() bool {
		got, err := st.GetRun(ctx, resp.SandboxID, r.RunID)
		return err == nil && got.Status == "running"
	})
	replicaEnv(t, db, "rep_b", 20*time.Millisecond, 100*time.Millisecond)
	waitfor.True(t, time.Minute, func() bool { return a.LiveCount() == 0 })

	// Whoever ended the run first — the sweeper (error, ReplicaLost) or the replica itself when
	// its heartbeat was refused (cancelled, as any destroy) — its record and its one event stay.
	waitfor.True(t, time.Minute, func() bool {
		return len(events(t, st, resp.SandboxID, "sandbox.destroyed")) > 0 && len(events(t, st, resp.SandboxID, "run.finished")) > 0
	})
	got, err := st.GetRun(ctx, resp.SandboxID, r.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if !(got.Status == "error" && strings.Contains(string(got.Error), "ReplicaLost")) && got.Status != "cancelled" {
		t.Fatalf("run after its replica came back: %s %s (want the sweeper's error or the replica's cancel)", got.Status, got.Error)
	}
	rec, err := st.GetSandbox(ctx, "", resp.SandboxID)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != store.SandboxDestroyed || rec.DestroyReason != sandbox.ReasonReplicaLost {
		t.Fatalf("sandbox after its replica came back: %s %s", rec.Status, rec.DestroyReason)
	}
	if n := len(events(t, st, rec.ID, "sandbox.destroyed")); n != 1 {
		t.Fatalf("%d sandbox.destroyed events, want 1", n)
	}
	if n := len(events(t, st, rec.ID, "run.finished")); n != 1 {
		t.Fatalf("%d run.finished events, want 1", n)
	}
	// It registers again and works: a new sandbox is its own, and live. Until it has registered,
	// a create is refused as unavailable (a client retries after Retry-After).
	var resp2 api.CreateSandboxResponse
	waitfor.True(t, time.Minute, func() bool {
		resp2, err = a.Create(ctx, acct, api.CreateSandboxRequest{AgentID: "a"})
		if err != nil && sandbox.KindOf(err) != sandbox.KindUnavailable {
			t.Fatal(err)
		}
		return err == nil
	})
	if rec, err := st.GetSandbox(ctx, "", resp2.SandboxID); err != nil || rec.Replica != "rep_slow" {
		t.Fatalf("new sandbox: %+v %v", rec, err)
	}
}

// A queued run that another replica ended (it declared this one lost) is not run when its turn
// comes: its code never reaches the driver, and its record stays the other replica's.
func TestEndedQueuedRunNotStarted(t *testing.T) {
	e := newEnv(t, "pro")
	ctx := context.Background()
	id := e.create(t, nil)
	first := e.run(t, id, "block", true)
	e.waitExec(t, 1)
	queued := e.run(t, id, "print(2)", true)
	r, err := e.st.GetRun(ctx, id, queued.RunID)
	if err != nil {
		t.Fatal(err)
	}
	r.Status, r.Error = "error", json.RawMessage(`{"type":"ReplicaLost","message":"replica rep_x stopped heartbeating while the run ran","traceback":""}`)
	if err := e.st.UpdateRun(ctx, r); err != nil {
		t.Fatal(err)
	}
	last := e.run(t, id, "print(3)", true)
	if _, err := e.svc.CancelRun(ctx, e.acct, id, first.RunID); err != nil {
		t.Fatal(err)
	}
	waitfor.True(t, time.Minute, func() bool {
		got, err := e.st.GetRun(ctx, id, last.RunID)
		return err == nil && got.Status == "completed"
	})
	if n := e.drv.Ended(); n != 2 {
		t.Fatalf("the driver ran %d runs, want 2 (the ended one not run)", n)
	}
	got, err := e.st.GetRun(ctx, id, queued.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != "error" || got.StartedAt != nil || !strings.Contains(string(got.Error), "ReplicaLost") {
		t.Fatalf("ended queued run: %+v", got)
	}
}

// outageStore is a replica's Store while the database may be out of reach for every replica:
// heartbeats and the sweep's lock fail while down is set.
type outageStore struct {
	store.Store
	down *atomic.Bool
}

func (o outageStore) Heartbeat(ctx context.Context, id string) error {
	if o.down.Load() {
		return store.ErrUnavailable
	}
	return o.Store.Heartbeat(ctx, id)
}

func (o outageStore) TryLock(ctx context.Context, name string) (store.Lock, error) {
	if o.down.Load() {
		return nil, store.ErrUnavailable
	}
	return o.Store.TryLock(ctx, name)
}

// TestDatabaseOutage: the database out of reach for every replica for longer than the staleness
// threshold leaves every heartbeat stale; the first replica back must not declare the others
// lost (they would destroy their sandboxes) but give them the threshold to heartbeat again.
func TestDatabaseOutage(t *testing.T) { backends(t, testDatabaseOutage) }

func testDatabaseOutage(t *testing.T, db backend) {
	ctx := context.Background()
	const beat, stale = 20 * time.Millisecond, 300 * time.Millisecond
	var down atomic.Bool
	var svcs []*sandbox.Service
	var sts []store.Store
	for _, id := range []string{"rep_a", "rep_b"} {
		st := outageStore{Store: db(t), down: &down}
		svc, err := sandbox.New(ctx, sandbox.Config{
			DataDir: t.TempDir(), Images: []sandbox.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/nonexistent", Default: true}},
			Replica: id, Address: "http://" + id, HeartbeatEvery: beat, StaleAfter: stale,
		}, st, map[string]driver.Driver{"container": fakedriver.New()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { svc.Close(ctx) })
		svcs, sts = append(svcs, svc), append(sts, st)
	}
	_, acct, _, err := sandbox.CreateKey(ctx, sts[1], sandbox.DefaultPlans(), "acme", "pro")
	if err != nil {
		t.Fatal(err)
	}
	created, err := svcs[1].Create(ctx, acct, api.CreateSandboxRequest{AgentID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	down.Store(true)
	outage := time.Now()
	waitfor.True(t, time.Minute, func() bool { return time.Since(outage) > 3*stale })
	down.Store(false)
	back := time.Now()
	waitfor.True(t, time.Minute, func() bool { return time.Since(back) > 3*stale })
	reps, err := sts[0].Replicas(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range reps {
		if r.LostAt != nil {
			t.Errorf("replica %s declared lost after an outage of the database for all", r.ID)
		}
	}
	if rec, err := sts[0].GetSandbox(ctx, "", created.SandboxID); err != nil || rec.Status == store.SandboxDestroyed {
		t.Fatalf("rep_b's sandbox after the outage: %+v %v", rec, err)
	}
}
