package k8stest

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

// defaultPath is the PATH of images made from a root filesystem.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ImportImage makes an OCI image from src — a root filesystem directory (e.g. $SANDBOXD_ROOTFS:
// one layer of the tree as it is), an OCI image layout directory, or an OCI image layout in a
// tar file (its first manifest) — imports it into containerd's k8s.io namespace under ref, and
// returns the reference pods must use to run exactly that content, pinned by digest
// (REPOSITORY@sha256:…; with imagePullPolicy Never: nothing is pulled). ref is a full reference
// with a registry host and a tag ("sandboxd.invalid/python:1"). The same src and ref are imported
// once per process.
func (c *Cluster) ImportImage(t testing.TB, src, ref string) (pinned string) {
	t.Helper()
	repo, tag, err := splitRef(ref)
	if err != nil {
		t.Fatalf("k8stest: ImportImage: %v", err)
	}
	c.imgMu.Lock()
	defer c.imgMu.Unlock()
	if p, ok := c.images[src+"\x00"+ref]; ok {
		return p
	}
	img, err := imageOf(t, src)
	if err != nil {
		t.Fatalf("k8stest: ImportImage %s: %v", src, err)
	}
	d, err := c.importImage(img, repo, tag)
	if err != nil {
		t.Fatalf("k8stest: ImportImage %s: %v", src, err)
	}
	pinned = repo + "@" + d
	c.images[src+"\x00"+ref] = pinned
	return pinned
}

// splitRef splits "HOST/PATH:TAG" (HOST with a dot or a port, or localhost) into repository and tag.
func splitRef(ref string) (repo, tag string, err error) {
	i := strings.LastIndex(ref, ":")
	host, _, _ := strings.Cut(ref, "/")
	if strings.Contains(ref, "@") || i < 0 || strings.Contains(ref[i:], "/") || !strings.Contains(ref, "/") ||
		!(strings.ContainsAny(host, ".:") || host == "localhost") || ref != strings.ToLower(ref[:i])+ref[i:] {
		return "", "", fmt.Errorf("%q: want a reference HOST/PATH:TAG, HOST with a dot (lower case, no digest)", ref)
	}
	return ref[:i], ref[i+1:], nil
}

// imageOf is the image of src (see ImportImage).
func imageOf(t testing.TB, src string) (v1.Image, error) {
	st, err := os.Stat(src)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		dir := filepath.Join(t.TempDir(), "layout")
		if err := untarLayout(src, dir); err != nil {
			return nil, err
		}
		src = dir
	} else if _, err := os.Stat(filepath.Join(src, "oci-layout")); err != nil {
		l, err := tarLayer(imagetest.DirTar(t, src))
		if err != nil {
			return nil, err
		}
		return mutate.Config(imagetest.Image(t, l), v1.Config{Env: []string{defaultPath}})
	}
	idx, err := layout.ImageIndexFromPath(src)
	if err != nil {
		return nil, err
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) == 0 {
		return nil, errors.New("an OCI layout without images")
	}
	return idx.Image(m.Manifests[0].Digest)
}

// fileLayer is an uncompressed layer in a file: no compressing here, no decompressing in
// containerd (a root filesystem of a GiB imports in seconds, not minutes).
type fileLayer struct {
	path   string
	digest v1.Hash
	size   int64
}

// tarLayer is the uncompressed layer of the tar file path.
func tarLayer(path string) (v1.Layer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, size, err := v1.SHA256(f)
	if err != nil {
		return nil, err
	}
	return fileLayer{path: path, digest: h, size: size}, nil
}

func (l fileLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l fileLayer) DiffID() (v1.Hash, error)             { return l.digest, nil }
func (l fileLayer) Size() (int64, error)                 { return l.size, nil }
func (l fileLayer) Compressed() (io.ReadCloser, error)   { return os.Open(l.path) }
func (l fileLayer) Uncompressed() (io.ReadCloser, error) { return os.Open(l.path) }
func (l fileLayer) MediaType() (types.MediaType, error)  { return types.DockerUncompressedLayer, nil }

// untarLayout unpacks an OCI layout tar (regular files and directories, relative names) into dir.
func untarLayout(file, dir string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		name := filepath.Clean(h.Name)
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("%s: entry %q outside the layout", file, h.Name)
		}
		p := filepath.Join(dir, name)
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, 0o700)
		case tar.TypeReg:
			if err = os.MkdirAll(filepath.Dir(p), 0o700); err == nil {
				var out *os.File
				if out, err = os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err == nil {
					_, err = io.Copy(out, tr)
					if cerr := out.Close(); err == nil {
						err = cerr
					}
				}
			}
		default:
			err = fmt.Errorf("entry %q: not a file or directory", h.Name)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
	}
}

// importImage streams img as an OCI layout tar into `ctr images import` (which unpacks it for
// the CRI's snapshotter), named repo:tag and repo@digest (the CRI finds an image by a digest
// reference only under that name), and returns the manifest digest.
func (c *Cluster) importImage(img v1.Image, repo, tag string) (string, error) {
	d, err := img.Digest()
	if err != nil {
		return "", err
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(writeArchive(pw, img, repo+":"+tag, repo+"@"+d.String())) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := c.ctrIn(ctx, pr, "images", "import", "-"); err != nil {
		pr.CloseWithError(err)
		return "", err
	}
	return d.String(), nil
}

// writeArchive writes img as a tar of an OCI image layout whose index has it under each of refs
// (containerd's name annotation: ctr import makes an image of each).
func writeArchive(w io.Writer, img v1.Image, refs ...string) error {
	tw := tar.NewWriter(w)
	file := func(name string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: size, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		n, err := io.Copy(tw, r)
		if err == nil && n != size {
			err = fmt.Errorf("%s: %d bytes, want %d", name, n, size)
		}
		return err
	}
	bytesFile := func(name string, b []byte) error { return file(name, int64(len(b)), strings.NewReader(string(b))) }
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		h, err := l.Digest()
		if err != nil {
			return err
		}
		size, err := l.Size()
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		err = file(blob(h), size, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return err
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	var manifests []any
	for _, r := range refs {
		manifests = append(manifests, map[string]any{
			"mediaType": mt, "digest": d.String(), "size": len(manifest),
			"annotations": map[string]string{"io.containerd.image.name": r},
		})
	}
	index, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": manifests})
	for _, f := range []struct {
		name string
		b    []byte
	}{
		{blob(cfgName), cfg}, {blob(d), manifest},
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {"index.json", index},
	} {
		if err := bytesFile(f.name, f.b); err != nil {
			return err
		}
	}
	return tw.Close()
}

// ctrIn is ctr with stdin from in.
func (c *Cluster) ctrIn(ctx context.Context, in io.Reader, args ...string) error {
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", c.ContainerdSocket, "--namespace", "k8s.io"}, args...)...)
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// importPause imports PauseImage: the static busybox, sleeping (containerd stops a pod's
// sandbox container with SIGKILL).
func (c *Cluster) importPause(t testing.TB) error {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	body, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	img := imagetest.Image(t, imagetest.Layer(t, imagetest.Entry{Name: "busybox", Body: string(body), Mode: 0o755}))
	if img, err = mutate.Config(img, v1.Config{Entrypoint: []string{"/busybox", "sleep", "2147483647"}}); err != nil {
		return err
	}
	repo, tag, err := splitRef(PauseImage)
	if err != nil {
		return err
	}
	_, err = c.importImage(img, repo, tag)
	return err
}
