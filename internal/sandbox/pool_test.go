package sandbox_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// newWarmEnv is newEnv with a service that keeps warm sandboxes of each shape.
func newWarmEnv(t *testing.T, plan string, warm int) *env {
	t.Helper()
	e := newEnv(t, plan)
	if err := e.svc.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.warm = warm
	e.svc = e.open(t)
	return e
}

// settle waits until no warm sandbox is being provisioned.
func (e *env) settle(t *testing.T) {
	t.Helper()
	select {
	case <-e.svc.WarmSettled():
	case <-time.After(10 * time.Second):
		t.Fatal("the warm pool did not settle")
	}
}

// unowned lists the sandboxes the driver holds that no record names: the warm ones.
func (e *env) unowned(t *testing.T) []string {
	t.Helper()
	ids, _ := e.drv.List(context.Background())
	var out []string
	for _, id := range ids {
		if _, err := e.st.GetSandbox(context.Background(), e.acct.ID, id); err != nil {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// warmReady reports whether sandbox id's ready event says it came from the warm pool.
func (e *env) warmReady(t *testing.T, id string) bool {
	t.Helper()
	evs, err := e.svc.Audit(context.Background(), e.acct, store.EventFilter{SandboxID: id, Type: "sandbox.ready"}, 1, 10)
	if err != nil || len(evs.Events) != 1 {
		t.Fatalf("ready events of %s: %v %v", id, evs, err)
	}
	var d struct{ Warm bool }
	if err := json.Unmarshal(evs.Events[0].Detail, &d); err != nil {
		t.Fatal(err)
	}
	return d.Warm
}

func allow(hosts ...string) *api.Config {
	return &api.Config{Network: &api.Network{Allow: hosts}, Filesystem: &api.Filesystem{ReadWrite: []string{"/workspace"}}}
}

func TestWarmPool(t *testing.T) {
	e := newWarmEnv(t, "pro", 2)
	a := e.create(t, allow("a.example.com"))
	if e.warmReady(t, a) {
		t.Fatal("the first create of a shape found a warm sandbox")
	}
	e.settle(t)
	warm := e.unowned(t)
	if len(warm) != 2 {
		t.Fatalf("warm sandboxes after the first create: %v, want 2", warm)
	}
	if n := e.svc.LiveCounts()[[2]string{"container", "warm"}]; n != 2 {
		t.Fatalf("LiveCounts reports %d warm sandboxes, want 2", n)
	}
	for _, id := range warm { // provisioned with their host directories, owned by no one
		if st, err := os.Stat(filepath.Join(e.dir, "sandboxes", id, "mounts", "workspace")); err != nil || !st.IsDir() {
			t.Fatalf("warm sandbox %s has no host dir for /workspace: %v", id, err)
		}
	}

	// Same shape, another allow list: a warm sandbox, given this create's policy.
	b := e.create(t, allow("b.example.com"))
	if !slices.Contains(warm, b) || !e.warmReady(t, b) {
		t.Fatalf("create got %s, not one of the warm %v", b, warm)
	}
	sp, _ := e.drv.Spec(b)
	if len(sp.Network.Rules) != 1 || sp.Network.Rules[0].Host != "b.example.com" {
		t.Fatalf("the warm sandbox enforces %+v, want b.example.com only", sp.Network)
	}
	if r := e.run(t, b, "hello", false); r.Status != "completed" {
		t.Fatalf("run in a warm sandbox: %+v", r)
	}
	e.settle(t)
	if n := len(e.unowned(t)); n != 2 {
		t.Fatalf("the pool was not refilled: %d warm", n)
	}

	// Another shape (block_outbound false; other paths) is not served by these.
	c := e.create(t, &api.Config{Network: &api.Network{BlockOutbound: ptr(false)}})
	if slices.Contains(warm, c) || e.warmReady(t, c) {
		t.Fatalf("a create of another shape got a warm sandbox of the first")
	}

	// Close destroys the warm sandboxes and their directories with everything else.
	if err := e.svc.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ids, _ := e.drv.List(context.Background()); len(ids) != 0 {
		t.Fatalf("left in the driver after Close: %v", ids)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.dir, "sandboxes")); len(ents) != 0 {
		t.Fatalf("sandbox dirs left after Close: %d", len(ents))
	}
}

func TestWarmPoolQuota(t *testing.T) {
	e := newWarmEnv(t, "free", 2) // free: three live sandboxes
	for range 3 {
		e.create(t, nil)
	}
	e.settle(t)
	warm := e.unowned(t)
	_, err := e.svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "agent-1"})
	if sandbox.KindOf(err) != sandbox.KindConcurrencyLimit {
		t.Fatalf("second create on the free plan: %v", err)
	}
	e.settle(t)
	if got := e.unowned(t); !slices.Equal(got, warm) {
		t.Fatalf("a refused create lost or used a warm sandbox: %v, was %v", got, warm)
	}
}

