package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// sandboxdBinary is the built sandboxd: $SANDBOXD_BIN/sandboxd (make test), else built here.
func sandboxdBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("SANDBOXD_BIN"); dir != "" {
		return filepath.Join(dir, "sandboxd")
	}
	bin := filepath.Join(t.TempDir(), "sandboxd")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build sandboxd: %v\n%s", err, out)
	}
	return bin
}

// TestDoctorWithoutRuntime runs the binary's doctor with a PATH that has every tool it looks for
// but crun and runc: it must exit with status 1 and print the runtime's line with its fix.
func TestDoctorWithoutRuntime(t *testing.T) {
	bin := sandboxdBinary(t)
	path := t.TempDir()
	for _, tool := range []string{"unshare", "nsenter", "cat", "true", "mkfs.ext4", "debootstrap", "systemctl"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			for _, dir := range []string{"/usr/sbin", "/sbin"} {
				if _, serr := os.Stat(filepath.Join(dir, tool)); serr == nil {
					p, err = filepath.Join(dir, tool), nil
				}
			}
		}
		if err == nil {
			if err := os.Symlink(p, filepath.Join(path, tool)); err != nil {
				t.Fatal(err)
			}
		}
	}
	agent := filepath.Join(t.TempDir(), "sandbox-agent")
	if err := os.WriteFile(agent, []byte("stand-in"), 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(extra ...string) (string, int) {
		cmd := exec.Command(bin, append([]string{"doctor", "--data-dir", t.TempDir(), "--agent-bin", agent}, extra...)...)
		cmd.Env = append(os.Environ(), "PATH="+path)
		out, err := cmd.Output()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("run %s doctor: %v", bin, err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	out, code := run()
	if code != 1 {
		t.Errorf("exit status %d, want 1\n%s", code, out)
	}
	const want = "missing  OCI runtime      neither crun nor runc on PATH — fix: apt-get install crun\n"
	if !strings.Contains(out, want) {
		t.Errorf("output lacks %q:\n%s", want, out)
	}
	if !strings.Contains(out, "missing — not ready: fix the missing lines") {
		t.Errorf("no failing summary:\n%s", out)
	}

	out, code = run("--json")
	var rep struct {
		Results []struct{ Name, Status, Detail, Fix string }
		OK      bool
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("--json: %v\n%s", err, out)
	}
	found := false
	for _, r := range rep.Results {
		if r.Name == "OCI runtime" {
			found = r.Status == "missing" && r.Fix == "apt-get install crun"
		}
	}
	if code != 1 || rep.OK || !found {
		t.Errorf("--json: exit %d, ok %v, runtime result right %v\n%s", code, rep.OK, found, out)
	}
}

// TestMakeRunDoctorFirst: make run (scripts/run.sh) installs the dependencies and builds, then
// runs the doctor, and only then builds the image and serves.
func TestMakeRunDoctorFirst(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	out, err := exec.Command("make", "-n", "-C", "../..", "run", "DATA=somewhere").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "scripts/run.sh") {
		t.Fatalf("make -n run does not run scripts/run.sh: %v\n%s", err, out)
	}
	script, err := os.ReadFile("../../scripts/run.sh")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(script), "\n")
	at := func(word string) int {
		for i, l := range lines {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") && strings.Contains(l, word) {
				return i
			}
		}
		t.Fatalf("scripts/run.sh runs no %q", word)
		return -1
	}
	deps, build, doctor := at("scripts/install-deps.sh"), at("--no-print-directory build"), at("bin/sandboxd doctor --data-dir")
	image, serve := at("scripts/build-image.sh"), at("bin/sandboxd serve")
	if !(deps < doctor && build < doctor && doctor < image && doctor < serve) {
		t.Errorf("order in scripts/run.sh: deps %d, build %d, doctor %d, image %d, serve %d", deps, build, doctor, image, serve)
	}
}
