// Package storetest is the conformance suite of store.Store. Every implementation runs it from
// its own tests:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store {
//			st := … // a new, empty store
//			t.Cleanup(func() { st.Close() })
//			return st
//		})
//	}
//
// Beyond the contract written in package store, the suite holds every implementation to what
// the service relies on:
//
//   - times round-trip exactly at microsecond precision (at least) and come back in UTC, whatever
//     zone they were given in; ordering and range filters compare instants;
//   - JSON fields come back semantically equal (an implementation may reformat them), and nil
//     comes back nil (except Event.Detail, where nil may come back as {});
//   - listings are stable: records with equal timestamps keep their insertion order (newest
//     first lists put the later inserted first);
//   - Limit 0 means no limit, and the total counts every match whatever the page;
//   - methods called with a cancelled context fail.
package storetest

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// Run runs the suite. open must return a new, empty store, independent of every other store it
// returned, and arrange for it to be closed when t ends.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, st store.Store)
	}{
		{"Accounts", testAccounts},
		{"Keys", testKeys},
		{"SandboxRoundTrip", testSandboxRoundTrip},
		{"SandboxUpdate", testSandboxUpdate},
		{"ListSandboxes", testListSandboxes},
		{"LiveSandboxes", testLiveSandboxes},
		{"Quota", testQuota},
		{"QuotaParallel", testQuotaParallel},
		{"RunRoundTrip", testRunRoundTrip},
		{"RunUpdate", testRunUpdate},
		{"RecordRun", testRecordRun},
		{"StartRun", testStartRun},
		{"ListRuns", testListRuns},
		{"EndOpenRuns", testEndOpenRuns},
		{"SandboxUsage", testSandboxUsage},
		{"Events", testEvents},
		{"ListEvents", testListEvents},
		{"Usage", testUsage},
		{"CancelledContext", testCancelledContext},
		{"Contexts", testContexts},
		{"RecordContextRun", testRecordContextRun},
		{"HostileBytes", testHostileBytes},
		{"Replicas", testReplicas},
		{"Locks", testLocks},
		{"FinishRace", func(t *testing.T, st store.Store) { testFinishRace(t, st, st) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, open(t)) })
	}
}

// base is the suite's reference time: microsecond precision, not on a second boundary.
var base = time.Date(2026, 4, 6, 14, 23, 11, 123456000, time.UTC)

// zone is a non-UTC zone that times are sometimes given in.
var zone = time.FixedZone("UTC+5", 5*3600)

func at(d time.Duration) time.Time { return base.Add(d) }

func ptr[T any](v T) *T { return &v }

func ok(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: error %v, want %v", what, err, target)
	}
}

var ctx = context.Background()

// --- fixtures ---

func account(t *testing.T, st store.Store, id string) store.Account {
	t.Helper()
	a := store.Account{ID: id, Name: "name-of-" + id, Plan: "free", CreatedAt: base}
	ok(t, st.CreateAccount(ctx, a))
	return a
}

func sandbox(id, accountID string, created time.Time, status string) store.Sandbox {
	return store.Sandbox{
		ID: id, AccountID: accountID, AgentID: "agent-1", Mode: "container", Status: status,
		Config:    json.RawMessage(`{"image":"agentcop/agent-sandbox:latest","resources":{"cpu":"1","memory":"512m","timeout":1800}}`),
		CreatedAt: created, ExpiresAt: created.Add(30 * time.Minute), Replica: "rep_1",
	}
}

func createSandbox(t *testing.T, st store.Store, sb store.Sandbox) store.Sandbox {
	t.Helper()
	ok(t, st.CreateSandbox(ctx, sb, -1))
	return sb
}

func run(id, sandboxID, accountID string, created time.Time, status string) store.Run {
	return store.Run{ID: id, SandboxID: sandboxID, AccountID: accountID, Status: status, Code: "print(1)",
		TimeoutSeconds: 30, CreatedAt: created}
}

// --- canonical forms, for comparisons ---

// canonTime strips the monotonic reading; want values are also moved to UTC, got values are not,
// so that a time not returned in UTC shows as a difference.
func canonTime(tm time.Time, want bool) time.Time {
	if want {
		tm = tm.UTC()
	}
	return tm.Round(0)
}

func canonPtime(tm *time.Time, want bool) *time.Time {
	if tm == nil {
		return nil
	}
	return ptr(canonTime(*tm, want))
}

// canonJSON re-encodes JSON with sorted keys and no spaces; nil and empty stay nil.
func canonJSON(j json.RawMessage) json.RawMessage {
	if len(j) == 0 {
		return nil
	}
	var v any
	if err := json.Unmarshal(j, &v); err != nil {
		return j
	}
	b, err := json.Marshal(v)
	if err != nil {
		return j
	}
	return b
}

func canonAccount(a store.Account, want bool) store.Account {
	a.CreatedAt = canonTime(a.CreatedAt, want)
	return a
}

func canonSandbox(s store.Sandbox, want bool) store.Sandbox {
	s.CreatedAt, s.ExpiresAt = canonTime(s.CreatedAt, want), canonTime(s.ExpiresAt, want)
	s.ReadyAt, s.DestroyedAt = canonPtime(s.ReadyAt, want), canonPtime(s.DestroyedAt, want)
	s.Config, s.Error = canonJSON(s.Config), canonJSON(s.Error)
	return s
}

func canonRun(r store.Run, want bool) store.Run {
	r.CreatedAt = canonTime(r.CreatedAt, want)
	r.StartedAt, r.FinishedAt = canonPtime(r.StartedAt, want), canonPtime(r.FinishedAt, want)
	r.Result, r.Error = canonJSON(r.Result), canonJSON(r.Error)
	return r
}

func canonEvent(e store.Event, want bool) store.Event {
	e.At = canonTime(e.At, want)
	e.Detail = canonJSON(e.Detail)
	if string(e.Detail) == "{}" {
		e.Detail = nil // nil means {}: either may come back for the other
	}
	return e
}

func same[T any](t *testing.T, what string, got, want T) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s:\n got %s\nwant %s", what, show(got), show(want))
	}
}

// show prints a record with its pointers followed and its JSON as text.
func show(v any) string {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Struct {
		return fmt.Sprintf("%+v", v)
	}
	var b strings.Builder
	b.WriteString("{")
	for i := range rv.NumField() {
		if i > 0 {
			b.WriteString(" ")
		}
		f := rv.Field(i)
		fmt.Fprintf(&b, "%s:", rv.Type().Field(i).Name)
		switch x := f.Interface().(type) {
		case json.RawMessage:
			if x == nil {
				b.WriteString("nil")
			} else {
				fmt.Fprintf(&b, "%s", x)
			}
		case *time.Time:
			if x == nil {
				b.WriteString("nil")
			} else {
				b.WriteString(x.Format(time.RFC3339Nano + " MST"))
			}
		case time.Time:
			b.WriteString(x.Format(time.RFC3339Nano + " MST"))
		case *int:
			if x == nil {
				b.WriteString("nil")
			} else {
				fmt.Fprintf(&b, "&%d", *x)
			}
		default:
			fmt.Fprintf(&b, "%q", fmt.Sprint(x))
		}
	}
	b.WriteString("}")
	return b.String()
}

func sandboxIDs(sbs []store.Sandbox) []string {
	ids := []string{}
	for _, s := range sbs {
		ids = append(ids, s.ID)
	}
	return ids
}

