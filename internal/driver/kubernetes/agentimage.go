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

// WriteAgentImage writes the agent image — one layer holding only the static agentBin as
// /sandbox-agent, its entrypoint — as an OCI image layout in the new directory dir, for the
// operator to push to the cluster's registry (or a test to import into its containerd), and
// returns the image's digest. Pods run it by that digest (Options.AgentImage).
func WriteAgentImage(dir, agentBin string) (v1.Hash, error) {
	bin, err := os.ReadFile(agentBin)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "sandbox-agent", Mode: 0o555, Size: int64(len(bin)), Typeflag: tar.TypeReg}); err != nil {
		return v1.Hash{}, err
	}
	tw.Write(bin)
	if err := tw.Close(); err != nil {
		return v1.Hash{}, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config = v1.Config{Entrypoint: []string{"/sandbox-agent"}, User: "10000:10000"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	if err := p.AppendImage(img); err != nil {
		return v1.Hash{}, fmt.Errorf("agent image: %w", err)
	}
	return img.Digest()
}
