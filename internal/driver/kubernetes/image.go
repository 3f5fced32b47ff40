package kubernetes

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// ImageUID is the uid and gid the cluster image runs as (its config's User, what the API
// replicas run as): not root, and none a sandbox pod runs as — sandboxes' uids are in their
// ranges of host ids, which start at driver.IDsPerSandbox, above it (the host's own ids).
const ImageUID = 65532

// WriteImage writes the cluster image as an OCI image layout in the new directory dir, for the
// operator to push to the cluster's registry (or a test to import into its containerd), and
// returns the image's digest. Its one layer holds the static agentBin as /sandbox-agent — the
// sandbox pods' agent, run by that digest (Options.AgentImage) — and, when serverBin is not
// empty, the static sandboxd binary as /sandboxd, the image's entrypoint: the same image then
// runs the API replicas (deploy/kubernetes/sandboxd.yaml). Without serverBin the entrypoint is
// the agent. Both are static (CGO_ENABLED=0), so the image needs no base.
func WriteImage(dir, agentBin, serverBin string) (v1.Hash, error) {
	files := []struct{ name, path string }{{"sandbox-agent", agentBin}}
	entry := "/sandbox-agent"
	if serverBin != "" {
		files = append(files, struct{ name, path string }{"sandboxd", serverBin})
		entry = "/sandboxd"
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		bin, err := os.ReadFile(f.path)
		if err != nil {
			return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
		}
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o555, Size: int64(len(bin)), Typeflag: tar.TypeReg}); err != nil {
			return v1.Hash{}, err
		}
		if _, err := tw.Write(bin); err != nil {
			return v1.Hash{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return v1.Hash{}, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config = v1.Config{Entrypoint: []string{entry}, User: fmt.Sprintf("%d:%d", ImageUID, ImageUID)}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	if err := p.AppendImage(img); err != nil {
		return v1.Hash{}, fmt.Errorf("cluster image: %w", err)
	}
	return img.Digest()
}
