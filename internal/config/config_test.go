package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
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
		{"kubernetes: no kubeconfig", []string{img, "--agent-bin", agent, "--driver", "kubernetes", "--agent-image", "r/a@sha256:ab"}, "--kubeconfig", nil},
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
