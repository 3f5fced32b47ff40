package pyrunner

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRemoveContextDir: a context's directory goes, with what is in it; one the sandbox replaced
// by a link goes as a link, what it points to stays.
func TestRemoveContextDir(t *testing.T) {
	tmp, outside := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "keep"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(tmp, ContextDirName("a"), "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(tmp, ContextDirName("b"))); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b", "never"} {
		if err := RemoveContextDir(tmp, name); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if _, err := os.Lstat(filepath.Join(tmp, ContextDirName(name))); !os.IsNotExist(err) {
			t.Errorf("%s: still there (%v)", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(outside, "keep")); err != nil {
		t.Errorf("the link's target lost its file: %v", err)
	}
}