func runIDs(rs []store.Run) []string {
	ids := []string{}
	for _, r := range rs {
		ids = append(ids, r.ID)
	}
	return ids
}

func eventIDs(es []store.Event) []string {
	ids := []string{}
	for _, e := range es {
		ids = append(ids, e.ID)
	}
	return ids
}

// --- accounts and keys ---

func testAccounts(t *testing.T, st store.Store) {
	a := store.Account{ID: "acct_1", Name: "acme", Plan: "pro", CreatedAt: base}
	ok(t, st.CreateAccount(ctx, a))
	got, err := st.AccountByName(ctx, "acme")
	ok(t, err)
	same(t, "AccountByName", canonAccount(got, false), canonAccount(a, true))

	wantErr(t, "duplicate name", st.CreateAccount(ctx, store.Account{ID: "acct_2", Name: "acme", Plan: "free", CreatedAt: base}), store.ErrConflict)
	wantErr(t, "duplicate ID", st.CreateAccount(ctx, store.Account{ID: "acct_1", Name: "other", Plan: "free", CreatedAt: base}), store.ErrConflict)
	_, err = st.AccountByName(ctx, "other")
	wantErr(t, "account of a failed create", err, store.ErrNotFound)
	_, err = st.AccountByName(ctx, "nobody")
	wantErr(t, "unknown name", err, store.ErrNotFound)

	// A time given in another zone comes back as the same instant, in UTC.
	z := store.Account{ID: "acct_3", Name: "zoned", Plan: "enterprise", CreatedAt: at(time.Microsecond).In(zone)}
	ok(t, st.CreateAccount(ctx, z))
	got, err = st.AccountByName(ctx, "zoned")
	ok(t, err)
	same(t, "zoned account", canonAccount(got, false), canonAccount(z, true))
}

func testKeys(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	b := account(t, st, "acct_b")
	hash := func(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }
	ok(t, st.AddKey(ctx, a.ID, "key_1", hash("k1"), base))
	ok(t, st.AddKey(ctx, a.ID, "key_2", hash("k2"), at(time.Second)))
	ok(t, st.AddKey(ctx, b.ID, "key_3", hash("k3"), at(2*time.Second)))

	for _, tc := range []struct {
		key  string
		want store.Account
	}{{"k1", a}, {"k2", a}, {"k3", b}} {
		got, err := st.AccountByKeyHash(ctx, hash(tc.key))
		ok(t, err)
		same(t, "AccountByKeyHash "+tc.key, canonAccount(got, false), canonAccount(tc.want, true))
	}
	_, err := st.AccountByKeyHash(ctx, hash("unknown"))
	wantErr(t, "unknown hash", err, store.ErrNotFound)

	wantErr(t, "duplicate hash", st.AddKey(ctx, b.ID, "key_4", hash("k1"), base), store.ErrConflict)
	wantErr(t, "duplicate key ID", st.AddKey(ctx, b.ID, "key_1", hash("k5"), base), store.ErrConflict)
	_, err = st.AccountByKeyHash(ctx, hash("k5"))
	wantErr(t, "hash of a failed AddKey", err, store.ErrNotFound)
	got, err := st.AccountByKeyHash(ctx, hash("k1"))
	ok(t, err)
	same(t, "key after a conflicting AddKey", got.ID, a.ID)
}

// --- sandboxes ---

func testSandboxRoundTrip(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	account(t, st, "acct_b")
	full := sandbox("sbx_full", a.ID, base, store.SandboxDestroyed)
	full.ReadyAt, full.DestroyedAt = ptr(at(150*time.Millisecond)), ptr(at(61*time.Second))
	full.DestroyReason = "deleted"
	full.Mode = "wasm"
	full.Config = json.RawMessage(`{"image": "x:1", "filesystem": {"read_only": ["/workspace/data"], "blocked": []},
		"network": {"allow": ["*.company.com:443"], "block_outbound": true}, "note": "é \"quoted\" \\ \u2028"}`)
	full.Error = json.RawMessage(`{"error":"provisioning_failed","message":"boom"}`)
	full.ImageDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

	zoned := sandbox("sbx_zoned", a.ID, at(time.Microsecond).In(zone), store.SandboxReady)
	zoned.ReadyAt = ptr(at(2 * time.Microsecond).In(zone))
	zoned.ExpiresAt = at(time.Hour).In(zone)

	minimal := store.Sandbox{ID: "sbx_min", AccountID: a.ID, AgentID: "a", Mode: "container",
		Status: store.SandboxProvisioning, CreatedAt: base, ExpiresAt: at(time.Second)}

	for _, sb := range []store.Sandbox{minimal, sandbox("sbx_typical", a.ID, base, store.SandboxReady), full, zoned} {
		t.Run(sb.ID, func(t *testing.T) {
			ok(t, st.CreateSandbox(ctx, sb, -1))
			for _, acct := range []string{a.ID, ""} {
				got, err := st.GetSandbox(ctx, acct, sb.ID)
				ok(t, err)
				same(t, "GetSandbox(account "+acct+")", canonSandbox(got, false), canonSandbox(sb, true))
			}
			_, err := st.GetSandbox(ctx, "acct_b", sb.ID)
			wantErr(t, "GetSandbox with another account", err, store.ErrNotFound)
			wantErr(t, "duplicate ID", st.CreateSandbox(ctx, sb, -1), store.ErrConflict)
		})
	}
	_, err := st.GetSandbox(ctx, a.ID, "sbx_missing")
	wantErr(t, "unknown sandbox", err, store.ErrNotFound)
	_, err = st.GetSandbox(ctx, "", "sbx_missing")
	wantErr(t, "unknown sandbox, any account", err, store.ErrNotFound)
}

func testSandboxUpdate(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	account(t, st, "acct_b")
	orig := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxProvisioning))
	other := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxProvisioning))

	steps := []struct {
		name string
		set  func(sb *store.Sandbox)
	}{
		{"ready", func(sb *store.Sandbox) {
			sb.Status, sb.ReadyAt = store.SandboxReady, ptr(at(time.Second))
		}},
		{"running", func(sb *store.Sandbox) { sb.Status = store.SandboxRunning }},
		{"cleared", func(sb *store.Sandbox) { // overwriting with nil clears
			sb.Status, sb.ReadyAt, sb.DestroyedAt, sb.DestroyReason, sb.Error = store.SandboxReady, nil, nil, "", nil
			sb.DiskUsedBytes = 0
		}},
		{"destroyed", func(sb *store.Sandbox) {
			sb.Status, sb.DestroyedAt, sb.DestroyReason = store.SandboxDestroyed, ptr(at(61*time.Second).In(zone)), "error"
			sb.Error = json.RawMessage(`{"error": "sandbox_error", "message": "crashed"}`)
			sb.DiskUsedBytes = 5 << 30
		}},
	}
	want := orig
	for _, step := range steps {
		step.set(&want)
		// The immutable fields of the argument are ignored.
		arg := want
		arg.AccountID, arg.AgentID, arg.Mode, arg.Config = "acct_b", "changed", "wasm", json.RawMessage(`{"changed":true}`)
		arg.CreatedAt, arg.ExpiresAt, arg.ImageDigest = at(time.Hour), at(2*time.Hour), "sha256:changed"
		ok(t, st.UpdateSandbox(ctx, arg))
		got, err := st.GetSandbox(ctx, a.ID, orig.ID)
		ok(t, err)
		same(t, "after update "+step.name, canonSandbox(got, false), canonSandbox(want, true))
	}
	got, err := st.GetSandbox(ctx, a.ID, other.ID)
	ok(t, err)
	same(t, "the other sandbox", canonSandbox(got, false), canonSandbox(other, true))

	missing := sandbox("sbx_missing", a.ID, base, store.SandboxReady)
	wantErr(t, "update of an unknown sandbox", st.UpdateSandbox(ctx, missing), store.ErrNotFound)

	// A final record is never written again: not brought back to life (a replica declared lost
	// that comes back), not closed a second time.
	for _, status := range []string{store.SandboxReady, store.SandboxDestroyed, store.SandboxError} {
		again := want
		again.Status, again.DestroyReason, again.DiskUsedBytes = status, "deleted", 1
		wantErr(t, "update of a destroyed sandbox to "+status, st.UpdateSandbox(ctx, again), store.ErrFinal)
	}
	failed := createSandbox(t, st, sandbox("sbx_3", a.ID, base, store.SandboxError))
	failed.Status = store.SandboxReady
	wantErr(t, "update of a failed sandbox", st.UpdateSandbox(ctx, failed), store.ErrFinal)
	got, err = st.GetSandbox(ctx, a.ID, orig.ID)
	ok(t, err)
	same(t, "the destroyed sandbox after refused updates", canonSandbox(got, false), canonSandbox(want, true))
}

