// Package pythonsdk_test runs the Python SDK's tests from `go test ./...` (and so `make test`):
// the offline ones against the SDK's own fake server, and the live ones against a real sandboxd
// started like test/e2e starts it (see package clienttest: root, SANDBOXD_BIN, SANDBOXD_ROOTFS;
// skipped without them, failed when CI is set). It also checks that the package installs with
// pip from its pyproject.toml, offline.
package pythonsdk_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/client/clienttest"
)

// python returns a python3 of version 3.9 or later, or skips (fails under CI).
func python(t *testing.T) string {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		clienttest.Unavailable(t, "needs python3 on PATH")
	}
	out, err := exec.Command(py, "-c", "import sys; print(sys.version_info >= (3, 9))").Output()
	if err != nil || strings.TrimSpace(string(out)) != "True" {
		clienttest.Unavailable(t, "needs python3 >= 3.9 ("+py+")")
	}
	return py
}

// unittest runs `python3 -m unittest MODULE` in this directory with env added and returns its
// output; it fails the test when the tests fail or (with noSkips) when any was skipped.
func unittest(t *testing.T, py, module string, noSkips bool, env ...string) {
	t.Helper()
	cmd := exec.Command(py, "-B", "-X", "dev", "-m", "unittest", "-v", module)
	cmd.Env = append(cleanEnv(), append([]string{"PYTHONDONTWRITEBYTECODE=1"}, env...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python3 -m unittest %s: %v\n%s", module, err, out)
	}
	summary := regexp.MustCompile(`(?m)^Ran (\d+) tests?.*\n\n(OK.*)$`).FindSubmatch(out)
	if summary == nil || string(summary[1]) == "0" {
		t.Fatalf("python3 -m unittest %s ran no test:\n%s", module, out)
	}
	if noSkips && strings.Contains(string(summary[2]), "skipped") {
		t.Fatalf("python3 -m unittest %s skipped tests that must run:\n%s", module, out)
	}
	t.Logf("%s: ran %s tests, %s", module, summary[1], summary[2])
}

// cleanEnv is the environment without the variables the SDK reads (AGENTCOP_API_KEY would win
// over the test server's key).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "SANDBOXD_URL", "SANDBOXD_API_KEY", "AGENTCOP_API_KEY", "SANDBOXD_TEST_LIVE", "SANDBOXD_TEST_MAX_UPLOAD":
		default:
			env = append(env, kv)
		}
	}
	return env
}

func TestOffline(t *testing.T) {
	unittest(t, python(t), "tests.test_offline", true)
}

func TestLive(t *testing.T) {
	py := python(t)
	const maxUpload = 4 << 20
	srv := clienttest.Start(t, clienttest.Options{Pool: "10.223.0.0/16", Config: map[string]any{"max_upload_bytes": maxUpload}})
	unittest(t, py, "tests.test_live", true,
		"SANDBOXD_URL="+srv.URL, "SANDBOXD_API_KEY="+srv.Key, "SANDBOXD_TEST_LIVE=1", "SANDBOXD_TEST_MAX_UPLOAD=4194304")
}

// TestPipInstall installs the package from a copy of this directory with pip, offline (no build
// isolation: the setuptools and wheel already installed build it), and imports it from elsewhere.
// It uses the first python3 that has pip, setuptools and wheel: the one on PATH, else Debian's.
func TestPipInstall(t *testing.T) {
	python(t)
	var py string
	for _, cand := range []string{"python3", "/usr/bin/python3"} {
		if exec.Command(cand, "-m", "pip", "--version").Run() == nil &&
			exec.Command(cand, "-c", "import setuptools, wheel").Run() == nil {
			py = cand
			break
		}
	}
	if py == "" {
		clienttest.Unavailable(t, "needs a python3 with pip, setuptools and wheel (Debian: apt-get install python3-pip python3-wheel)")
	}
	src := t.TempDir() // a copy: pip builds in the source tree
	for _, f := range []string{"pyproject.toml", "README.md", "sandboxd"} {
		if out, err := exec.Command("cp", "-r", f, src).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v %s", f, err, out)
		}
	}
	target := filepath.Join(t.TempDir(), "site")
	cmd := exec.Command(py, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", "--no-deps",
		"--disable-pip-version-check", "--target", target, src)
	cmd.Env = append(cleanEnv(), "PYTHONDONTWRITEBYTECODE=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pip install: %v\n%s", err, out)
	}
	check := exec.Command(py, "-c", "import sandboxd, os; from sandboxd import Sandbox, Client, SandboxdError; "+
		"assert os.path.exists(os.path.join(os.path.dirname(sandboxd.__file__), 'py.typed')); print(sandboxd.__version__)")
	check.Dir = t.TempDir()
	check.Env = append(cleanEnv(), "PYTHONPATH="+target, "PYTHONDONTWRITEBYTECODE=1")
	out, err := check.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "0.1.0" {
		t.Fatalf("import the installed package: %v\n%s", err, out)
	}
}
