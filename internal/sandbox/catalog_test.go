package sandbox_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/fakedriver"
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

// TestCatalogWASM: a WASM image of the catalog (pure-Python packages on a configured WASM base)
// runs its base's root with its packages as the driver's SitePackages, is listed with its
// packages and its base's Python, and is refused — with the reason — while its base is not
// served.
func TestCatalogWASM(t *testing.T) {
	e := newEnv(t, "pro")
	pkgs := []api.ImagePackage{{Name: "thepkg", Version: "1.0"}}
	e.catalog = func() ([]sandbox.Image, error) {
		return []sandbox.Image{
			{Name: "team/wasm:1", Mode: "wasm", Base: "python:3.11-wasi", SitePackages: "/images/rootfs/sha256-cc", Digest: "sha256:cc",
				Python: "3.11", Packages: pkgs, Generation: "sha256:cc@1"},
			{Name: "team/orphan:1", Mode: "wasm", Base: "python:3.12-wasi", SitePackages: "/images/rootfs/sha256-dd", Digest: "sha256:dd", Generation: "sha256:dd@1"},
		}, nil
	}
	wasmDrv := fakedriver.New()
	svc, err := sandbox.New(context.Background(), sandbox.Config{
		DataDir: e.dir, Catalog: e.catalog, Images: []sandbox.Image{
			{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: "/nonexistent", Default: true},
			{Name: "python:3.11-wasi", Mode: "wasm", RootFS: "/wasm/base", Python: "3.11", Default: true, Packages: []api.ImagePackage{}},
		},
	}, e.st, map[string]driver.Driver{"container": e.drv, "wasm": wasmDrv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(context.Background()) })

	byName := map[string]api.Image{}
	for _, im := range svc.Images() {
		byName[im.Name] = im
	}
	if im := byName["team/wasm:1"]; im.Mode != "wasm" || im.Base != "python:3.11-wasi" || im.Python != "3.11" || im.Status != "ready" ||
		len(im.Packages) != 1 || im.Packages[0] != pkgs[0] || im.Digest != "sha256:cc" {
		t.Errorf("the WASM image is listed as %+v", im)
	}
	if im := byName["team/orphan:1"]; im.Status != "failed" || !strings.Contains(im.Error, "python:3.12-wasi") {
		t.Errorf("the image of a base not served is listed as %+v", im)
	}
	if im := byName["agentcop/agent-sandbox:latest"]; im.Packages == nil {
		t.Errorf("an image of unknown packages lists %#v, want []", im.Packages)
	}

	block := &api.Network{BlockOutbound: ptr(true)}
	resp, err := svc.Create(context.Background(), e.acct, api.CreateSandboxRequest{AgentID: "a", Mode: "wasm", Config: &api.Config{Image: "team/wasm:1", Network: block}})
	if err != nil {
		t.Fatal(err)
	}
	if spec, ok := wasmDrv.Spec(resp.SandboxID); !ok || spec.RootFS != "/wasm/base" || spec.SitePackages != "/images/rootfs/sha256-cc" {
		t.Errorf("the driver got %+v", spec)
	}
	if sb, err := svc.Get(context.Background(), e.acct, resp.SandboxID); err != nil || sb.ImageDigest != "sha256:cc" {
		t.Errorf("record: %+v, %v", sb, err)
	}
	for _, tc := range []struct {
		req  api.CreateSandboxRequest
		kind sandbox.Kind
	}{
		{api.CreateSandboxRequest{AgentID: "a", Mode: "wasm", Config: &api.Config{Image: "team/orphan:1", Network: block}}, sandbox.KindImageNotReady},
		{api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Image: "team/wasm:1"}}, sandbox.KindImageNotApproved},
	} {
		_, err := svc.Create(context.Background(), e.acct, tc.req)
		var se *sandbox.Error
		if !errors.As(err, &se) || se.Kind != tc.kind {
			t.Errorf("create %+v: %v, want %s", tc.req.Config, err, tc.kind)
		}
	}
}
