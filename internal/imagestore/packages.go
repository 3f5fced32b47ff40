package imagestore

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// Package is one Python distribution an image holds (name and version), as GET /api/images
// shows it.
type Package = api.ImagePackage

// packageDirs are where Packages looks for distributions, relative to a root ("*" matches a
// python3.X directory): a WASM image's own root (its site-packages), a WASM base's standard
// library, Debian's and upstream Python's system and local directories.
var packageDirs = []string{
	"",
	"lib/python3*/site-packages",
	"usr/lib/python3/dist-packages",
	"usr/lib/python3*/site-packages",
	"usr/lib/python3*/dist-packages",
	"usr/local/lib/python3*/site-packages",
	"usr/local/lib/python3*/dist-packages",
}

// metadataLimit bounds what is read of one distribution's metadata (its headers come first).
const metadataLimit = 256 << 10

// Packages lists the Python distributions in the root file system at root, sorted by name: each
// *.dist-info directory's METADATA and each *.egg-info's PKG-INFO (a directory, or a file as
// Debian's python3-* packages install some) in the directories of packageDirs, resolved inside
// the root. It never returns nil. A distribution whose metadata cannot be read is named from its
// directory's name (numpy-1.24.2.dist-info).
func Packages(root string) ([]Package, error) {
	rootfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("list packages: %w", err)
	}
	defer unix.Close(rootfd)
	seen := map[Package]bool{}
	out := []Package{}
	for _, pattern := range packageDirs {
		for _, dir := range expand(rootfd, pattern) {
			for _, n := range readDirNames(rootfd, dir) {
				p, ok := distribution(rootfd, dir, n)
				if ok && !seen[p] {
					seen[p] = true
					out = append(out, p)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b Package) int {
		if c := strings.Compare(strings.ToLower(a.Name), strings.ToLower(b.Name)); c != 0 {
			return c
		}
		return strings.Compare(a.Version, b.Version)
	})
	return out, nil
}

// expand returns the directories pattern names in the root (one "*" component at most matched
// against the entries of its parent).
func expand(rootfd int, pattern string) []string {
	dir, rest, ok := strings.Cut(pattern, "*")
	if !ok {
		return []string{pattern}
	}
	parent, prefix := path.Split(dir)
	var out []string
	for _, n := range readDirNames(rootfd, strings.TrimSuffix(parent, "/")) {
		if strings.HasPrefix(n, prefix) {
			out = append(out, parent+n+rest)
		}
	}
	return out
}

// readDirNames returns the names in directory rel of the root (none when it is not one).
func readDirNames(rootfd int, rel string) []string {
	fd, err := hostfs.OpenAt(rootfd, rel, unix.O_RDONLY|unix.O_DIRECTORY, 0, hostfs.InRoot)
	if err != nil {
		return nil
	}
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	names, _ := f.Readdirnames(-1)
	slices.Sort(names)
	return names
}

// distribution reads the distribution whose metadata is entry n of dir, if n is one.
func distribution(rootfd int, dir, n string) (Package, bool) {
	var stem, meta string
	switch {
	case strings.HasSuffix(n, ".dist-info"):
		stem, meta = strings.TrimSuffix(n, ".dist-info"), path.Join(dir, n, "METADATA")
	case strings.HasSuffix(n, ".egg-info"):
		stem, meta = strings.TrimSuffix(n, ".egg-info"), path.Join(dir, n)
		if fd, err := hostfs.OpenAt(rootfd, meta, unix.O_PATH|unix.O_DIRECTORY, 0, hostfs.InRoot); err == nil {
			unix.Close(fd)
			meta = path.Join(meta, "PKG-INFO")
		}
	default:
		return Package{}, false
	}
	p, err := readMetadata(rootfd, meta)
	if err != nil || p.Name == "" {
		// From the name: NAME-VERSION(-pyX.Y).
		name, version, _ := strings.Cut(stem, "-")
		version, _, _ = strings.Cut(version, "-py")
		if name == "" {
			return Package{}, false
		}
		p = Package{Name: name, Version: version}
	}
	return p, true
}

// readMetadata reads the Name and Version headers of a METADATA or PKG-INFO file.
func readMetadata(rootfd int, rel string) (Package, error) {
	fd, err := hostfs.OpenAt(rootfd, rel, unix.O_RDONLY|unix.O_NONBLOCK, 0, hostfs.InRoot)
	if err != nil {
		return Package{}, err
	}
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return Package{}, errors.New("not a regular file")
	}
	var p Package
	sc := bufio.NewScanner(io.LimitReader(f, metadataLimit))
	for sc.Scan() && (p.Name == "" || p.Version == "") {
		line := sc.Text()
		if line == "" { // the end of the headers
			break
		}
		if v, ok := strings.CutPrefix(line, "Name:"); ok && p.Name == "" {
			p.Name = strings.TrimSpace(v)
		} else if v, ok := strings.CutPrefix(line, "Version:"); ok && p.Version == "" {
			p.Version = strings.TrimSpace(v)
		}
	}
	return p, sc.Err()
}
