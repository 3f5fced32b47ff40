package imagestore

import (
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// pythonPaths are where an image's python3 is looked for, in order (the agent runs python3 from
// PATH, which lists /usr/local/bin first).
var pythonPaths = []string{"/usr/local/bin/python3", "/usr/bin/python3"}

var (
	pythonNameRe = regexp.MustCompile(`^python(3\.[0-9]+)$`)
	pythonLibRe  = regexp.MustCompile(`^python(3\.([0-9]+))$`)
)

// PythonVersion is the version of the python3 of the root file system at root (see findPython);
// an error wraps ErrNoPython when it has none.
func PythonVersion(root string) (string, error) { return findPython(root) }

// WASMPythonVersion is the version of the standard library of a WASM image's directory (its
// lib/python3.X with an os.py; python.wasm's), or "" when it has none.
func WASMPythonVersion(dir string) string {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	return libVersion(fd, "lib")
}

// findPython resolves the image's python3 inside root (symlinks followed inside the root only)
// and returns its version: from the name of the file it resolves to (python3.11 → "3.11"), else
// from the newest lib/python3.X beside it that holds a standard library (os.py).
func findPython(root string) (string, error) {
	rootfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(rootfd)
	rootPath, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", rootfd))
	if err != nil {
		return "", err
	}
	for _, p := range pythonPaths {
		fd, err := hostfs.OpenAt(rootfd, p, unix.O_PATH, 0, hostfs.InRoot)
		if err != nil {
			continue // missing, a dangling or looping link
		}
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		final, lerr := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
		unix.Close(fd)
		if err != nil || lerr != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0 {
			continue
		}
		rel, ok := strings.CutPrefix(final, rootPath+"/")
		if !ok {
			continue
		}
		if m := pythonNameRe.FindStringSubmatch(path.Base(rel)); m != nil {
			return m[1], nil
		}
		if v := libVersion(rootfd, path.Join(path.Dir(path.Dir(rel)), "lib")); v != "" {
			return v, nil
		}
		return "3", nil // a python3 of no version we can name
	}
	return "", fmt.Errorf("%w: looked for %s (symlinks followed inside the image): sandboxd runs code with the image's python3 — build the image FROM a Python base (e.g. python:3.12-slim) or install python3 in it", ErrNoPython, strings.Join(pythonPaths, " and "))
}

// libVersion returns the newest X of the lib/python3.X directories (with an os.py) in lib.
func libVersion(rootfd int, lib string) string {
	fd, err := hostfs.OpenAt(rootfd, lib, unix.O_RDONLY|unix.O_DIRECTORY, 0, hostfs.InRoot)
	if err != nil {
		return ""
	}
	f := os.NewFile(uintptr(fd), lib)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return ""
	}
	var minors []int
	for _, n := range names {
		m := pythonLibRe.FindStringSubmatch(n)
		if m == nil {
			continue
		}
		if ofd, err := hostfs.OpenAt(rootfd, path.Join(lib, n, "os.py"), unix.O_PATH, 0, hostfs.InRoot); err == nil {
			unix.Close(ofd)
			minor, _ := strconv.Atoi(m[2])
			minors = append(minors, minor)
		}
	}
	if len(minors) == 0 {
		return ""
	}
	return fmt.Sprintf("3.%d", slices.Max(minors))
}