func TestWarmPoolShapesAndResize(t *testing.T) {
	e := newWarmEnv(t, "pro", 1)
	// Six shapes: only the four asked for last stay warm.
	for _, cpu := range []string{"0.1", "0.2", "0.3", "0.4", "0.5", "0.6"} {
		e.create(t, &api.Config{Resources: &api.Resources{CPU: cpu}})
		e.settle(t)
	}
	// Evicted shapes are destroyed in the background.
	waitfor.True(t, 10*time.Second, func() bool { return len(e.unowned(t)) == 4 }) // one per shape kept
	e.svc.SetWarmPool(0)
	waitfor.True(t, 10*time.Second, func() bool { return len(e.unowned(t)) == 0 }) // none with the pool off
	if id := e.create(t, &api.Config{Resources: &api.Resources{CPU: "0.6"}}); e.warmReady(t, id) {
		t.Fatal("a create found a warm sandbox with the pool off")
	}
}

func TestWarmPoolProvisioningFails(t *testing.T) {
	e := newWarmEnv(t, "pro", 2)
	e.drv.CreateHook = func(ctx context.Context, id string) error {
		if _, err := e.st.GetSandbox(ctx, e.acct.ID, id); err != nil {
			return fakedriver.ErrInjected // the pool's (no record names them) fail
		}
		return nil
	}
	e.create(t, nil)
	e.settle(t)
	if w := e.unowned(t); len(w) != 0 {
		t.Fatalf("failed warm provisioning left %v", w)
	}
	// Creates still work (provisioned on demand) while the pool waits to retry.
	if id := e.create(t, nil); e.warmReady(t, id) {
		t.Fatal("got a warm sandbox from a pool whose provisioning failed")
	}
}

// A warm sandbox that cannot take its owner's policy (say, its agent died while it waited) is
// destroyed and the create provisions afresh under the same ID.
func TestWarmPoolAdoptFails(t *testing.T) {
	e := newWarmEnv(t, "pro", 1)
	e.create(t, allow("a.example.com"))
	e.settle(t)
	warm := e.unowned(t)
	e.drv.SetNetworkErr = fakedriver.ErrInjected
	id := e.create(t, allow("b.example.com"))
	e.drv.SetNetworkErr = nil
	if !slices.Contains(warm, id) || e.warmReady(t, id) {
		t.Fatalf("create got %s (warm were %v); want the warm ID, provisioned afresh", id, warm)
	}
	if sp, ok := e.drv.Spec(id); !ok || len(sp.Network.Rules) != 1 || sp.Network.Rules[0].Host != "b.example.com" {
		t.Fatalf("the sandbox enforces %+v, want b.example.com only", sp.Network)
	}
	if !slices.Contains(e.drv.Destroyed, id) {
		t.Errorf("the unusable warm sandbox %s was not destroyed first", id)
	}
	if r := e.run(t, id, "hello", false); r.Status != "completed" {
		t.Fatalf("run: %+v", r)
	}
}