func testListSandboxes(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	b := account(t, st, "acct_b")
	// Inserted out of creation order; s3 and s4 have the same CreatedAt; s6 is 1µs after s5.
	mk := func(id, acct string, created time.Time, status, agent string) {
		sb := sandbox(id, acct, created, status)
		sb.AgentID = agent
		createSandbox(t, st, sb)
	}
	mk("s1", a.ID, at(2*time.Minute), store.SandboxReady, "x")
	mk("s2", a.ID, at(0), store.SandboxDestroyed, "y")
	mk("s3", a.ID, at(time.Minute), store.SandboxRunning, "x")
	mk("s4", a.ID, at(time.Minute).In(zone), store.SandboxDestroyed, "x")
	mk("s5", a.ID, at(3*time.Minute), store.SandboxError, "y")
	mk("s6", a.ID, at(3*time.Minute+time.Microsecond), store.SandboxDestroyed, "x")
	mk("b1", b.ID, at(90*time.Second), store.SandboxReady, "x")
	mk("b2", b.ID, at(-time.Hour), store.SandboxDestroyed, "x")

	for _, tc := range []struct {
		name  string
		f     store.SandboxFilter
		want  []string
		total int
	}{
		{"all", store.SandboxFilter{}, []string{"s6", "s5", "s1", "b1", "s4", "s3", "s2", "b2"}, 8},
		{"account", store.SandboxFilter{AccountID: a.ID}, []string{"s6", "s5", "s1", "s4", "s3", "s2"}, 6},
		{"other account", store.SandboxFilter{AccountID: b.ID}, []string{"b1", "b2"}, 2},
		{"unknown account", store.SandboxFilter{AccountID: "acct_none"}, []string{}, 0},
		{"status", store.SandboxFilter{AccountID: a.ID, Status: store.SandboxDestroyed}, []string{"s6", "s4", "s2"}, 3},
		{"status, all accounts", store.SandboxFilter{Status: store.SandboxDestroyed}, []string{"s6", "s4", "s2", "b2"}, 4},
		{"agent", store.SandboxFilter{AccountID: a.ID, AgentID: "y"}, []string{"s5", "s2"}, 2},
		{"status and agent", store.SandboxFilter{AccountID: a.ID, Status: store.SandboxDestroyed, AgentID: "x"}, []string{"s6", "s4"}, 2},
		{"no match", store.SandboxFilter{AccountID: a.ID, Status: store.SandboxProvisioning}, []string{}, 0},
		{"first page", store.SandboxFilter{AccountID: a.ID, Limit: 2}, []string{"s6", "s5"}, 6},
		{"middle page", store.SandboxFilter{AccountID: a.ID, Offset: 2, Limit: 2}, []string{"s1", "s4"}, 6},
		{"last page", store.SandboxFilter{AccountID: a.ID, Offset: 4, Limit: 4}, []string{"s3", "s2"}, 6},
		{"past the end", store.SandboxFilter{AccountID: a.ID, Offset: 6, Limit: 2}, []string{}, 6},
		{"offset, no limit", store.SandboxFilter{AccountID: a.ID, Offset: 3}, []string{"s4", "s3", "s2"}, 6},
		{"filtered page", store.SandboxFilter{AccountID: a.ID, AgentID: "x", Offset: 1, Limit: 2}, []string{"s1", "s4"}, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, total, err := st.ListSandboxes(ctx, tc.f)
			ok(t, err)
			same(t, "ids", sandboxIDs(got), tc.want)
			same(t, "total", total, tc.total)
		})
	}

	// Listed records are whole.
	got, _, err := st.ListSandboxes(ctx, store.SandboxFilter{AccountID: b.ID, Limit: 1})
	ok(t, err)
	want, err := st.GetSandbox(ctx, b.ID, "b1")
	ok(t, err)
	same(t, "listed record", canonSandbox(got[0], false), canonSandbox(want, true))
}

func testLiveSandboxes(t *testing.T, st store.Store) {
	got, err := st.LiveSandboxes(ctx)
	ok(t, err)
	same(t, "live in an empty store", len(got), 0)

	a := account(t, st, "acct_a")
	b := account(t, st, "acct_b")
	createSandbox(t, st, sandbox("a_prov", a.ID, at(0), store.SandboxProvisioning))
	createSandbox(t, st, sandbox("a_ready", a.ID, at(time.Second), store.SandboxReady))
	createSandbox(t, st, sandbox("a_dest", a.ID, at(2*time.Second), store.SandboxDestroyed))
	createSandbox(t, st, sandbox("b_run", b.ID, at(3*time.Second), store.SandboxRunning))
	createSandbox(t, st, sandbox("b_err", b.ID, at(4*time.Second), store.SandboxError))

	ids := func() []string {
		t.Helper()
		got, err := st.LiveSandboxes(ctx)
		ok(t, err)
		ids := sandboxIDs(got)
		slices.Sort(ids)
		return ids
	}
	same(t, "live", ids(), []string{"a_prov", "a_ready", "b_run"})

	sb, err := st.GetSandbox(ctx, "", "a_ready")
	ok(t, err)
	sb.Status, sb.DestroyedAt, sb.DestroyReason = store.SandboxDestroyed, ptr(at(time.Minute)), "deleted"
	ok(t, st.UpdateSandbox(ctx, sb))
	same(t, "live after a destroy", ids(), []string{"a_prov", "b_run"})

	got, err = st.LiveSandboxes(ctx)
	ok(t, err)
	for _, sb := range got {
		want, err := st.GetSandbox(ctx, "", sb.ID)
		ok(t, err)
		same(t, "live record", canonSandbox(sb, false), canonSandbox(want, true))
	}
}

// --- the concurrency check ---

