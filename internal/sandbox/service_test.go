package sandbox_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/agentcall"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

type env struct {
	svc  *sandbox.Service
	st   store.Store
	drv  *fakedriver.Driver
	dir  string
	acct store.Account
	warm int // Config.WarmPool of the services open makes
	// catalog is Config.Catalog of the services open makes.
	catalog func() ([]sandbox.Image, error)
	// agents is Config.Agents of the services open makes.
	agents *agentcall.Client
	// filer, when set, is the driver of the services open makes (drv is its fake).
	filer *fakedriver.Filer
}

func newEnv(t *testing.T, plan string) *env {
	t.Helper()
	return newEnvOn(t, plan, nil)
}

// newEnvOn is newEnv on filer (nil: the plain fake).
func newEnvOn(t *testing.T, plan string, filer *fakedriver.Filer) *env {
	t.Helper()
	dir := t.TempDir()
	st, err := sqlite.Open(context.Background(), filepath.Join(dir, "db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := &env{st: st, drv: fakedriver.New(), dir: dir, filer: filer}
	if filer != nil {
		e.drv = filer.Driver
	}
	e.svc = e.open(t)
	t.Cleanup(e.drv.ReleaseStubborn) // before the service's Close, which waits for its runs
	_, e.acct, _, err = sandbox.CreateKey(context.Background(), st, sandbox.DefaultPlans(), "acme", plan)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) open(t *testing.T) *sandbox.Service {
	t.Helper()
	svc, err := sandbox.New(context.Background(), sandbox.Config{
		DataDir: e.dir, Images: []sandbox.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/nonexistent", Default: true}},
		WarmPool: e.warm, Catalog: e.catalog, Agents: e.agents,
	}, e.st, map[string]driver.Driver{"container": e.driver()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(context.Background()) })
	return svc
}

func (e *env) driver() driver.Driver {
	if e.filer != nil {
		return e.filer
	}
	return e.drv
}

func (e *env) create(t *testing.T, cfg *api.Config) string {
	t.Helper()
	return e.createFor(t, "agent-1", cfg)
}

// createFor creates a sandbox of agent agentID.
func (e *env) createFor(t *testing.T, agentID string, cfg *api.Config) string {
	t.Helper()
	resp, err := e.svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: agentID, Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != "ready" {
		t.Fatalf("status %q, want ready", resp.Status)
	}
	return resp.SandboxID
}

func (e *env) run(t *testing.T, id, code string, async bool) api.Run {
	t.Helper()
	r, _, err := e.svc.Run(context.Background(), e.acct, id, api.RunRequest{Code: &code, Async: async})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func ptr[T any](v T) *T { return &v }

// waitExec waits until n runs are inside the driver's Exec (the service's worker has taken them).
func (e *env) waitExec(t *testing.T, n int) {
	t.Helper()
	waitfor.True(t, 10*time.Second, func() bool { return e.drv.Running() == n })
}

// waitFinishedEvents waits until sandbox id has n run.finished events: the worker's last act
// for a run, after the driver's answer.
func (e *env) waitFinishedEvents(t *testing.T, id string, n int) {
	t.Helper()
	waitfor.True(t, 10*time.Second, func() bool {
		evs, _, err := e.st.ListEvents(context.Background(), store.EventFilter{AccountID: e.acct.ID, SandboxID: id, Type: "run.finished"})
		return err == nil && len(evs) == n
	})
}

func TestCreateValidation(t *testing.T) {
	e := newEnv(t, "free")
	cases := []struct {
		name string
		req  api.CreateSandboxRequest
		want sandbox.Kind
	}{
		{"missing agent_id", api.CreateSandboxRequest{}, sandbox.KindInvalid},
		{"bad agent_id", api.CreateSandboxRequest{AgentID: "a b"}, sandbox.KindInvalid},
		{"bad mode", api.CreateSandboxRequest{AgentID: "a", Mode: "vm"}, sandbox.KindInvalid},
		{"wasm not configured", api.CreateSandboxRequest{AgentID: "a", Mode: "wasm"}, sandbox.KindUnsupported},
		{"image not approved", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Image: "evil:1"}}, sandbox.KindImageNotApproved},
		{"relative path", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{ReadOnly: []string{"data"}}}}, sandbox.KindInvalid},
		{"dotdot path", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{ReadWrite: []string{"/a/../etc"}}}}, sandbox.KindInvalid},
		{"double slash", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{Blocked: []string{"//etc"}}}}, sandbox.KindInvalid},
		{"root mount", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{ReadWrite: []string{"/"}}}}, sandbox.KindInvalid},
		{"reserved", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{Blocked: []string{"/proc"}}}}, sandbox.KindInvalid},
		{"path in two lists", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Filesystem: &api.Filesystem{ReadOnly: []string{"/w"}, Blocked: []string{"/w"}}}}, sandbox.KindInvalid},
		{"bad allow entry", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Network: &api.Network{Allow: []string{"not a host"}}}}, sandbox.KindInvalid},
		{"bad cpu", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{CPU: "half"}}}, sandbox.KindInvalid},
		{"cpu over plan", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{CPU: "2"}}}, sandbox.KindInvalid},
		{"memory too small", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{Memory: "1m"}}}, sandbox.KindInvalid},
		{"memory over plan", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{Memory: "2g"}}}, sandbox.KindInvalid},
		{"bad memory", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{Memory: "lots"}}}, sandbox.KindInvalid},
		{"timeout too long", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{Timeout: ptr(3601)}}}, sandbox.KindInvalid},
		{"timeout zero", api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{Timeout: ptr(0)}}}, sandbox.KindInvalid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.svc.Create(context.Background(), e.acct, c.req)
			if got := sandbox.KindOf(err); err == nil || got != c.want {
				t.Fatalf("err %v (kind %q), want kind %q", err, got, c.want)
			}
		})
	}
}

