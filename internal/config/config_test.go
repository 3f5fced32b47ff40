package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

func TestParseServe(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "rootfs")
	if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/python3"), nil, 0o755); err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(dir, "sandbox-agent")
	if err := os.WriteFile(agent, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	badCfg := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(badCfg, []byte(`{"imagez": []}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfgFile := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	warm3, warmNeg := cfgFile("warm3.json", `{"warm_pool": 3}`), cfgFile("warmneg.json", `{"warm_pool": -1}`)
	img := "--image=" + DefaultImage + "=" + root
	agents := func(name, body string) []string {
		return []string{img, "--agent-bin", agent, "--config", cfgFile(name, `{"agents": `+body+`}`)}
	}
	cases := []struct {
		name    string
		args    []string
		errHas  string
		checkFn func(t *testing.T, c Config)
	}{
		{"ok, relative data dir made absolute", []string{img, "--agent-bin", agent, "--data-dir", "rel"}, "", func(t *testing.T, c Config) {
			if !filepath.IsAbs(c.DataDir) || filepath.Base(c.DataDir) != "rel" {
				t.Fatalf("data dir %q", c.DataDir)
			}
			if len(c.Images) != 1 || !c.Images[0].Default || c.Images[0].RootFS != root {
				t.Fatalf("images %+v", c.Images)
			}
		}},
		{"warm pool default", []string{img, "--agent-bin", agent}, "", func(t *testing.T, c Config) {
			if c.WarmPool != DefaultWarmPool {
				t.Fatalf("warm pool %d, want %d", c.WarmPool, DefaultWarmPool)
			}
		}},
		{"warm pool from the file", []string{img, "--agent-bin", agent, "--config", warm3}, "", func(t *testing.T, c Config) {
			if c.WarmPool != 3 {
				t.Fatalf("warm pool %d, want 3", c.WarmPool)
			}
		}},
		{"warm pool flag over the file", []string{img, "--agent-bin", agent, "--config", warm3, "--warm-pool", "0"}, "", func(t *testing.T, c Config) {
			if c.WarmPool != 0 {
				t.Fatalf("warm pool %d, want 0 (off)", c.WarmPool)
			}
		}},
		{"warm pool negative in the file", []string{img, "--agent-bin", agent, "--config", warmNeg}, "warm_pool must not be negative", nil},
		{"warm pool too big", []string{img, "--agent-bin", agent, "--warm-pool", "65"}, "at most 64", nil},
		{"warm pool negative", []string{img, "--agent-bin", agent, "--warm-pool", "-1"}, "--warm-pool -1: want 0 (no warm pool) to 64", nil},
		{"no image", []string{"--agent-bin", agent}, "no approved image", nil},
		{"bad image flag", []string{"--image", "x", "--agent-bin", agent}, "NAME=ROOTFS_DIR", nil},
		{"not a rootfs", []string{"--image", "x=" + dir, "--agent-bin", agent}, "no usr/bin/python3", nil},
		{"no agent", []string{img, "--agent-bin", filepath.Join(dir, "nope")}, "sandbox-agent binary not found", nil},
		{"unknown flag", []string{img, "--colour"}, "flag provided but not defined", nil},
		{"unknown config field", []string{img, "--agent-bin", agent, "--config", badCfg}, "unknown field", nil},
		{"stray argument", []string{img, "extra"}, "takes no arguments", nil},
		{"wasm image built by the server", []string{img, "--agent-bin", agent, "--wasm-build", DefaultWasmImage + "=scripts/build-python-wasm.sh --x=1"}, "", func(t *testing.T, c Config) {
			if len(c.Images) != 2 || c.Images[1].Name != DefaultWasmImage || c.Images[1].Mode != "wasm" || !c.Images[1].Default || c.Images[1].RootFS != "" {
				t.Fatalf("images %+v", c.Images)
			}
			if len(c.Builds) != 1 || c.Builds[0] != (Build{Image: DefaultWasmImage, Command: "scripts/build-python-wasm.sh --x=1"}) {
				t.Fatalf("builds %+v", c.Builds)
			}
		}},
		{"agents", agents("agents.json", `{"data-processor": {"url": "http://127.0.0.1:9000/agent", "headers": {"Authorization": "Bearer x"}, "timeout": 2.5},
			"other": {"url": "https://agents.example/x"}}`), "", func(t *testing.T, c Config) {
			dp, other := c.Agents["data-processor"], c.Agents["other"]
			if len(c.Agents) != 2 || dp.URL != "http://127.0.0.1:9000/agent" || dp.Headers["Authorization"] != "Bearer x" ||
				dp.Timeout != 2500*time.Millisecond || other.Timeout != 0 {
				t.Fatalf("agents %+v", c.Agents)
			}
		}},
		{"agent: not an agent_id", agents("a1.json", `{"a b": {"url": "http://h/"}}`), `agents["a b"]: not an agent_id`, nil},
		{"agent: no url", agents("a2.json", `{"a": {}}`), `agents["a"]: url "": want an absolute http:// or https:// URL`, nil},
		{"agent: not http", agents("a3.json", `{"a": {"url": "file:///etc/passwd"}}`), `want an absolute http:// or https:// URL`, nil},
		{"agent: unknown field", agents("a4.json", `{"a": {"url": "http://h/", "secret": "x"}}`), `unknown field "secret"`, nil},
		{"agent: bad header", agents("a5.json", `{"a": {"url": "http://h/", "headers": {"X": "a\r\nB: c"}}}`), `header "X"`, nil},
		{"agent: our header", agents("a6.json", `{"a": {"url": "http://h/", "headers": {"content-type": "text/plain"}}}`), `is sandboxd's to set`, nil},
		{"agent: timeout", agents("a7.json", `{"a": {"url": "http://h/", "timeout": 0}}`), `agents["a"].timeout 0: want 1 to 600 seconds`, nil},
		{"kubernetes", []string{img, "--agent-bin", agent, "--driver", "kubernetes", "--kubeconfig", "/k", "--namespace", "sbx",
			"--agent-image", "r/agent@sha256:ab", "--config", cfgFile("k8s.json", `{"cluster_images": {"`+DefaultImage+`": {"ref": "r/py@sha256:cd", "runtime_class": "gvisor"}}}`)}, "", func(t *testing.T, c Config) {
			if c.Driver != "kubernetes" || c.Kubeconfig != "/k" || c.Namespace != "sbx" || c.AgentImage != "r/agent@sha256:ab" ||
				c.ClusterImages[DefaultImage] != (driver.ClusterImage{Ref: "r/py@sha256:cd", RuntimeClass: "gvisor"}) {
				t.Fatalf("config %+v", c)
			}
		}},
		{"kubernetes: in its cluster, images by reference", []string{"--image", DefaultImage, "--agent-bin", agent, "--driver", "kubernetes", "--agent-image", "r/a@sha256:ab",
			"--ids-slot", "3/8", "--config", cfgFile("k8s3.json", `{"cluster_images": {"`+DefaultImage+`": {"ref": "r/py@sha256:cd"}, "other": {"ref": "r/o@sha256:ef"}},
			"images": [{"name": "other"}], "ids": {"first": 1073741824, "sandboxes": 800}}`)}, "", func(t *testing.T, c Config) {
			if c.Kubeconfig != "" || len(c.Images) != 2 || c.HostRuns() {
				t.Fatalf("config %+v", c)
			}
			for _, im := range c.Images {
				want := c.ClusterImages[im.Name].Ref
				if im.RootFS != want || !IsClusterRef(im.RootFS) || !strings.HasSuffix(want, "@"+im.Digest) || im.Default != (im.Name == DefaultImage) {
					t.Errorf("image %+v, want root %s, its digest, default only for %s", im, want, DefaultImage)
				}
			}
			if want := (sandbox.IDRange{First: 1<<30 + 3*100*driver.IDsPerSandbox, Sandboxes: 100}); c.IDs != want {
				t.Errorf("ids %+v, want %+v (the 4th of 8 parts)", c.IDs, want)
			}
		}},
		{"kubernetes: image not in cluster_images", []string{"--image", "nope", "--agent-bin", agent, "--driver", "kubernetes", "--agent-image", "r/a@sha256:ab"},
			`image nope has no root filesystem on this host: name it in the config file's cluster_images`, nil},
		{"container: image without a root", []string{"--image", DefaultImage, "--agent-bin", agent}, "want NAME=ROOTFS_DIR", nil},
		{"container: file image without a root", []string{img, "--agent-bin", agent, "--config", cfgFile("noroot.json", `{"images": [{"name": "x"}]}`)}, "every image needs a name and a rootfs", nil},
		{"ids slot, default range", []string{img, "--agent-bin", agent, "--ids-slot", "7/8"}, "", func(t *testing.T, c Config) {
			if want := (sandbox.IDRange{First: 1<<30 + 7*1024*driver.IDsPerSandbox, Sandboxes: 1024}); c.IDs != want || !c.HostRuns() {
				t.Errorf("ids %+v, want %+v; host runs %v", c.IDs, want, c.HostRuns())
			}
		}},
		{"ids slot out of range", []string{img, "--agent-bin", agent, "--ids-slot", "8/8"}, "want K/N with 0 <= K < N", nil},
		{"ids slot not a slot", []string{img, "--agent-bin", agent, "--ids-slot", "a"}, "want K/N with 0 <= K < N", nil},
		{"ids slot too small", []string{img, "--agent-bin", agent, "--ids-slot", "0/9", "--config", cfgFile("ids8.json", `{"ids": {"first": 1073741824, "sandboxes": 8}}`)}, "do not split into 9 parts", nil},
		{"kubernetes: agent image by tag", []string{img, "--agent-bin", agent, "--driver", "kubernetes", "--kubeconfig", "/k", "--agent-image", "r/a:1"}, "pinned by digest", nil},
		{"kubernetes: image by tag", []string{img, "--agent-bin", agent, "--driver", "kubernetes", "--kubeconfig", "/k", "--agent-image", "r/a@sha256:ab",
			"--config", cfgFile("k8s2.json", `{"cluster_images": {"x": {"ref": "r/py:1"}}}`)}, `cluster_images["x"].ref`, nil},
		{"unknown driver", []string{img, "--agent-bin", agent, "--driver", "vm"}, `--driver "vm"`, nil},
		{"bad wasm build flag", []string{img, "--agent-bin", agent, "--wasm-build", "python:3.11-wasi"}, "NAME=COMMAND", nil},
		{"wasm build of an approved image", []string{img, "--agent-bin", agent, "--wasm-build", DefaultImage + "=true"}, "approved already", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := ParseServe(c.args)
			if c.errHas == "" {
				if err != nil {
					t.Fatal(err)
				}
				c.checkFn(t, cfg)
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.errHas) {
				t.Fatalf("err %v, want one containing %q", err, c.errHas)
			}
		})
	}
}

