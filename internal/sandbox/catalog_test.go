package sandbox_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// TestCatalog: the catalog's images (the operator's image store) are approved beside the
// configured ones, read at each lookup; a configured image shadows a catalog one of its name; a
// sandbox's record keeps the digest of the image it ran.
func TestCatalog(t *testing.T) {
	e := newEnv(t, "pro")
	var mu sync.Mutex
	cat := []sandbox.Image{
		{Name: "team/app:1", Mode: "container", RootFS: "/images/rootfs/sha256-aa", Digest: "sha256:aa", Size: 42, Python: "3.12", Runtime: "runsc"},
		{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/shadowed", Digest: "sha256:bb", Default: true},
	}
	var catErr error
	e.catalog = func() ([]sandbox.Image, error) {
		mu.Lock()
		defer mu.Unlock()
		return cat, catErr
	}
	e.svc = e.open(t)

	ims := e.svc.Images()
	if len(ims) != 2 || ims[1].Name != "team/app:1" || ims[1].Digest != "sha256:aa" || ims[1].Size != 42 ||
		ims[1].Python != "3.12" || ims[1].Runtime != "runsc" || ims[1].Default || ims[1].Status != "ready" {
		t.Fatalf("Images: %+v", ims)
	}
	if ims[0].Digest == "sha256:bb" {
		t.Errorf("the catalog's image shadowed the configured one: %+v", ims[0])
	}
	id := e.create(t, &api.Config{Image: "team/app:1"})
	if spec, _ := e.drv.Spec(id); spec.RootFS != "/images/rootfs/sha256-aa" {
		t.Errorf("the driver got root %q", spec.RootFS)
	}
	sb, err := e.svc.Get(context.Background(), e.acct, id)
	if err != nil || sb.ImageDigest != "sha256:aa" {
		t.Fatalf("record: digest %q, %v", sb.ImageDigest, err)
	}
	if def := e.create(t, nil); def == "" {
		t.Fatal("no default create")
	} else if spec, _ := e.drv.Spec(def); spec.RootFS != "/nonexistent" {
		t.Errorf("the default image's root is %q: the catalog shadowed the configuration", spec.RootFS)
	}

	// Removed from the catalog (images rm): no longer approved, at once.
	mu.Lock()
	cat = cat[1:]
	mu.Unlock()
	_, err = e.svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Image: "team/app:1"}})
	var se *sandbox.Error
	if !errors.As(err, &se) || se.Kind != sandbox.KindImageNotApproved {
		t.Fatalf("create with a removed image: %v", err)
	}
	// A catalog that cannot be read leaves the configured images serving.
	mu.Lock()
	catErr = errors.New("index unreadable")
	mu.Unlock()
	if ims := e.svc.Images(); len(ims) != 1 {
		t.Errorf("Images with a broken catalog: %+v", ims)
	}
}
