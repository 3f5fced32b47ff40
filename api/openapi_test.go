package api_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sandboxd/sandboxd/client/clienttest"
)

// EnvNodeModules names the node_modules directory scripts/build-node-tools.sh installs the
// versions of package-lock.json into (make test sets it).
const EnvNodeModules = "SANDBOXD_NODE_MODULES"

// nodeModules returns EnvNodeModules, or skips t (fails it when CI is set) when it or node is missing.
func nodeModules(t *testing.T) string {
	t.Helper()
	dir := os.Getenv(EnvNodeModules)
	if dir == "" {
		clienttest.Unavailable(t, "needs "+EnvNodeModules+"=$(scripts/build-node-tools.sh) (make test sets it)")
	}
	if _, err := os.Stat(filepath.Join(dir, ".bin")); err != nil {
		clienttest.Unavailable(t, EnvNodeModules+" is not what scripts/build-node-tools.sh installs: "+err.Error())
	}
	if _, err := exec.LookPath("node"); err != nil {
		clienttest.Unavailable(t, "needs node on PATH (scripts/install-deps.sh)")
	}
	return dir
}

// node runs the command tool of node_modules nm in dir and fails t, with its output, unless it
// succeeds.
func node(t *testing.T, nm, dir, tool string, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(nm, ".bin", tool), args...)
	cmd.Dir = dir
	// No telemetry, update checks or colours: the machine may have no network, the log no terminal.
	cmd.Env = append(os.Environ(), "REDOCLY_TELEMETRY=off", "REDOCLY_SUPPRESS_UPDATE_NOTICE=true", "NO_COLOR=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
	}
}

// TestRedoclyLint: openapi.json passes `redocly lint` under redocly.yaml (Redocly's recommended
// ruleset, every warning an error) with nothing ignored but what .redocly.lint-ignore.yaml lists.
func TestRedoclyLint(t *testing.T) {
	t.Parallel()
	node(t, nodeModules(t), ".", "redocly", "lint", "openapi.json", "--config", "redocly.yaml")
}

// TestTypeScriptClient: the types openapi-typescript generates from openapi.json type-check with
// testdata/client.ts, a create/run/poll/upload sequence over openapi-fetch that also holds calls
// the types must refuse (tsc --noEmit, strict).
func TestTypeScriptClient(t *testing.T) {
	t.Parallel()
	nm := nodeModules(t)
	doc, err := filepath.Abs("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, f := range []string{"client.ts", "tsconfig.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// openapi-fetch's types, found from client.ts as a bundler would.
	if err := os.Symlink(nm, filepath.Join(dir, "node_modules")); err != nil {
		t.Fatal(err)
	}
	// Run in dir, where no redocly.yaml is: openapi-typescript would read one.
	node(t, nm, dir, "openapi-typescript", doc, "--default-non-nullable", "false", "--output", "openapi.ts")
	node(t, nm, dir, "tsc", "--project", "tsconfig.json")
}
