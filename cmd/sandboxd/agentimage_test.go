package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAgentImage: `sandboxd agent-image --out DIR` writes an OCI layout whose index names the
// digest it prints; a non-empty directory, a missing --out and a missing agent are refused with
// what to do.
func TestAgentImage(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "sandbox-agent")
	if err := os.WriteFile(agent, []byte("\x7fELF not really an agent"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "layout")
	var printed bytes.Buffer
	if err := agentImage([]string{"--out", out, "--agent-bin", agent}, &printed); err != nil {
		t.Fatal(err)
	}
	digest := strings.TrimSpace(printed.String())
	var index struct {
		Manifests []struct{ Digest string }
	}
	b, err := os.ReadFile(filepath.Join(out, "index.json"))
	if err == nil {
		err = json.Unmarshal(b, &index)
	}
	if err != nil || len(index.Manifests) != 1 || index.Manifests[0].Digest != digest || !strings.HasPrefix(digest, "sha256:") {
		t.Fatalf("printed %q; index %s (%v)", digest, b, err)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--out", out, "--agent-bin", agent}, "not empty"},
		{[]string{"--agent-bin", agent}, "--out DIR"},
		{[]string{"--out", filepath.Join(dir, "other"), "--agent-bin", filepath.Join(dir, "none")}, "--agent-bin"},
	} {
		if err := agentImage(c.args, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("agent-image %v: %v, want an error naming %q", c.args, err, c.want)
		}
	}
}
