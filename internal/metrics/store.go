package metrics

import (
	"context"
	"encoding/json"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// Store returns st with every call timed into sandboxd_store_seconds.
func (m *Metrics) Store(st store.Store) store.Store { return &timedStore{st: st, m: m} }

type timedStore struct {
	st store.Store
	m  *Metrics
}

func (t *timedStore) observe(op string, start time.Time, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	t.m.store.WithLabelValues(op, result).Observe(time.Since(start).Seconds())
}

// timed runs f and observes it as op.
func timed[T any](t *timedStore, op string, f func() (T, error)) (T, error) {
	start := time.Now()
	v, err := f()
	t.observe(op, start, err)
	return v, err
}

func (t *timedStore) exec(op string, f func() error) error {
	start := time.Now()
	err := f()
	t.observe(op, start, err)
	return err
}

func (t *timedStore) CreateAccount(ctx context.Context, a store.Account) error {
	return t.exec("create_account", func() error { return t.st.CreateAccount(ctx, a) })
}

func (t *timedStore) AccountByName(ctx context.Context, name string) (store.Account, error) {
	return timed(t, "account_by_name", func() (store.Account, error) { return t.st.AccountByName(ctx, name) })
}

func (t *timedStore) AddKey(ctx context.Context, accountID, keyID string, keyHash []byte, at time.Time) error {
	return t.exec("add_key", func() error { return t.st.AddKey(ctx, accountID, keyID, keyHash, at) })
}

func (t *timedStore) AccountByKeyHash(ctx context.Context, keyHash []byte) (store.Account, error) {
	return timed(t, "account_by_key", func() (store.Account, error) { return t.st.AccountByKeyHash(ctx, keyHash) })
}

func (t *timedStore) CreateSandbox(ctx context.Context, sb store.Sandbox, limit int) error {
	return t.exec("create_sandbox", func() error { return t.st.CreateSandbox(ctx, sb, limit) })
}

func (t *timedStore) UpdateSandbox(ctx context.Context, sb store.Sandbox) error {
	return t.exec("update_sandbox", func() error { return t.st.UpdateSandbox(ctx, sb) })
}

func (t *timedStore) GetSandbox(ctx context.Context, accountID, id string) (store.Sandbox, error) {
	return timed(t, "get_sandbox", func() (store.Sandbox, error) { return t.st.GetSandbox(ctx, accountID, id) })
}

func (t *timedStore) ListSandboxes(ctx context.Context, f store.SandboxFilter) ([]store.Sandbox, int, error) {
	var n int
	l, err := timed(t, "list_sandboxes", func() (l []store.Sandbox, err error) { l, n, err = t.st.ListSandboxes(ctx, f); return })
	return l, n, err
}

func (t *timedStore) LiveSandboxes(ctx context.Context) ([]store.Sandbox, error) {
	return timed(t, "live_sandboxes", func() ([]store.Sandbox, error) { return t.st.LiveSandboxes(ctx) })
}

func (t *timedStore) SandboxUsage(ctx context.Context, sandboxID string) (store.SandboxUsage, error) {
	return timed(t, "sandbox_usage", func() (store.SandboxUsage, error) { return t.st.SandboxUsage(ctx, sandboxID) })
}

func (t *timedStore) CreateRun(ctx context.Context, r store.Run) error {
	return t.exec("create_run", func() error { return t.st.CreateRun(ctx, r) })
}

func (t *timedStore) UpdateRun(ctx context.Context, r store.Run) error {
	return t.exec("update_run", func() error { return t.st.UpdateRun(ctx, r) })
}

func (t *timedStore) RecordRun(ctx context.Context, r store.Run, sb *store.Sandbox, ev *store.Event) error {
	return t.exec("record_run", func() error { return t.st.RecordRun(ctx, r, sb, ev) })
}

func (t *timedStore) GetRun(ctx context.Context, sandboxID, runID string) (store.Run, error) {
	return timed(t, "get_run", func() (store.Run, error) { return t.st.GetRun(ctx, sandboxID, runID) })
}

func (t *timedStore) ListRuns(ctx context.Context, sandboxID string, offset, limit int) ([]store.Run, int, error) {
	var n int
	l, err := timed(t, "list_runs", func() (l []store.Run, err error) { l, n, err = t.st.ListRuns(ctx, sandboxID, offset, limit); return })
	return l, n, err
}

func (t *timedStore) EndOpenRuns(ctx context.Context, sandboxID, status string, errJSON json.RawMessage, at time.Time) (int, error) {
	return timed(t, "end_open_runs", func() (int, error) { return t.st.EndOpenRuns(ctx, sandboxID, status, errJSON, at) })
}

func (t *timedStore) AddEvent(ctx context.Context, e store.Event) error {
	return t.exec("add_event", func() error { return t.st.AddEvent(ctx, e) })
}

func (t *timedStore) ListEvents(ctx context.Context, f store.EventFilter) ([]store.Event, int, error) {
	var n int
	l, err := timed(t, "list_events", func() (l []store.Event, err error) { l, n, err = t.st.ListEvents(ctx, f); return })
	return l, n, err
}

func (t *timedStore) Usage(ctx context.Context, accountID string, from, to, now time.Time) ([]store.UsageDay, error) {
	return timed(t, "usage", func() ([]store.UsageDay, error) { return t.st.Usage(ctx, accountID, from, to, now) })
}

func (t *timedStore) Close() error { return t.st.Close() }

func (t *timedStore) CreateContext(ctx context.Context, c store.Context, limit int) error {
	return t.exec("create_context", func() error { return t.st.CreateContext(ctx, c, limit) })
}

func (t *timedStore) StartRun(ctx context.Context, r store.Run, sb store.Sandbox, ev *store.Event) error {
	return t.exec("start_run", func() error { return t.st.StartRun(ctx, r, sb, ev) })
}

func (t *timedStore) RecordContextRun(ctx context.Context, r store.Run, sb *store.Sandbox, ev *store.Event, c store.Context) error {
	return t.exec("record_context_run", func() error { return t.st.RecordContextRun(ctx, r, sb, ev, c) })
}

func (t *timedStore) UpdateContext(ctx context.Context, c store.Context) error {
	return t.exec("update_context", func() error { return t.st.UpdateContext(ctx, c) })
}

func (t *timedStore) GetContext(ctx context.Context, sandboxID, id string) (store.Context, error) {
	return timed(t, "get_context", func() (store.Context, error) { return t.st.GetContext(ctx, sandboxID, id) })
}

func (t *timedStore) ListContexts(ctx context.Context, sandboxID string) ([]store.Context, error) {
	return timed(t, "list_contexts", func() ([]store.Context, error) { return t.st.ListContexts(ctx, sandboxID) })
}

func (t *timedStore) EndContexts(ctx context.Context, sandboxID, reason string, at time.Time) (int, error) {
	return timed(t, "end_contexts", func() (int, error) { return t.st.EndContexts(ctx, sandboxID, reason, at) })
}

func (t *timedStore) RegisterReplica(ctx context.Context, id, address string) error {
	return t.exec("register_replica", func() error { return t.st.RegisterReplica(ctx, id, address) })
}

func (t *timedStore) Heartbeat(ctx context.Context, id string) error {
	return t.exec("heartbeat", func() error { return t.st.Heartbeat(ctx, id) })
}

func (t *timedStore) MarkStaleReplicas(ctx context.Context, staleAfter time.Duration) ([]store.Replica, error) {
	return timed(t, "mark_stale_replicas", func() ([]store.Replica, error) { return t.st.MarkStaleReplicas(ctx, staleAfter) })
}

func (t *timedStore) Replicas(ctx context.Context) ([]store.Replica, error) {
	return timed(t, "replicas", func() ([]store.Replica, error) { return t.st.Replicas(ctx) })
}

func (t *timedStore) TryLock(ctx context.Context, name string) (store.Lock, error) {
	return timed(t, "try_lock", func() (store.Lock, error) { return t.st.TryLock(ctx, name) })
}