// TestStoreURL: --store wins; without it $SANDBOXD_STORE (a pod's Secret) is the store; either
// is checked.
func TestStoreURL(t *testing.T) {
	for _, c := range []struct{ flag, env, want, errHas string }{
		{"", "", "", ""},
		{"postgres://a@h/db", "postgres://b@h/db", "postgres://a@h/db", ""},
		{"", "postgres://b@h/db", "postgres://b@h/db", ""},
		{"", "mysql://h/db", "", `--store "mysql://h/db"`},
	} {
		t.Setenv("SANDBOXD_STORE", c.env)
		got, err := StoreURL(c.flag)
		if c.errHas != "" {
			if err == nil || !strings.Contains(err.Error(), c.errHas) {
				t.Errorf("StoreURL(%q) with env %q: err %v, want %q", c.flag, c.env, err, c.errHas)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("StoreURL(%q) with env %q = %q, %v; want %q", c.flag, c.env, got, err, c.want)
		}
	}
}

// TestDeployManifestArgs: the serve arguments of deploy/kubernetes/sandboxd.yaml, with what the
// pod's environment fills in, parse with deploy/kubernetes/config.example.json as its config: an
// in-cluster replica, no host set-up, its StatefulSet index's part of the id range.
func TestDeployManifestArgs(t *testing.T) {
	b, err := os.ReadFile("../../deploy/kubernetes/sandboxd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	in := false
	for _, l := range strings.Split(string(b), "\n") {
		switch s := strings.TrimSpace(l); {
		case s == "args:":
			in = true
		case in && strings.HasPrefix(s, "- "):
			a := strings.TrimPrefix(s, "- ")
			a = strings.NewReplacer("$(POD_IP)", "10.244.0.9", "$(POD_NAMESPACE)", "sbx", "$(POD_INDEX)", "1",
				"sandboxd-image", "r/sandboxd@sha256:ab", "/etc/sandboxd/config.json", "../../deploy/kubernetes/config.example.json").Replace(a)
			args = append(args, a)
		default:
			in = false
		}
	}
	if len(args) == 0 || args[0] != "serve" {
		t.Fatalf("args %q: want serve's", args)
	}
	agent := filepath.Join(t.TempDir(), "sandbox-agent")
	if err := os.WriteFile(agent, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SANDBOXD_STORE", "postgres://sandboxd@postgres/sandboxd")
	c, err := ParseServe(append(args[1:], "--agent-bin", agent))
	if err != nil {
		t.Fatal(err)
	}
	if c.Driver != "kubernetes" || c.Kubeconfig != "" || c.Namespace != "sbx" || c.Store == "" || c.HostRuns() ||
		c.Advertise != "http://10.244.0.9:8080" || len(c.Images) != 1 || !IsClusterRef(c.Images[0].RootFS) || !c.Images[0].Default ||
		c.IDs != (sandbox.IDRange{First: 1<<30 + 1024*driver.IDsPerSandbox, Sandboxes: 1024}) {
		t.Fatalf("config %+v", c)
	}
}
