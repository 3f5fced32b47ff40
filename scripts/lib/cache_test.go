// Package cache_test tests scripts/lib/cache.sh, the cache boilerplate the build scripts source,
// by running it with bash on a temporary cache.
package cache_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// bash runs script (with cache.sh sourced, as if it were a build script in scripts/) and returns
// its stdout and exit status; stderr goes to the test's log.
func bash(t *testing.T, script string, args ...string) (string, int) {
	t.Helper()
	lib, err := filepath.Abs("cache.sh")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", append([]string{"-euo", "pipefail", "-c", ". " + lib + "\n" + script, "build-test"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if stderr.Len() > 0 {
		t.Logf("stderr: %s", stderr.String())
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestOpenBuildCommit: a missing artefact is built in dir.tmp.<pid> and renamed; the next open
// prints it and exits without building; a killed build's tmp is removed by the next build.
func TestOpenBuildCommit(t *testing.T) {
	cache := t.TempDir()
	write(t, filepath.Join(cache, "thing", "a-1.tmp.99", "junk"), "left by a killed build")
	build := `cache_open "$1" thing a-1 out
cache_tmp
echo built >"$tmp/out"
cache_commit
echo "$cache_out"
`
	want := filepath.Join(cache, "thing", "a-1", "out")
	for i, wantOut := range []string{want + "\n", want + "\n"} {
		out, code := bash(t, build, cache)
		if code != 0 || out != wantOut {
			t.Fatalf("run %d: %q, exit %d; want %q", i, out, code, wantOut)
		}
	}
	if b, err := os.ReadFile(want); err != nil || string(b) != "built\n" {
		t.Errorf("artefact: %q %v", b, err)
	}
	if m, _ := filepath.Glob(filepath.Join(cache, "thing", "*.tmp.*")); len(m) > 0 {
		t.Errorf("tmp dirs left: %v", m)
	}
	// A build that fails leaves no artefact, and no tmp.
	if _, code := bash(t, `cache_open "$1" thing b-1; cache_tmp; echo x >"$tmp/f"; die "failed"`, cache); code != 1 {
		t.Errorf("failed build: exit %d", code)
	}
	if m, _ := filepath.Glob(filepath.Join(cache, "thing", "b-1*")); len(m) > 0 {
		t.Errorf("a failed build left %v", m)
	}
}

// TestKeyAndAdopt: the key covers every line of its files but the cache_adopt ones; an artefact
// of a former key is adopted (hard links, its own BUILDINFO) only under the name the adoption
// names, the former one untouched.
func TestKeyAndAdopt(t *testing.T) {
	key := func(lines string) string {
		t.Helper()
		dir := t.TempDir()
		write(t, filepath.Join(dir, "recipe.sh"), lines)
		out, code := bash(t, `cd "$1"; cache_scripts=$PWD; cache_key recipe.sh`, dir)
		if code != 0 || len(strings.TrimSpace(out)) != 12 {
			t.Fatalf("cache_key: %q, exit %d", out, code)
		}
		return strings.TrimSpace(out)
	}
	base := key("FLAGS=-O2\n")
	if key("FLAGS=-O2\ncache_adopt x-old x-new\n") != base {
		t.Error("a cache_adopt line changed the key")
	}
	if key("FLAGS=-O3\n") == base || key("FLAGS=-O2\n# a comment\n") == base {
		t.Error("a changed line kept the key")
	}

	cache := t.TempDir()
	former := filepath.Join(cache, "thing", "x-old")
	write(t, filepath.Join(former, "bin"), "artefact")
	write(t, filepath.Join(former, "BUILDINFO"), "recipe_hash=old\nsize=8\n")
	write(t, filepath.Join(former, ".complete"), "")
	adopt := `cache_open "$1" thing "$2" bin; cache_adopt x-old x-new; echo "not adopted"`
	if out, _ := bash(t, adopt, cache, "x-other"); out != "not adopted\n" {
		t.Errorf("another name adopted the former artefact: %q", out)
	}
	out, code := bash(t, adopt, cache, "x-new")
	if want := filepath.Join(cache, "thing", "x-new", "bin") + "\n"; code != 0 || out != want {
		t.Fatalf("adopt: %q, exit %d; want %q", out, code, want)
	}
	var a, b os.FileInfo
	a, _ = os.Stat(filepath.Join(former, "bin"))
	b, _ = os.Stat(filepath.Join(cache, "thing", "x-new", "bin"))
	if a == nil || b == nil || !os.SameFile(a, b) {
		t.Errorf("the adopted artefact is not the former's file")
	}
	if info, _ := os.ReadFile(filepath.Join(cache, "thing", "x-new", "BUILDINFO")); string(info) != "size=8\nrecipe_hash=new\nadopted_from=x-old\n" {
		t.Errorf("adopted BUILDINFO: %q", info)
	}
	if info, _ := os.ReadFile(filepath.Join(former, "BUILDINFO")); string(info) != "recipe_hash=old\nsize=8\n" {
		t.Errorf("the former's BUILDINFO changed: %q", info)
	}
}

// TestScriptsAdoptTheirFormerKeys: each build script, on a cache holding only the artefact of
// its recipe's former key (before the fold into cache.sh), uses it: no build. An adoption must
// name the recipe's current key: a change to a line that decides the build makes a new key, and
// the adoption must then go (a new recipe must not take the former artefact). Checked before the
// script runs, which would otherwise build (minutes).
func TestScriptsAdoptTheirFormerKeys(t *testing.T) {
	for _, c := range []struct {
		script, subdir, prefix, artefact string
		keyFiles                         string
	}{
		{"build-python-wasm.sh", "python-wasm", "python-3.11-wasi-", "", "build-python-wasm.sh wasm/sqlite-wasi-shim.h lib/cache.sh"},
		{"build-runsc.sh", "runsc", "v0.0.0-20260905035102-160fafc42237-", "runsc", "build-runsc.sh lib/cache.sh"},
	} {
		t.Run(c.script, func(t *testing.T) {
			script, err := os.ReadFile(filepath.Join("..", c.script))
			if err != nil {
				t.Fatal(err)
			}
			var former, adopted string
			for _, l := range strings.Split(string(script), "\n") {
				if f := strings.Fields(l); len(f) == 3 && f[0] == "cache_adopt" {
					former, adopted = f[1], f[2]
				}
			}
			if adopted == "" {
				t.Logf("%s adopts no former artefact", c.script)
				return
			}
			key, code := bash(t, "cache_key "+c.keyFiles)
			if key = strings.TrimSpace(key); code != 0 || adopted != c.prefix+key {
				t.Fatalf("%s adopts %s as %s, but its key is %q: the recipe changed since the adoption (remove the cache_adopt line) or the adoption names a wrong key", c.script, former, adopted, key)
			}
			cache := t.TempDir()
			fdir := filepath.Join(cache, c.subdir, former)
			write(t, filepath.Join(fdir, "python.wasm"), "\x00asm")
			write(t, filepath.Join(fdir, "runsc"), "#!/bin/true")
			write(t, filepath.Join(fdir, "BUILDINFO"), "recipe_hash=former\n")
			write(t, filepath.Join(fdir, ".complete"), "")
			out, err := exec.Command("bash", filepath.Join("..", c.script), cache).Output()
			if err != nil {
				t.Fatalf("%s: %v", c.script, err)
			}
			want := filepath.Join(cache, c.subdir, adopted, c.artefact)
			if got := strings.TrimSpace(string(out)); got != want {
				t.Fatalf("printed %q, want %q", got, want)
			}
			if _, err := os.Stat(filepath.Join(cache, c.subdir, adopted, "BUILDINFO")); err != nil {
				t.Error(err)
			}
		})
	}
}