func testQuota(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	b := account(t, st, "acct_b")
	n := 0
	create := func(acct, status string, limit int) (string, error) {
		n++
		id := fmt.Sprintf("sbx_%02d", n)
		return id, st.CreateSandbox(ctx, sandbox(id, acct, at(time.Duration(n)*time.Second), status), limit)
	}

	t.Run("zero limit", func(t *testing.T) {
		id, err := create(a.ID, store.SandboxProvisioning, 0)
		wantErr(t, "limit 0", err, store.ErrQuota)
		_, err = st.GetSandbox(ctx, "", id)
		wantErr(t, "sandbox refused by the quota", err, store.ErrNotFound)
	})

	var live []string
	t.Run("up to the limit", func(t *testing.T) {
		for _, status := range []string{store.SandboxProvisioning, store.SandboxReady, store.SandboxRunning} {
			id, err := create(a.ID, status, 3)
			ok(t, err)
			live = append(live, id)
		}
		id, err := create(a.ID, store.SandboxProvisioning, 3)
		wantErr(t, "fourth sandbox, limit 3", err, store.ErrQuota)
		_, err = st.GetSandbox(ctx, "", id)
		wantErr(t, "sandbox refused by the quota", err, store.ErrNotFound)
		_, err = create(a.ID, store.SandboxProvisioning, 2)
		wantErr(t, "over a lower limit", err, store.ErrQuota)
	})

	t.Run("other accounts do not count", func(t *testing.T) {
		_, err := create(b.ID, store.SandboxProvisioning, 1)
		ok(t, err)
		_, err = create(b.ID, store.SandboxProvisioning, 1)
		wantErr(t, "second sandbox of b, limit 1", err, store.ErrQuota)
	})

	t.Run("ended sandboxes do not count", func(t *testing.T) {
		if len(live) != 3 {
			t.Skip("needs the sandboxes of the previous subtest")
		}
		for i, status := range []string{store.SandboxDestroyed, store.SandboxError} {
			sb, err := st.GetSandbox(ctx, a.ID, live[i])
			ok(t, err)
			sb.Status, sb.DestroyedAt = status, ptr(at(time.Hour))
			ok(t, st.UpdateSandbox(ctx, sb))
			_, err = create(a.ID, store.SandboxProvisioning, 3)
			ok(t, err)
			_, err = create(a.ID, store.SandboxProvisioning, 3)
			wantErr(t, "again at the limit", err, store.ErrQuota)
		}
		// A sandbox created already ended does not count either.
		for range 3 {
			_, err := create(a.ID, store.SandboxDestroyed, -1)
			ok(t, err)
		}
		_, err := create(a.ID, store.SandboxProvisioning, 3)
		wantErr(t, "still at the limit", err, store.ErrQuota)
	})

	t.Run("unlimited", func(t *testing.T) {
		for range 10 {
			_, err := create(a.ID, store.SandboxReady, -1)
			ok(t, err)
		}
		_, total, err := st.ListSandboxes(ctx, store.SandboxFilter{AccountID: a.ID, Status: store.SandboxReady})
		ok(t, err)
		if total < 10 {
			t.Fatalf("%d ready sandboxes, want at least 10", total)
		}
	})

	t.Run("conflict", func(t *testing.T) {
		if len(live) == 0 {
			t.Skip("needs the sandboxes of a previous subtest")
		}
		err := st.CreateSandbox(ctx, sandbox(live[0], a.ID, base, store.SandboxReady), -1)
		wantErr(t, "duplicate ID", err, store.ErrConflict)
	})
}

// testQuotaParallel: 50 creates at once against a limit of 3 yield exactly 3 sandboxes, and the
// others ErrQuota. Races are caught by chance, so it runs several rounds, on fresh accounts, with
// some live sandboxes of another account and an ended one of the same account in the way.
func testQuotaParallel(t *testing.T, st store.Store) {
	const rounds, workers, limit = 5, 50, 3
	b := account(t, st, "acct_b")
	for i := range limit {
		createSandbox(t, st, sandbox(fmt.Sprintf("sbx_b%d", i), b.ID, base, store.SandboxReady))
	}
	for round := range rounds {
		a := account(t, st, fmt.Sprintf("acct_%d", round))
		createSandbox(t, st, sandbox(fmt.Sprintf("sbx_%d_old", round), a.ID, base, store.SandboxDestroyed))
		id := func(i int) string { return fmt.Sprintf("sbx_%d_%02d", round, i) }

		start := make(chan struct{})
		errs := make([]error, workers)
		var wg sync.WaitGroup
		for i := range workers {
			wg.Go(func() {
				<-start
				sb := sandbox(id(i), a.ID, at(time.Duration(i)*time.Millisecond), store.SandboxProvisioning)
				errs[i] = st.CreateSandbox(ctx, sb, limit)
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
				_, gerr := st.GetSandbox(ctx, "", id(i))
				wantErr(t, "sandbox refused by the quota", gerr, store.ErrNotFound)
			default:
				t.Errorf("round %d, create %d: %v (want nil or ErrQuota)", round, i, err)
			}
		}
		if created != limit {
			t.Fatalf("round %d: %d creates succeeded, want %d", round, created, limit)
		}
		_, n, err := st.ListSandboxes(ctx, store.SandboxFilter{AccountID: a.ID, Status: store.SandboxProvisioning})
		ok(t, err)
		if n != limit {
			t.Fatalf("round %d: %d live sandboxes of the account, want %d", round, n, limit)
		}
	}
}

// --- runs ---

func testRunRoundTrip(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	other := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxReady))

	queued := run("run_queued", sb.ID, a.ID, at(time.Second), "queued")
	queued.Async = true

	completed := run("run_completed", sb.ID, a.ID, at(2*time.Second).In(zone), "completed")
	completed.Code = "import json\nresult = {'rows': 12}\nprint('héllo')\n"
	completed.TimeoutSeconds = 600
	completed.ExitCode = ptr(0) // zero, not unset
	completed.Stdout = strings.Repeat("line of output ✓\n", 4096)
	completed.Stderr = "warning\n"
	completed.StdoutTruncated, completed.StderrTruncated = true, false
	completed.Result = json.RawMessage(`{"rows": 12, "nested": {"list": [1, 2.5, "x", null, true]}}`)
	completed.StartedAt = ptr(at(2*time.Second + time.Millisecond))
	completed.FinishedAt = ptr(at(2*time.Second + 42*time.Millisecond + time.Microsecond))
	completed.DurationMS, completed.CPUMS, completed.MemoryPeakBytes = 41, 38, 1<<40
	completed.NetworkAllowed, completed.NetworkDenied = 3, 2

	failed := run("run_failed", sb.ID, a.ID, at(3*time.Second), "failed")
	failed.ExitCode = ptr(-9)
	failed.StderrTruncated = true
	failed.Result = json.RawMessage(`"a string result"`)
	failed.Error = json.RawMessage(`{"type":"ZeroDivisionError","message":"division by zero","traceback":"Traceback…\n"}`)
	failed.StartedAt, failed.FinishedAt = ptr(at(3*time.Second)), ptr(at(4*time.Second))

	for _, r := range []store.Run{queued, completed, failed} {
		t.Run(r.ID, func(t *testing.T) {
			ok(t, st.CreateRun(ctx, r))
			got, err := st.GetRun(ctx, sb.ID, r.ID)
			ok(t, err)
			same(t, "GetRun", canonRun(got, false), canonRun(r, true))
			_, err = st.GetRun(ctx, other.ID, r.ID)
			wantErr(t, "GetRun with another sandbox", err, store.ErrNotFound)
			wantErr(t, "duplicate ID", st.CreateRun(ctx, r), store.ErrConflict)
		})
	}
	_, err := st.GetRun(ctx, sb.ID, "run_missing")
	wantErr(t, "unknown run", err, store.ErrNotFound)
}

