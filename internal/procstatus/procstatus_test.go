package procstatus_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/procstatus"
)

// TestBytes: a field in kB comes back in bytes; a missing field, a figure that is no number and a
// missing file are errors.
func TestBytes(t *testing.T) {
	file := filepath.Join(t.TempDir(), "status")
	if err := os.WriteFile(file, []byte("Name:\tpython\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\nBad:\tmany kB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file, name string
		want       int64
		err        string
	}{
		{file, "VmRSS", 1 << 20, ""},
		{file, "VmHWM", 2 << 20, ""},
		{file, "VmSwap", 0, "no VmSwap in "},
		{file, "Bad", 0, "Bad in "},
		{file + ".missing", "VmRSS", 0, "no such file"},
	} {
		got, err := procstatus.Bytes(c.file, c.name)
		if got != c.want || (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s %s: %d, %v; want %d, %q", filepath.Base(c.file), c.name, got, err, c.want, c.err)
		}
	}
	if rss, err := procstatus.RSS(os.Getpid()); err != nil || rss <= 0 {
		t.Errorf("this process's RSS: %d, %v", rss, err)
	}
}
