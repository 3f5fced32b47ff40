package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// failingReader yields n bytes, then fails: a copy that breaks half way.
type failingReader struct{ n int }

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, errors.New("read failed half way")
	}
	k := min(len(p), r.n)
	r.n -= k
	return k, nil
}

// TestInstallLeavesNothing: a copy or a rename that fails leaves no temporary file in the
// directory (an init container retried on a half-written emptyDir would otherwise fail for ever:
// the temporary file is created exclusively).
func TestInstallLeavesNothing(t *testing.T) {
	for _, c := range []struct {
		name  string
		src   io.Reader
		setup func(dir string)
	}{
		{"copy fails", &failingReader{n: 100 << 10}, func(string) {}},
		{"rename fails", strings.NewReader("agent"), func(dir string) {
			// A non-empty directory where the binary goes: rename(2) refuses it.
			if err := os.MkdirAll(filepath.Join(dir, "sandbox-agent", "x"), 0o755); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			c.setup(dir)
			if err := installFrom(c.src, dir); err == nil {
				t.Fatal("install succeeded")
			}
			if _, err := os.Lstat(filepath.Join(dir, ".sandbox-agent.tmp")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the temporary file is left: %v", err)
			}
			// And the next attempt works.
			os.RemoveAll(filepath.Join(dir, "sandbox-agent"))
			if err := installFrom(strings.NewReader("agent"), dir); err != nil {
				t.Fatalf("install after a failure: %v", err)
			}
		})
	}
}