func testRunUpdate(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	orig := run("run_1", sb.ID, a.ID, base, "queued")
	ok(t, st.CreateRun(ctx, orig))
	bystander := run("run_2", sb.ID, a.ID, base, "queued")
	ok(t, st.CreateRun(ctx, bystander))

	steps := []struct {
		name string
		set  func(r *store.Run)
	}{
		{"running", func(r *store.Run) {
			r.Status, r.StartedAt, r.ExitCode, r.Stdout, r.Result = "running", ptr(at(time.Second)), ptr(1), "partial", json.RawMessage(`1`)
			r.StdoutTruncated, r.Async, r.DurationMS = true, true, 5
		}},
		{"cleared", func(r *store.Run) {
			r.Status, r.ExitCode, r.Result, r.Error, r.StartedAt, r.FinishedAt = "queued", nil, nil, nil, nil, nil
			r.StdoutTruncated, r.StderrTruncated, r.Async = false, false, false
			r.Stdout, r.Stderr, r.DurationMS, r.CPUMS, r.MemoryPeakBytes = "", "", 0, 0, 0
		}},
		{"completed", func(r *store.Run) {
			r.Status, r.ExitCode, r.Stdout, r.Stderr = "completed", ptr(0), "out\n", "err\n"
			r.StdoutTruncated, r.StderrTruncated = true, true
			r.Result, r.Error = json.RawMessage(`[1,2,3]`), json.RawMessage(`{"type":"X","message":"m","traceback":""}`)
			r.StartedAt, r.FinishedAt = ptr(at(time.Second)), ptr(at(2*time.Second).In(zone))
			r.DurationMS, r.CPUMS, r.MemoryPeakBytes = 1000, 900, 9437184
			r.TimeoutSeconds, r.Async = 60, true
		}},
	}
	want := orig
	for _, step := range steps {
		step.set(&want)
		// ID, SandboxID, AccountID, Code and CreatedAt are not overwritten.
		arg := want
		arg.AccountID, arg.Code, arg.CreatedAt = "acct_other", "changed()", at(time.Hour)
		ok(t, st.UpdateRun(ctx, arg))
		got, err := st.GetRun(ctx, sb.ID, orig.ID)
		ok(t, err)
		same(t, "after update "+step.name, canonRun(got, false), canonRun(want, true))
	}
	got, err := st.GetRun(ctx, sb.ID, bystander.ID)
	ok(t, err)
	same(t, "the other run", canonRun(got, false), canonRun(bystander, true))
	wantErr(t, "update of an unknown run", st.UpdateRun(ctx, run("run_missing", sb.ID, a.ID, base, "running")), store.ErrNotFound)

	// The first final record stays: a second finisher is told, and writes nothing.
	for _, status := range []string{"running", "error", "cancelled", "completed"} {
		again := want
		again.Status, again.Stdout, again.Error = status, "second finisher", json.RawMessage(`{"type":"ReplicaLost","message":"m","traceback":""}`)
		wantErr(t, "update of a completed run to "+status, st.UpdateRun(ctx, again), store.ErrFinal)
	}
	got, err = st.GetRun(ctx, sb.ID, orig.ID)
	ok(t, err)
	same(t, "the completed run after refused updates", canonRun(got, false), canonRun(want, true))
}

func testRecordRun(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	r := run("run_1", sb.ID, a.ID, base, "queued")
	ok(t, st.CreateRun(ctx, r))
	ev := func(id string) *store.Event {
		return &store.Event{ID: id, AccountID: a.ID, Type: "run.started", At: at(time.Second), SandboxID: sb.ID, RunID: r.ID}
	}
	sbAs := func(status string) *store.Sandbox { s := sb; s.Status = status; return &s }
	missingSandbox := sandbox("sbx_missing", a.ID, base, store.SandboxRunning)
	// A second sandbox, destroyed, with a running run: its run's end is refused with it.
	sb2 := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxDestroyed))
	r2 := run("run_2", sb2.ID, a.ID, base, "running")
	ok(t, st.CreateRun(ctx, r2))

	tests := []struct {
		name    string
		run     store.Run
		sb      *store.Sandbox
		ev      *store.Event
		wantErr error
		// what the records are after the call
		wantRun    string
		wantSb     string
		wantEvents []string
	}{
		{"all three", func() store.Run { x := r; x.Status, x.StartedAt = "running", ptr(at(time.Second)); return x }(),
			sbAs(store.SandboxRunning), ev("evt_1"), nil, "running", store.SandboxRunning, []string{"evt_1"}},
		{"run alone", func() store.Run { x := r; x.Status, x.Stdout = "running", "partial"; return x }(),
			nil, nil, nil, "running", store.SandboxRunning, []string{"evt_1"}},
		{"unknown run: nothing written", run("run_missing", sb.ID, a.ID, base, "running"),
			sbAs(store.SandboxReady), ev("evt_3"), store.ErrNotFound, "running", store.SandboxRunning, []string{"evt_1"}},
		{"unknown sandbox: nothing written", func() store.Run { x := r; x.Status = "oom"; return x }(),
			&missingSandbox, ev("evt_4"), store.ErrNotFound, "running", store.SandboxRunning, []string{"evt_1"}},
		{"duplicate event: nothing written", func() store.Run { x := r; x.Status = "timeout"; return x }(),
			sbAs(store.SandboxReady), ev("evt_1"), store.ErrConflict, "running", store.SandboxRunning, []string{"evt_1"}},
		{"run and event", func() store.Run { x := r; x.Status = "completed"; return x }(),
			sbAs(store.SandboxReady), ev("evt_2"), nil, "completed", store.SandboxReady, []string{"evt_1", "evt_2"}},
		{"final run: nothing written", func() store.Run { x := r; x.Status = "error"; return x }(),
			sbAs(store.SandboxRunning), ev("evt_5"), store.ErrFinal, "completed", store.SandboxReady, []string{"evt_1", "evt_2"}},
		{"final sandbox: nothing written", func() store.Run { x := r2; x.Status = "completed"; return x }(),
			func() *store.Sandbox { s := sb2; s.Status = store.SandboxReady; return &s }(), ev("evt_6"), store.ErrFinal,
			"completed", store.SandboxReady, []string{"evt_1", "evt_2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := st.RecordRun(ctx, tc.run, tc.sb, tc.ev)
			if tc.wantErr == nil {
				ok(t, err)
			} else {
				wantErr(t, "RecordRun", err, tc.wantErr)
			}
			got, err := st.GetRun(ctx, sb.ID, r.ID)
			ok(t, err)
			if got.Status != tc.wantRun {
				t.Errorf("run status %q, want %q", got.Status, tc.wantRun)
			}
			wantSandboxEvents(t, st, a.ID, sb.ID, tc.wantSb, tc.wantEvents)
			got2, err := st.GetRun(ctx, sb2.ID, r2.ID)
			ok(t, err)
			if got2.Status != "running" {
				t.Errorf("run of the destroyed sandbox: status %q, want running (its end refused with the sandbox's)", got2.Status)
			}
		})
	}
}

