// Package procstatus reads figures from the host's /proc files made of "Name: N kB" lines
// (/proc/<pid>/status, /proc/meminfo): the one parser of them on the host side (the in-sandbox
// agent, a binary of its own, keeps its own).
package procstatus

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Bytes returns the figure of field name (VmRSS, MemAvailable, …) of file, given there in kB, in
// bytes. An error when the file cannot be read or has no such field.
func Bytes(file, name string) (int64, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s in %s: %w", name, file, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no %s in %s", name, file)
}

// RSS returns process pid's resident set size (VmRSS) in bytes.
func RSS(pid int) (int64, error) {
	return Bytes(fmt.Sprintf("/proc/%d/status", pid), "VmRSS")
}