func TestCreateFillsDefaults(t *testing.T) {
	e := newEnv(t, "free")
	id := e.create(t, &api.Config{Filesystem: &api.Filesystem{ReadOnly: []string{"/workspace/data"}}, Resources: &api.Resources{Memory: "256M"}})
	sb, err := e.svc.Get(context.Background(), e.acct, id)
	if err != nil {
		t.Fatal(err)
	}
	var cfg api.Config
	if err := json.Unmarshal(sb.Config, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Image != "agentcop/agent-sandbox:latest" || cfg.Resources.CPU != "1" || cfg.Resources.Memory != "256m" ||
		*cfg.Resources.Timeout != 1800 || !*cfg.Network.BlockOutbound || *cfg.Process.AllowSpawn ||
		len(cfg.Filesystem.ReadOnly) != 1 || cfg.Filesystem.ReadWrite == nil {
		t.Fatalf("config not normalised: %s", sb.Config)
	}
	if sb.Status != "ready" || sb.ReadyAt == nil || sb.ExpiresAt.Sub(sb.CreatedAt) != 1800*time.Second {
		t.Fatalf("record: %+v", sb)
	}
}

func TestQuotaIsAtomic(t *testing.T) {
	e := newEnv(t, "free")
	var wg sync.WaitGroup
	var mu sync.Mutex
	created, limited := 0, 0
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a"})
			mu.Lock()
			defer mu.Unlock()
			switch sandbox.KindOf(err) {
			case sandbox.KindConcurrencyLimit:
				limited++
			default:
				if err != nil {
					t.Errorf("create: %v", err)
				}
				created++
			}
		}()
	}
	wg.Wait()
	if created != 3 || limited != 47 {
		t.Fatalf("created %d, limited %d; want 3 and 47", created, limited)
	}
	ev, err := e.svc.Audit(context.Background(), e.acct, store.EventFilter{Type: "quota.denied"}, 1, 100)
	if err != nil || ev.Total != 47 {
		t.Fatalf("quota.denied events: %d, %v", ev.Total, err)
	}
}