// testStartRun: a run recorded for the first time as it starts, with its sandbox's status and its
// event in one commit; nothing is written when a part fails.
func testStartRun(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	gone := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxDestroyed))
	missing := sandbox("sbx_missing", a.ID, base, store.SandboxReady)
	started := func(id string, of store.Sandbox) store.Run {
		r := run(id, of.ID, a.ID, base, "running")
		r.StartedAt = ptr(at(time.Second))
		return r
	}
	running := func(of store.Sandbox) store.Sandbox { of.Status = store.SandboxRunning; return of }
	ev := func(id, sbID, runID string) *store.Event {
		return &store.Event{ID: id, AccountID: a.ID, Type: "run.started", At: at(time.Second), SandboxID: sbID, RunID: runID}
	}
	tests := []struct {
		name    string
		run     store.Run
		sb      store.Sandbox
		ev      *store.Event
		wantErr error
		// what the records are after the call
		wantRun    bool // the run exists (running)
		wantSb     string
		wantEvents []string
	}{
		{"all three", started("run_1", sb), running(sb), ev("evt_1", sb.ID, "run_1"), nil, true, store.SandboxRunning, []string{"evt_1"}},
		{"without an event", started("run_2", sb), running(sb), nil, nil, true, store.SandboxRunning, []string{"evt_1"}},
		{"duplicate run: nothing written", started("run_1", sb), sb, ev("evt_2", sb.ID, "run_1"), store.ErrConflict,
			true, store.SandboxRunning, []string{"evt_1"}},
		{"duplicate event: nothing written", started("run_3", sb), sb, ev("evt_1", sb.ID, "run_3"), store.ErrConflict,
			false, store.SandboxRunning, []string{"evt_1"}},
		{"final sandbox: nothing written", started("run_4", gone), running(gone), ev("evt_3", gone.ID, "run_4"), store.ErrFinal,
			false, store.SandboxDestroyed, []string{"evt_1"}},
		{"unknown sandbox: nothing written", started("run_5", missing), running(missing), ev("evt_4", missing.ID, "run_5"),
			store.ErrNotFound, false, "", []string{"evt_1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := st.StartRun(ctx, tc.run, tc.sb, tc.ev)
			if tc.wantErr == nil {
				ok(t, err)
			} else {
				wantErr(t, "StartRun", err, tc.wantErr)
			}
			got, err := st.GetRun(ctx, tc.run.SandboxID, tc.run.ID)
			switch {
			case tc.wantRun:
				ok(t, err)
				if got.Status != "running" || got.StartedAt == nil {
					t.Errorf("run: status %q started %v, want running with its start", got.Status, got.StartedAt)
				}
			case !errors.Is(err, store.ErrNotFound):
				t.Errorf("run: %+v %v, want none", got, err)
			}
			wantSandboxEvents(t, st, a.ID, tc.sb.ID, tc.wantSb, tc.wantEvents)
		})
	}
}

// wantSandboxEvents checks sandbox sbID's status (unless wantSb is "": it does not exist) and the
// IDs of account accountID's events.
func wantSandboxEvents(t *testing.T, st store.Store, accountID, sbID, wantSb string, wantEvents []string) {
	t.Helper()
	if wantSb != "" {
		gotSb, err := st.GetSandbox(ctx, accountID, sbID)
		ok(t, err)
		if gotSb.Status != wantSb {
			t.Errorf("sandbox status %q, want %q", gotSb.Status, wantSb)
		}
	}
	evs, _, err := st.ListEvents(ctx, store.EventFilter{AccountID: accountID})
	ok(t, err)
	same(t, "events", eventIDs(evs), wantEvents)
}

func testListRuns(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	other := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxReady))
	empty := createSandbox(t, st, sandbox("sbx_3", a.ID, base, store.SandboxReady))
	// Inserted out of order; r2 and r3 have the same CreatedAt.
	for _, r := range []store.Run{
		run("r1", sb.ID, a.ID, at(0), "completed"),
		run("r4", sb.ID, a.ID, at(2*time.Second), "running"),
		run("r2", sb.ID, a.ID, at(time.Second), "failed"),
		run("r3", sb.ID, a.ID, at(time.Second).In(zone), "completed"),
		run("r5", sb.ID, a.ID, at(2*time.Second+time.Microsecond), "queued"),
		run("o1", other.ID, a.ID, at(time.Second), "completed"),
	} {
		ok(t, st.CreateRun(ctx, r))
	}
	for _, tc := range []struct {
		name          string
		sandbox       string
		offset, limit int
		want          []string
		total         int
	}{
		{"all", sb.ID, 0, 0, []string{"r5", "r4", "r3", "r2", "r1"}, 5},
		{"first page", sb.ID, 0, 2, []string{"r5", "r4"}, 5},
		{"middle page", sb.ID, 2, 2, []string{"r3", "r2"}, 5},
		{"last page", sb.ID, 4, 2, []string{"r1"}, 5},
		{"past the end", sb.ID, 5, 2, []string{}, 5},
		{"offset, no limit", sb.ID, 3, 0, []string{"r2", "r1"}, 5},
		{"other sandbox", other.ID, 0, 0, []string{"o1"}, 1},
		{"no runs", empty.ID, 0, 10, []string{}, 0},
		{"unknown sandbox", "sbx_missing", 0, 0, []string{}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, total, err := st.ListRuns(ctx, tc.sandbox, tc.offset, tc.limit)
			ok(t, err)
			same(t, "ids", runIDs(got), tc.want)
			same(t, "total", total, tc.total)
			for _, r := range got {
				want, err := st.GetRun(ctx, tc.sandbox, r.ID)
				ok(t, err)
				same(t, "listed run", canonRun(r, false), canonRun(want, true))
			}
		})
	}
}

func testEndOpenRuns(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	other := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxReady))
	runs := map[string]store.Run{}
	add := func(r store.Run) {
		ok(t, st.CreateRun(ctx, r))
		runs[r.ID] = r
	}
	add(run("queued", sb.ID, a.ID, at(0), "queued"))
	running := run("running", sb.ID, a.ID, at(time.Second), "running")
	running.StartedAt, running.Stdout = ptr(at(time.Second)), "partial"
	add(running)
	done := run("completed", sb.ID, a.ID, at(2*time.Second), "completed")
	done.ExitCode, done.FinishedAt = ptr(0), ptr(at(3*time.Second))
	add(done)
	for _, s := range []string{"failed", "timeout", "cancelled", "oom", "error"} {
		add(run(s, sb.ID, a.ID, at(4*time.Second), s))
	}
	add(run("other_running", other.ID, a.ID, at(time.Second), "running"))

	errJSON := json.RawMessage(`{"type":"SandboxDestroyed","message":"the sandbox was destroyed"}`)
	end := at(time.Minute).In(zone)
	n, err := st.EndOpenRuns(ctx, sb.ID, "cancelled", errJSON, end)
	ok(t, err)
	same(t, "runs ended", n, 2)
	for id, want := range runs {
		if id == "queued" || id == "running" {
			want.Status, want.Error, want.FinishedAt = "cancelled", errJSON, &end
		}
		got, err := st.GetRun(ctx, want.SandboxID, id)
		ok(t, err)
		same(t, "run "+id, canonRun(got, false), canonRun(want, true))
	}
	n, err = st.EndOpenRuns(ctx, sb.ID, "cancelled", errJSON, end)
	ok(t, err)
	same(t, "runs ended by a second call", n, 0)

	// A nil error JSON leaves Error unset.
	n, err = st.EndOpenRuns(ctx, other.ID, "error", nil, end)
	ok(t, err)
	same(t, "runs ended in the other sandbox", n, 1)
	got, err := st.GetRun(ctx, other.ID, "other_running")
	ok(t, err)
	want := runs["other_running"]
	want.Status, want.FinishedAt = "error", &end
	same(t, "other run", canonRun(got, false), canonRun(want, true))
}

