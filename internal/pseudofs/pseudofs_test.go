package pseudofs

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	big := bytes.Repeat([]byte("0123456789abcdef"), 3*bufSize/16+5) // three buffers and more
	bigFile := filepath.Join(dir, "big")
	if err := os.WriteFile(bigFile, big, 0o600); err != nil {
		t.Fatal(err)
	}
	exact := filepath.Join(dir, "exact") // exactly one buffer: the read after it returns 0
	if err := os.WriteFile(exact, big[:bufSize], 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		path  string
		check func(t *testing.T, b []byte, err error)
	}{
		{"larger than one buffer", bigFile, func(t *testing.T, b []byte, err error) {
			if err != nil || !bytes.Equal(b, big) {
				t.Fatalf("got %d bytes, %v; want %d bytes", len(b), err, len(big))
			}
		}},
		{"exactly one buffer", exact, func(t *testing.T, b []byte, err error) {
			if err != nil || !bytes.Equal(b, big[:bufSize]) {
				t.Fatalf("got %d bytes, %v", len(b), err)
			}
		}},
		{"empty", empty, func(t *testing.T, b []byte, err error) {
			if err != nil || len(b) != 0 {
				t.Fatalf("got %q, %v", b, err)
			}
		}},
		{"missing", filepath.Join(dir, "none"), func(t *testing.T, b []byte, err error) {
			var pe *fs.PathError
			if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &pe) || pe.Op != "open" || !strings.Contains(err.Error(), "none") {
				t.Fatalf("got %v, want a PathError of open that is fs.ErrNotExist", err)
			}
		}},
		{"a directory", dir, func(t *testing.T, b []byte, err error) {
			var pe *fs.PathError
			if !errors.As(err, &pe) || pe.Op != "read" {
				t.Fatalf("got %v, want a PathError of read", err)
			}
		}},
		{"/proc/self/status", "/proc/self/status", func(t *testing.T, b []byte, err error) {
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"Name:", "PPid:", "NSpid:", "VmHWM:"} {
				if !bytes.HasPrefix(b, []byte(f)) && !bytes.Contains(b, []byte("\n"+f)) {
					t.Errorf("no %s in %q", f, b)
				}
			}
			if !bytes.HasSuffix(b, []byte("\n")) {
				t.Errorf("cut short: %q", b)
			}
		}},
		// A seq_file of many records comes one page per read: every mapping's record, to the last.
		{"/proc/self/smaps, several pages", "/proc/self/smaps", func(t *testing.T, b []byte, err error) {
			if err != nil {
				t.Fatal(err)
			}
			rss, flags := bytes.Count(b, []byte("\nRss:")), bytes.Count(b, []byte("\nVmFlags:"))
			if len(b) <= bufSize || rss < 2 || rss != flags || !bytes.HasSuffix(b, []byte("\n")) {
				t.Fatalf("%d bytes, %d Rss and %d VmFlags lines: cut short", len(b), rss, flags)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := ReadFile(tt.path)
			tt.check(t, b, err)
		})
	}
}