// TestWarmPoolRefillsAfterFirstRun: the refill for a taken warm sandbox waits for that sandbox's
// first run (it would compete with it for the CPU) and the quiet after it, or for the grace when
// no run comes.
func TestWarmPoolRefillsAfterFirstRun(t *testing.T) {
	e := newWarmEnv(t, "pro", 1)
	e.create(t, allow("a.example.com"))
	e.settle(t) // its refill: after the grace (no run)
	if n := len(e.unowned(t)); n != 1 {
		t.Fatalf("%d warm sandboxes, want 1", n)
	}
	// A refill is a driver's Create: it must come after the driver has answered the first run.
	var early atomic.Bool
	e.drv.CreateHook = func(context.Context, string) error {
		if e.drv.Ended() == 0 {
			early.Store(true)
		}
		return nil
	}
	b := e.create(t, allow("b.example.com"))
	if !e.warmReady(t, b) {
		t.Fatal("the create did not take the warm sandbox")
	}
	if r := e.run(t, b, "hello", false); r.Status != "completed" {
		t.Fatalf("run: %+v", r)
	}
	e.settle(t)
	if early.Load() {
		t.Fatal("the pool refilled before the taken sandbox's first run")
	}
	if n := len(e.unowned(t)); n != 1 {
		t.Fatalf("the pool was not refilled after the first run: %d warm", n)
	}
}

// TestWarmPoolRefillWaitsForQuiet: runs made back to back after a create (what agents do) hold
// the refill back: it starts once the sandbox has gone quiet, not after its first run.
func TestWarmPoolRefillWaitsForQuiet(t *testing.T) {
	e := newWarmEnv(t, "pro", 1)
	e.create(t, allow("a.example.com"))
	e.settle(t) // the pool is full
	e.svc.SetWarmRefillWait(time.Hour, time.Hour)
	b := e.create(t, allow("b.example.com"))
	if !e.warmReady(t, b) {
		t.Fatal("the create did not take the warm sandbox")
	}
	for i := 0; i < 3; i++ {
		if r := e.run(t, b, "hello", false); r.Status != "completed" {
			t.Fatalf("run %d: %+v", i, r)
		}
	}
	select {
	case <-e.svc.WarmSettled():
		t.Fatal("the pool refilled while the taken sandbox was still running back to back")
	default:
	}
	if n := len(e.unowned(t)); n != 0 {
		t.Fatalf("%d warm sandboxes before the taken sandbox went quiet, want 0", n)
	}
}

// TestWarmPoolImageRemoved: the warm sandboxes of an image of the catalog (the operator's image
// store) belong to no one, so they neither block its removal nor outlive it: once the catalog
// no longer lists the image, the next read of the catalog (a create, a listing, or the pool's own
// watch) destroys them; the image imported again under its name — same digest, same root path,
// another unpacking — never gets one made from the removed root.
func TestWarmPoolImageRemoved(t *testing.T) {
	e := newWarmEnv(t, "pro", 0)
	var mu sync.Mutex
	img := sandbox.Image{Name: "team/app:1", Mode: "container", RootFS: "/images/rootfs/sha256-aa", Digest: "sha256:aa", Generation: "sha256:aa@1"}
	cat := []sandbox.Image{img}
	set := func(ims ...sandbox.Image) {
		mu.Lock()
		defer mu.Unlock()
		cat = ims
	}
	e.catalog = func() ([]sandbox.Image, error) {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(cat), nil
	}
	e.svc.Close(context.Background())
	e.warm = 1
	e.svc = e.open(t)
	cfg := &api.Config{Image: img.Name}
	e.create(t, cfg)
	e.settle(t)
	warm := e.unowned(t)
	if len(warm) != 1 {
		t.Fatalf("warm sandboxes: %v, want 1", warm)
	}

	set() // images rm
	e.svc.Images()
	waitfor.True(t, 10*time.Second, func() bool { return len(e.unowned(t)) == 0 })

	img.Generation = "sha256:aa@2" // images import of the same image again
	set(img)
	b := e.create(t, cfg)
	if b == warm[0] || e.warmReady(t, b) {
		t.Fatalf("the create of the image imported again got a warm sandbox (%s) of the removed one", b)
	}
	e.settle(t)
	if w := e.unowned(t); len(w) != 1 {
		t.Fatalf("warm sandboxes of the new generation: %v, want 1", w)
	}

	// Removed while no create comes: the pool's watch of the catalog destroys them.
	set()
	waitfor.True(t, 10*time.Second, func() bool { return len(e.unowned(t)) == 0 })
	if sp, ok := e.drv.Spec(b); !ok || sp.RootFS != img.RootFS {
		t.Errorf("the owned sandbox %s was touched: %+v %v", b, sp, ok)
	}
}