func testSandboxUsage(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	sb := createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	other := createSandbox(t, st, sandbox("sbx_2", a.ID, base, store.SandboxReady))

	u, err := st.SandboxUsage(ctx, sb.ID)
	ok(t, err)
	same(t, "usage without runs", u, store.SandboxUsage{})

	mk := func(id, sandboxID, status string, cpu, peak int64) {
		r := run(id, sandboxID, a.ID, base, status)
		r.CPUMS, r.MemoryPeakBytes = cpu, peak
		ok(t, st.CreateRun(ctx, r))
	}
	mk("r1", sb.ID, "completed", 100, 1000)
	mk("r2", sb.ID, "failed", 50, 5_000_000_000)
	mk("r3", sb.ID, "running", 7, 0)
	mk("r4", sb.ID, "queued", 0, 0)
	mk("r5", sb.ID, "oom", 3, 600)
	mk("o1", other.ID, "running", 999, 99_999_999_999)

	u, err = st.SandboxUsage(ctx, sb.ID)
	ok(t, err)
	same(t, "usage", u, store.SandboxUsage{RunsTotal: 5, RunsActive: 2, CPUMS: 160, MemoryPeakBytes: 5_000_000_000})
	u, err = st.SandboxUsage(ctx, other.ID)
	ok(t, err)
	same(t, "usage of the other sandbox", u, store.SandboxUsage{RunsTotal: 1, RunsActive: 1, CPUMS: 999, MemoryPeakBytes: 99_999_999_999})
}

// --- events ---

func testEvents(t *testing.T, st store.Store) {
	events := []store.Event{
		{ID: "evt_full", AccountID: "acct_a", Type: "run.finished", At: base, SandboxID: "sbx_1", RunID: "run_1",
			AgentID: "agent-1", Detail: json.RawMessage(`{"status": "completed", "duration_ms": 41, "nested": {"a": [1, "b"]}}`)},
		{ID: "evt_bare", AccountID: "acct_a", Type: "quota.denied", At: at(time.Microsecond).In(zone)},
		{ID: "evt_noacct", Type: "auth.failed", At: at(time.Second), Detail: json.RawMessage(`{"reason":"unknown key"}`)},
		{ID: "evt_empty", AccountID: "acct_b", Type: "sandbox.created", At: at(2 * time.Second), Detail: json.RawMessage(`{}`)},
	}
	for _, e := range events {
		ok(t, st.AddEvent(ctx, e))
	}
	got, total, err := st.ListEvents(ctx, store.EventFilter{})
	ok(t, err)
	same(t, "total", total, len(events))
	same(t, "ids", eventIDs(got), eventIDs(events))
	for i := range got {
		same(t, "event "+events[i].ID, canonEvent(got[i], false), canonEvent(events[i], true))
	}
	dup := events[0]
	dup.At = at(time.Hour)
	wantErr(t, "duplicate ID", st.AddEvent(ctx, dup), store.ErrConflict)
}

func testListEvents(t *testing.T, st store.Store) {
	const a, b = "acct_a", "acct_b"
	for _, e := range []store.Event{
		{ID: "e1", AccountID: a, Type: "sandbox.created", At: at(0), SandboxID: "sbx_1"},
		{ID: "e2", AccountID: a, Type: "sandbox.ready", At: at(time.Second), SandboxID: "sbx_1"},
		{ID: "e3", AccountID: a, Type: "run.started", At: at(time.Second).In(zone), SandboxID: "sbx_1", RunID: "run_1"},
		{ID: "e4", AccountID: b, Type: "sandbox.created", At: at(2 * time.Second), SandboxID: "sbx_9"},
		{ID: "e5", AccountID: a, Type: "sandbox.created", At: at(3 * time.Second), SandboxID: "sbx_2"},
		{ID: "e6", Type: "auth.failed", At: at(500 * time.Millisecond)},
		{ID: "e7", AccountID: a, Type: "run.finished", At: at(time.Second + time.Microsecond), SandboxID: "sbx_1", RunID: "run_1"},
	} {
		ok(t, st.AddEvent(ctx, e))
	}
	for _, tc := range []struct {
		name  string
		f     store.EventFilter
		want  []string
		total int
	}{
		{"all", store.EventFilter{}, []string{"e1", "e6", "e2", "e3", "e7", "e4", "e5"}, 7},
		{"account", store.EventFilter{AccountID: a}, []string{"e1", "e2", "e3", "e7", "e5"}, 5},
		{"unknown account", store.EventFilter{AccountID: "acct_none"}, []string{}, 0},
		{"sandbox", store.EventFilter{AccountID: a, SandboxID: "sbx_1"}, []string{"e1", "e2", "e3", "e7"}, 4},
		{"sandbox, any account", store.EventFilter{SandboxID: "sbx_9"}, []string{"e4"}, 1},
		{"sandbox of another account", store.EventFilter{AccountID: a, SandboxID: "sbx_9"}, []string{}, 0},
		{"type", store.EventFilter{AccountID: a, Type: "sandbox.created"}, []string{"e1", "e5"}, 2},
		{"type, any account", store.EventFilter{Type: "auth.failed"}, []string{"e6"}, 1},
		{"from is inclusive", store.EventFilter{AccountID: a, From: at(time.Second)}, []string{"e2", "e3", "e7", "e5"}, 4},
		{"from in another zone", store.EventFilter{AccountID: a, From: at(time.Second).In(zone)}, []string{"e2", "e3", "e7", "e5"}, 4},
		{"to is exclusive", store.EventFilter{AccountID: a, To: at(time.Second)}, []string{"e1"}, 1},
		{"microsecond window", store.EventFilter{AccountID: a, From: at(time.Second), To: at(time.Second + time.Microsecond)}, []string{"e2", "e3"}, 2},
		{"from and to", store.EventFilter{From: at(time.Second), To: at(3 * time.Second)}, []string{"e2", "e3", "e7", "e4"}, 4},
		{"empty window", store.EventFilter{From: at(time.Hour), To: at(2 * time.Hour)}, []string{}, 0},
		{"everything filtered", store.EventFilter{AccountID: a, SandboxID: "sbx_1", Type: "sandbox.ready", From: at(0), To: at(time.Hour)}, []string{"e2"}, 1},
		{"first page", store.EventFilter{AccountID: a, Limit: 2}, []string{"e1", "e2"}, 5},
		{"middle page", store.EventFilter{AccountID: a, Offset: 2, Limit: 2}, []string{"e3", "e7"}, 5},
		{"last page", store.EventFilter{AccountID: a, Offset: 4, Limit: 2}, []string{"e5"}, 5},
		{"past the end", store.EventFilter{AccountID: a, Offset: 5, Limit: 2}, []string{}, 5},
		{"offset, no limit", store.EventFilter{AccountID: a, Offset: 3}, []string{"e7", "e5"}, 5},
		{"filtered page", store.EventFilter{AccountID: a, SandboxID: "sbx_1", From: at(time.Second), Offset: 1, Limit: 1}, []string{"e3"}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, total, err := st.ListEvents(ctx, tc.f)
			ok(t, err)
			same(t, "ids", eventIDs(got), tc.want)
			same(t, "total", total, tc.total)
		})
	}
}

