package fakedriver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// Filer is the fake as a driver that keeps its sandboxes' files itself (driver.Filer), as the
// kubernetes driver's pods do: each mount of a sandbox is a directory below Root (package hostfs,
// as the real files sidecar resolves paths), made at Create, removed at Destroy.
type Filer struct {
	*Driver
	Root string
}

// NewFiler returns a fake Filer keeping its files below root.
func NewFiler(root string) *Filer { return &Filer{Driver: New(), Root: root} }

func (f *Filer) dir(id, mount string) string {
	sum := sha256.Sum256([]byte(mount))
	return filepath.Join(f.Root, id, hex.EncodeToString(sum[:8]))
}

// Create creates the sandbox and a directory for each of its mounts.
func (f *Filer) Create(ctx context.Context, id string, spec driver.Spec) error {
	if err := f.Driver.Create(ctx, id, spec); err != nil {
		return err
	}
	for _, m := range spec.Mounts {
		if err := os.MkdirAll(f.dir(id, m.Path), 0o755); err != nil {
			return err
		}
	}
	return os.MkdirAll(filepath.Join(f.Root, id, ".staging"), 0o700)
}

// Destroy destroys the sandbox and its files.
func (f *Filer) Destroy(ctx context.Context, id string) error {
	if err := f.Driver.Destroy(ctx, id); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(f.Root, id))
}

func (f *Filer) open(id, mount string) (*hostfs.Dir, error) {
	if !f.Live(id) {
		return nil, driver.ErrNotFound
	}
	spec, _ := f.Spec(id)
	known := false
	for _, m := range spec.Mounts {
		known = known || m.Path == mount
	}
	if !known {
		return nil, fmt.Errorf("fake filer: %s is no mount of sandbox %s", mount, id)
	}
	return hostfs.Open(f.dir(id, mount), filepath.Join(f.Root, id, ".staging"))
}

func (f *Filer) WriteFile(ctx context.Context, id, mount, rel string, r io.Reader, limit int64) (int64, string, error) {
	d, err := f.open(id, mount)
	if err != nil {
		return 0, "", err
	}
	defer d.Close()
	return d.Write(rel, r, limit)
}

func (f *Filer) OpenFile(ctx context.Context, id, mount, rel string) (driver.File, hostfs.Info, error) {
	d, err := f.open(id, mount)
	if err != nil {
		return nil, hostfs.Info{}, err
	}
	defer d.Close()
	file, err := d.OpenFile(rel)
	if err != nil {
		return nil, hostfs.Info{}, err
	}
	return file, file.Info, nil
}

func (f *Filer) RemoveFile(ctx context.Context, id, mount, rel string) error {
	d, err := f.open(id, mount)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Remove(rel)
}

// DiskUsage is 0: the fake bounds nothing.
func (f *Filer) DiskUsage(ctx context.Context, id string) (int64, error) { return 0, nil }

var _ driver.Filer = (*Filer)(nil)
