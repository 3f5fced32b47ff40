package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
)

// cp: sandboxd cp LOCAL ID:/PATH uploads, sandboxd cp ID:/PATH LOCAL downloads. Both stream (no
// file is held in memory) and check the SHA-256 the server reports. A remote path ending in "/"
// (or a local directory) receives the file under its own name. A download goes to a temporary
// file renamed into place once verified; "-" is stdin or stdout. Silent on success; --json prints
// {path, size, sha256} of the remote file.
func (c *cli) cp(args []string) error {
	pos, err := c.parse(args, 2, 2)
	if err != nil {
		return err
	}
	src, dst := pos[0], pos[1]
	srcID, srcPath, srcRemote := cliSplitRemote(src)
	dstID, dstPath, dstRemote := cliSplitRemote(dst)
	switch {
	case srcRemote && dstRemote:
		return cliUsagef("copy between two sandboxes through a local file")
	case !srcRemote && !dstRemote:
		return cliUsagef("one side must be ID:/PATH in a sandbox")
	case dstRemote:
		return c.upload(src, dstID, dstPath)
	}
	return c.download(srcID, srcPath, dst)
}

func (c *cli) upload(local, id, remote string) error {
	var r io.Reader = c.stdin
	size := int64(-1)
	if local != "-" {
		f, err := os.Open(local)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if st.IsDir() {
			return fmt.Errorf("%s is a directory: cp copies one file", local)
		}
		if st.Mode().IsRegular() {
			size = st.Size()
		}
		r = f
		if strings.HasSuffix(remote, "/") {
			remote += filepath.Base(local)
		}
	} else if strings.HasSuffix(remote, "/") {
		return cliUsagef("name the file in the sandbox when copying stdin (ID:/dir/name)")
	}
	ctx, cancel := c.ctx()
	defer cancel()
	fw, err := c.c.PutFile(ctx, id, remote, r, size)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(fw)
	}
	return nil
}

func (c *cli) download(id, remote, local string) (err error) {
	ctx, cancel := c.ctx()
	defer cancel()
	defer func() {
		if errors.Is(err, client.ErrIsDirectory) {
			err = fmt.Errorf("%s:%s is a directory: cp copies one file (sandboxd ls %s:%s lists it)", id, remote, id, remote)
		}
	}()
	if local == "-" {
		n, sum, err := c.c.Download(ctx, id, remote, c.stdout)
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(api.FileWritten{Path: remote, Size: n, SHA256: sum})
		}
		return nil
	}
	if st, err := os.Stat(local); err == nil && st.IsDir() || strings.HasSuffix(local, "/") {
		local = filepath.Join(local, path.Base(remote))
	}
	if st, err := os.Stat(filepath.Dir(local)); err != nil || !st.IsDir() {
		return fmt.Errorf("cannot write %s: directory %s does not exist", local, filepath.Dir(local))
	}
	tmp, err := os.CreateTemp(filepath.Dir(local), "."+filepath.Base(local)+".sandboxd-*")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	n, sum, err := c.c.Download(ctx, id, remote, tmp)
	if err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), local); err != nil {
		return err
	}
	ok = true
	if c.json {
		return c.printJSON(api.FileWritten{Path: remote, Size: n, SHA256: sum})
	}
	return nil
}