// --- usage ---

func testUsage(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	b := account(t, st, "acct_b")
	day := func(d int, clock string) time.Time {
		tm, err := time.Parse(time.DateTime, fmt.Sprintf("2026-04-%02d %s", d, clock))
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	sbx := func(id, acct string, created time.Time, destroyed *time.Time) {
		status := store.SandboxReady
		if destroyed != nil {
			status = store.SandboxDestroyed
		}
		sb := sandbox(id, acct, created, status)
		sb.DestroyedAt = destroyed
		createSandbox(t, st, sb)
	}
	rn := func(id, sandboxID, acct string, created time.Time, cpuMS int64) {
		r := run(id, sandboxID, acct, created, "completed")
		r.CPUMS = cpuMS
		ok(t, st.CreateRun(ctx, r))
	}
	// The day before the range.
	sbx("s0", a.ID, day(5, "23:59:59.999999"), ptr(day(6, "00:10:00")))
	rn("r0", "s0", a.ID, day(5, "23:59:59.999999"), 7000)
	// 2026-04-06: 61 s → 2 minutes; 40 s across midnight → 1, on the creation day; exactly 120 s
	// → 2; 0 s → 1. One run of 0.5 s CPU.
	sbx("s1", a.ID, day(6, "10:00:00"), ptr(day(6, "10:01:01")))
	sbx("s2", a.ID, day(6, "23:59:30"), ptr(day(7, "00:00:10").In(zone)))
	sbx("s3", a.ID, day(6, "12:00:00").In(zone), ptr(day(6, "12:02:00")))
	sbx("s4", a.ID, day(6, "13:00:00"), ptr(day(6, "13:00:00")))
	rn("r1", "s1", a.ID, day(6, "10:00:30"), 500)
	// 2026-04-07: one live sandbox; two runs, one of them of a sandbox created the day before.
	sbx("s5", a.ID, day(7, "08:00:00"), nil)
	rn("r2", "s5", a.ID, day(7, "08:01:00"), 1500)
	rn("r3", "s2", a.ID, day(7, "00:00:05").In(zone), 250)
	// 2026-04-09, at the (exclusive) end of the range.
	sbx("s6", a.ID, day(9, "00:00:00"), ptr(day(9, "00:05:00")))
	rn("r4", "s6", a.ID, day(9, "00:00:00"), 100)
	// Another account.
	sbx("b1", b.ID, day(6, "11:00:00"), ptr(day(6, "11:30:00")))
	rn("b_r1", "b1", b.ID, day(6, "11:10:00"), 4000)

	now := day(7, "08:10:30")
	for _, tc := range []struct {
		name          string
		acct          string
		from, to, now time.Time
		want          []store.UsageDay
	}{
		{"range", a.ID, day(6, "00:00:00"), day(9, "00:00:00"), now, []store.UsageDay{
			{Day: "2026-04-06", Sandboxes: 4, BilledMinutes: 6, CPUSeconds: 0.5, Runs: 1},
			{Day: "2026-04-07", Sandboxes: 1, BilledMinutes: 11, CPUSeconds: 1.75, Runs: 2},
		}},
		{"live sandbox measured to now", a.ID, day(7, "00:00:00"), day(8, "00:00:00"), day(7, "08:00:00.5"), []store.UsageDay{
			{Day: "2026-04-07", Sandboxes: 1, BilledMinutes: 1, CPUSeconds: 1.75, Runs: 2},
		}},
		{"live sandbox, later now", a.ID, day(7, "00:00:00"), day(8, "00:00:00"), day(7, "09:00:00.000001"), []store.UsageDay{
			{Day: "2026-04-07", Sandboxes: 1, BilledMinutes: 61, CPUSeconds: 1.75, Runs: 2},
		}},
		{"now before creation", a.ID, day(7, "00:00:00"), day(8, "00:00:00"), day(7, "07:00:00"), []store.UsageDay{
			{Day: "2026-04-07", Sandboxes: 1, BilledMinutes: 1, CPUSeconds: 1.75, Runs: 2},
		}},
		{"range in another zone", a.ID, day(6, "00:00:00").In(zone), day(7, "00:00:00").In(zone), now, []store.UsageDay{
			{Day: "2026-04-06", Sandboxes: 4, BilledMinutes: 6, CPUSeconds: 0.5, Runs: 1},
		}},
		{"wider range", a.ID, day(1, "00:00:00"), day(10, "00:00:00"), now, []store.UsageDay{
			{Day: "2026-04-05", Sandboxes: 1, BilledMinutes: 11, CPUSeconds: 7, Runs: 1},
			{Day: "2026-04-06", Sandboxes: 4, BilledMinutes: 6, CPUSeconds: 0.5, Runs: 1},
			{Day: "2026-04-07", Sandboxes: 1, BilledMinutes: 11, CPUSeconds: 1.75, Runs: 2},
			{Day: "2026-04-09", Sandboxes: 1, BilledMinutes: 5, CPUSeconds: 0.1, Runs: 1},
		}},
		{"empty day", a.ID, day(8, "00:00:00"), day(9, "00:00:00"), now, nil},
		{"other account", b.ID, day(6, "00:00:00"), day(9, "00:00:00"), now, []store.UsageDay{
			{Day: "2026-04-06", Sandboxes: 1, BilledMinutes: 30, CPUSeconds: 4, Runs: 1},
		}},
		{"unknown account", "acct_none", day(1, "00:00:00"), day(10, "00:00:00"), now, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := st.Usage(ctx, tc.acct, tc.from, tc.to, tc.now)
			ok(t, err)
			if len(got) != len(tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
			for i := range got {
				g, w := got[i], tc.want[i]
				if math.Abs(g.CPUSeconds-w.CPUSeconds) < 1e-9 {
					g.CPUSeconds = w.CPUSeconds
				}
				if g != w {
					t.Fatalf("day %d: got %+v, want %+v\n(all: %+v)", i, g, w, got)
				}
			}
		})
	}
}

// --- cancellation ---

func testCancelledContext(t *testing.T, st store.Store) {
	a := account(t, st, "acct_a")
	createSandbox(t, st, sandbox("sbx_1", a.ID, base, store.SandboxReady))
	c, cancel := context.WithCancel(ctx)
	cancel()
	calls := map[string]func() error{
		"AccountByName": func() error { _, err := st.AccountByName(c, a.Name); return err },
		"GetSandbox":    func() error { _, err := st.GetSandbox(c, a.ID, "sbx_1"); return err },
		"ListSandboxes": func() error { _, _, err := st.ListSandboxes(c, store.SandboxFilter{}); return err },
		"CreateSandbox": func() error { return st.CreateSandbox(c, sandbox("sbx_2", a.ID, base, store.SandboxReady), -1) },
		"AddEvent":      func() error { return st.AddEvent(c, store.Event{ID: "evt_1", Type: "x", At: base}) },
		"Usage":         func() error { _, err := st.Usage(c, a.ID, base, at(time.Hour), base); return err },
	}
	for name, call := range calls {
		if err := call(); err == nil {
			t.Errorf("%s with a cancelled context: no error", name)
		}
	}
	_, err := st.GetSandbox(ctx, "", "sbx_2")
	wantErr(t, "sandbox created with a cancelled context", err, store.ErrNotFound)
}