func TestRunsSyncAsyncFIFO(t *testing.T) {
	e := newEnv(t, "free")
	id := e.create(t, nil)
	r := e.run(t, id, "print(1)", false)
	if r.Status != "completed" || string(r.Result) != "42" || r.Stdout != "print(1)" || r.DurationMS == nil {
		t.Fatalf("sync run: %+v", r)
	}
	var ids []string
	for range 3 {
		a := e.run(t, id, "sleep:30", true)
		if a.Status != "queued" {
			t.Fatalf("async status %q", a.Status)
		}
		ids = append(ids, a.RunID)
	}
	var prev time.Time
	for _, rid := range ids {
		got := waitRun(t, e, id, rid)
		if got.Status != "completed" || got.StartedAt == nil {
			t.Fatalf("run %s: %+v", rid, got)
		}
		if got.StartedAt.Before(prev) {
			t.Fatalf("runs did not start in arrival order")
		}
		prev = *got.FinishedAt
	}
	list, err := e.svc.ListRuns(context.Background(), e.acct, id, 1, 2)
	if err != nil || list.Total != 4 || len(list.Runs) != 2 || list.Runs[0].RunID != ids[2] {
		t.Fatalf("list runs: %+v %v", list, err)
	}
}

func waitRun(t *testing.T, e *env, id, rid string) api.Run {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r, err := e.svc.GetRun(context.Background(), e.acct, id, rid)
		if err != nil {
			t.Fatal(err)
		}
		if r.FinishedAt != nil {
			return r
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("run %s did not finish", rid)
	return api.Run{}
}

func TestCancelAndDelete(t *testing.T) {
	e := newEnv(t, "free")
	ctx := context.Background()
	id := e.create(t, nil)
	running := e.run(t, id, "block", true)
	queued := e.run(t, id, "print(2)", true)
	c, err := e.svc.CancelRun(ctx, e.acct, id, queued.RunID)
	if err != nil || c.Status != "cancelled" {
		t.Fatalf("cancel queued: %+v %v", c, err)
	}
	c, err = e.svc.CancelRun(ctx, e.acct, id, running.RunID)
	if err != nil || c.Status != "cancelled" {
		t.Fatalf("cancel running: %+v %v", c, err)
	}
	blocked := e.run(t, id, "block", true)
	e.waitExec(t, 1)
	if err := e.svc.Delete(ctx, e.acct, id); err != nil {
		t.Fatal(err)
	}
	// Final when DELETE returns.
	if got, err := e.svc.GetRun(ctx, e.acct, id, blocked.RunID); err != nil || got.Status != "cancelled" || got.FinishedAt == nil {
		t.Fatalf("run of a deleted sandbox right after DELETE: %+v %v", got, err)
	}
	sb, _ := e.svc.Get(ctx, e.acct, id)
	if sb.Status != "destroyed" || *sb.DestroyReason != "deleted" || sb.DestroyedAt == nil {
		t.Fatalf("after delete: %+v", sb)
	}
	// The driver's resources are released off the request path, soon after.
	waitfor.True(t, 10*time.Second, func() bool { return !e.drv.Live(id) })
	if err := e.svc.Delete(ctx, e.acct, id); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	code := "print(1)"
	if _, _, err := e.svc.Run(ctx, e.acct, id, api.RunRequest{Code: &code}); sandbox.KindOf(err) != sandbox.KindSandboxDestroyed {
		t.Fatalf("run on destroyed: %v", err)
	}
	other := store.Account{ID: "acct_other", Plan: "free"}
	if _, err := e.svc.Get(ctx, other, id); sandbox.KindOf(err) != sandbox.KindNotFound {
		t.Fatalf("other account sees the sandbox: %v", err)
	}
}

// TestDeleteSlowDriver: a run whose driver does not stop it is recorded cancelled by DELETE
// (which returns after a bounded wait while the driver still holds the run), and the driver's late
// answer does not change that.
func TestDeleteSlowDriver(t *testing.T) {
	e := newEnv(t, "free")
	ctx := context.Background()
	id := e.create(t, nil)
	r := e.run(t, id, "stubborn", true)
	e.waitExec(t, 1)
	if err := e.svc.Delete(ctx, e.acct, id); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.svc.GetRun(ctx, e.acct, id, r.RunID); got.Status != "cancelled" {
		t.Fatalf("right after DELETE: %s", got.Status)
	}
	if n := e.drv.Running(); n != 1 {
		t.Fatalf("runs in the driver when DELETE returned: %d, want the stubborn one", n)
	}
	e.drv.ReleaseStubborn() // the driver answers "completed"
	e.waitFinishedEvents(t, id, 1)
	if got, _ := e.svc.GetRun(ctx, e.acct, id, r.RunID); got.Status != "cancelled" {
		t.Fatalf("after the driver's late answer: %s", got.Status)
	}
}

// TestCloseOutOfTime: a stop whose grace runs out (a driver that does not stop a run) kills the
// sandbox, records it destroyed and its run cancelled, and returns within hardStopWait.
func TestCloseOutOfTime(t *testing.T) {
	e := newEnv(t, "free")
	bg := context.Background()
	id := e.create(t, nil)
	done := e.create(t, nil)
	r := e.run(t, id, "stubborn", true)
	e.waitExec(t, 1)
	ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
	defer cancel()
	err := e.svc.Close(ctx)
	if err == nil {
		t.Fatal("Close out of time returned nil")
	}
	if k := e.drv.Killed(); !slices.Equal(k, []string{id}) {
		t.Errorf("killed %v, want [%s] (the other sandbox was destroyed in time)", k, id)
	}
	for _, sid := range []string{id, done} {
		sb, err := e.svc.Get(bg, e.acct, sid)
		if err != nil || sb.Status != "destroyed" || sb.DestroyedAt == nil || *sb.DestroyReason != "server_restart" {
			t.Fatalf("record of %s after Close out of time: %+v %v", sid, sb, err)
		}
	}
	if got, _ := e.svc.GetRun(bg, e.acct, id, r.RunID); got.Status != "cancelled" || got.FinishedAt == nil {
		t.Fatalf("run after Close out of time: %+v", got)
	}
	if live, err := e.st.LiveSandboxes(bg); err != nil || len(live) != 0 {
		t.Fatalf("live records after Close out of time: %v %v", live, err)
	}
	e.drv.ReleaseStubborn() // the driver answers "completed": nothing is recorded twice
	e.waitFinishedEvents(t, id, 1)
	if got, _ := e.svc.GetRun(bg, e.acct, id, r.RunID); got.Status != "cancelled" {
		t.Fatalf("after the driver's late answer: %s", got.Status)
	}
	evs, _, err := e.st.ListEvents(bg, store.EventFilter{AccountID: e.acct.ID, SandboxID: id, Type: "sandbox.destroyed"})
	if err != nil || len(evs) != 1 {
		t.Fatalf("sandbox.destroyed events of %s: %d %v", id, len(evs), err)
	}
}

func TestRunQueueFull(t *testing.T) {
	e := newEnv(t, "free")
	id := e.create(t, nil)
	e.run(t, id, "block", true)
	e.waitExec(t, 1) // the worker has taken the blocking run
	for range sandbox.MaxQueuedRuns {
		e.run(t, id, "print(1)", true)
	}
	code := "print(1)"
	if _, _, err := e.svc.Run(context.Background(), e.acct, id, api.RunRequest{Code: &code, Async: true}); sandbox.KindOf(err) != sandbox.KindRunQueueFull {
		t.Fatalf("65th queued run: %v", err)
	}
}

func TestExpiry(t *testing.T) {
	e := newEnv(t, "free")
	id := e.create(t, &api.Config{Resources: &api.Resources{Timeout: ptr(1)}})
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		sb, _ := e.svc.Get(context.Background(), e.acct, id)
		if sb.Status == "destroyed" {
			if *sb.DestroyReason != "expired" || sb.DestroyedAt.Before(sb.ExpiresAt) || e.drv.Live(id) {
				t.Fatalf("expired record: %+v", sb)
			}
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("sandbox did not expire")
}

func TestProvisioningFailure(t *testing.T) {
	e := newEnv(t, "free")
	e.drv.CreateHook = func(context.Context, string) error { return fakedriver.ErrInjected }
	resp, err := e.svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a"})
	if sandbox.KindOf(err) != sandbox.KindProvisioningFailed {
		t.Fatalf("err %v", err)
	}
	sb, _ := e.svc.Get(context.Background(), e.acct, resp.SandboxID)
	if sb.Status != "error" || string(sb.Error) == "null" {
		t.Fatalf("record: %+v", sb)
	}
}

func TestSlowProvisioningAnswers202(t *testing.T) {
	e := newEnv(t, "free")
	e.svc.Close(context.Background())
	svc, err := sandbox.New(context.Background(), sandbox.Config{
		DataDir: e.dir, ProvisionWait: 20 * time.Millisecond,
		Images: []sandbox.Image{{Name: "i", Mode: "container", RootFS: "/x", Default: true}},
	}, e.st, map[string]driver.Driver{"container": e.drv})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close(context.Background())
	release := make(chan struct{})
	e.drv.CreateHook = func(context.Context, string) error { <-release; return nil }
	resp, err := svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a"})
	if err != nil || resp.Status != "provisioning" {
		t.Fatalf("create: %+v %v", resp, err)
	}
	code := "print(1)"
	if _, _, err := svc.Run(context.Background(), e.acct, resp.SandboxID, api.RunRequest{Code: &code}); sandbox.KindOf(err) != sandbox.KindSandboxNotReady {
		t.Fatalf("run while provisioning: %v", err)
	}
	close(release)
}

func TestReconcileAfterCrash(t *testing.T) {
	e := newEnv(t, "free")
	id := e.create(t, nil)
	blocked := e.run(t, id, "block", true)
	e.waitExec(t, 1)
	// A second service on the same store, as after a crash of the first (which is never closed
	// before the check).
	svc2 := e.open(t)
	sb, err := svc2.Get(context.Background(), e.acct, id)
	if err != nil || sb.Status != "destroyed" || *sb.DestroyReason != "server_restart" {
		t.Fatalf("after restart: %+v %v", sb, err)
	}
	r, _ := svc2.GetRun(context.Background(), e.acct, id, blocked.RunID)
	if r.Status != "error" {
		t.Fatalf("open run after restart: %s", r.Status)
	}
	if e.drv.Live(id) {
		t.Fatal("driver still holds the sandbox")
	}
}

func TestMountDirsAreDistinct(t *testing.T) {
	seen := map[string]string{}
	for _, p := range []string{"/a/b", "/a%b", "/a%2Fb", "/a", "/a b", "/a/b/c"} {
		d := sandbox.MountDir("/base", p)
		if other, dup := seen[d]; dup {
			t.Fatalf("%s and %s share host dir %s", p, other, d)
		}
		if filepath.Dir(d) != "/base/mounts" {
			t.Fatalf("%s maps outside the mounts dir: %s", p, d)
		}
		seen[d] = p
	}
}

func TestNetworkDecisionsAreCountedAndAudited(t *testing.T) {
	e := newEnv(t, "free")
	ctx := context.Background()
	id := e.create(t, &api.Config{Network: &api.Network{Allow: []string{"api.company.com", "*.data.company.com:443"}}})
	sb, _ := e.svc.Get(ctx, e.acct, id)
	if !strings.Contains(string(sb.Config), `"allow":["api.company.com","*.data.company.com:443"]`) {
		t.Fatalf("config: %s", sb.Config)
	}
	run := e.run(t, id, "block", true)
	e.waitExec(t, 1) // the run is executing
	for range 3 {
		e.svc.NetworkDecision(egress.Decision{SandboxID: id, Allowed: true, Host: "api.company.com", Port: 443, Proto: "https"})
	}
	for _, host := range []string{"evil.example", ""} {
		e.svc.NetworkDecision(egress.Decision{SandboxID: id, Host: host, Addr: netip.MustParseAddr("198.18.0.20"), Port: 53, Proto: "udp", Reason: "denied"})
	}
	// A summary of refusals not reported one by one counts for all of them.
	e.svc.NetworkDecision(egress.Decision{SandboxID: id, Proto: "udp", Reason: "40 more refused packets", Count: 40})
	e.svc.NetworkDecision(egress.Decision{SandboxID: "sbx_unknown", Proto: "udp"}) // ignored
	got, err := e.svc.CancelRun(ctx, e.acct, id, run.RunID)
	if err != nil || got.Network.Allowed != 3 || got.Network.Denied != 42 {
		t.Fatalf("run network counts: %+v %v", got.Network, err)
	}
	denied, _ := e.svc.Audit(ctx, e.acct, store.EventFilter{SandboxID: id, Type: "network.denied"}, 1, 10)
	if denied.Total != 3 || *denied.Events[0].RunID != run.RunID ||
		!strings.Contains(string(denied.Events[2].Detail), `"count":40`) ||
		!strings.Contains(string(denied.Events[0].Detail), `"address":"198.18.0.20"`) {
		t.Fatalf("network.denied events: %+v", denied)
	}
	allowed, _ := e.svc.Audit(ctx, e.acct, store.EventFilter{SandboxID: id, Type: "network.allowed"}, 1, 10)
	if allowed.Total != 1 || string(allowed.Events[0].Detail) != `{"count":3,"host":"api.company.com"}` {
		t.Fatalf("network.allowed events: %+v", allowed)
	}
}

type createdObs struct {
	mu   sync.Mutex
	seen [][2]string
}

func (o *createdObs) Created(mode, outcome string, _ time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.seen = append(o.seen, [2]string{mode, outcome})
}
func (o *createdObs) Destroyed(string, string)                  {}
func (o *createdObs) RunFinished(string, string, time.Duration) {}
func (o *createdObs) EgressDenied(int)                          {}
func (o *createdObs) QuotaRejected(string)                      {}

// The metrics see only the modes there are: a request's made-up mode cannot mint label values.
func TestObserverLabelsAreBounded(t *testing.T) {
	e := newEnv(t, "free")
	obs := &createdObs{}
	svc, err := sandbox.New(context.Background(), sandbox.Config{DataDir: t.TempDir(), Observer: obs,
		Images: []sandbox.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/nonexistent", Default: true}},
	}, e.st, map[string]driver.Driver{"container": e.drv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(context.Background()) })
	for _, mode := range []string{"", "x-made-up-1", "x-made-up-2"} {
		svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a", Mode: mode})
	}
	want := [][2]string{{"container", "ready"}, {"invalid", "invalid_request"}, {"invalid", "invalid_request"}}
	if fmt.Sprint(obs.seen) != fmt.Sprint(want) {
		t.Errorf("observed %v, want %v", obs.seen, want)
	}
}

// TestSandboxLost: a sandbox its driver says is gone (driver.GoneError: an evicted or failed pod)
// ends: the run that found it so is an error that says why (SandboxLost, not a ServiceError), the
// sandbox is destroyed with reason sandbox_lost and the driver's reason in its error, its driver
// resources are released, and later runs are refused as for any destroyed sandbox.
func TestSandboxLost(t *testing.T) {
	e := newEnv(t, "free")
	ctx := context.Background()
	id := e.create(t, nil)
	const why = "the sandbox's pod no longer runs, its pod was evicted by the node"
	e.drv.Lose(id, why)
	r := e.run(t, id, "print(1)", false)
	var perr struct{ Type, Message string }
	if r.Status != "error" || json.Unmarshal(r.Error, &perr) != nil || perr.Type != "SandboxLost" || !strings.Contains(perr.Message, why) {
		t.Fatalf("run in a lost sandbox: %s %s, want error SandboxLost with the reason", r.Status, r.Error)
	}
	var sb api.Sandbox
	waitfor.True(t, 10*time.Second, func() bool {
		sb, _ = e.svc.Get(ctx, e.acct, id)
		return sb.Status == "destroyed"
	})
	var serr struct{ Error, Message string }
	if sb.DestroyReason == nil || *sb.DestroyReason != sandbox.ReasonSandboxLost ||
		json.Unmarshal(sb.Error, &serr) != nil || serr.Error != "sandbox_lost" || serr.Message != why {
		t.Fatalf("lost sandbox: reason %v, error %s", sb.DestroyReason, sb.Error)
	}
	waitfor.True(t, 10*time.Second, func() bool { return !e.drv.Live(id) })
	code := "print(2)"
	if _, _, err := e.svc.Run(ctx, e.acct, id, api.RunRequest{Code: &code}); sandbox.KindOf(err) != sandbox.KindSandboxDestroyed {
		t.Fatalf("run after the sandbox was lost: %v", err)
	}
}
