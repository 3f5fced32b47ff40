package main

import (
	"errors"
	"flag"
	"io"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/config"
)

// TestServeUsage: `sandboxd serve -h` lists serve's flags, and sandboxd's usage text names each
// of them (and no other flag on the serve line).
func TestServeUsage(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := os.Stderr
	os.Stderr = w // where the flag package prints the usage
	_, err = config.ParseServe([]string{"-h"})
	os.Stderr = stderr
	w.Close()
	help, _ := io.ReadAll(r)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("serve -h: %v", err)
	}
	if !strings.HasPrefix(string(help), "usage: sandboxd serve [flags]\n") {
		t.Errorf("serve -h starts %q", strings.SplitN(string(help), "\n", 2)[0])
	}
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(string(help), -1) {
		flags = append(flags, m[1])
	}
	if len(flags) < 5 {
		t.Fatalf("serve -h lists %d flags:\n%s", len(flags), help)
	}
	serveLine := usage[strings.Index(usage, "sandboxd serve"):strings.Index(usage, "sandboxd keys")]
	for _, f := range flags {
		if !strings.Contains(serveLine, "--"+f+" ") && !strings.Contains(serveLine, "--"+f+"]") {
			t.Errorf("the usage text does not name serve's flag --%s", f)
		}
	}
	for _, m := range regexp.MustCompile(`--([a-z-]+)`).FindAllStringSubmatch(serveLine, -1) {
		if !strings.Contains(string(help), "  -"+m[1]+" ") {
			t.Errorf("the usage text names --%s, which serve does not have", m[1])
		}
	}
}
