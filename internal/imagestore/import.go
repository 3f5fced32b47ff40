package imagestore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Import adds the image at src — an OCI image layout directory, or a `docker save` archive —
// under name (replacing what the name held). A layout or archive with several images takes the
// one for this host's platform. See the package comment for what is verified; errors wrap
// ErrDigest, ErrNoPython, ErrTooLarge or ErrInvalid when the image is at fault.
func (s *Store) Import(ctx context.Context, src, name string, opts Options) (Image, error) {
	if err := CheckName(name); err != nil {
		return Image{}, err
	}
	if o, err := opts.withDefaults(); err != nil {
		return Image{}, err
	} else if o.Mode == ModeWASM {
		return s.importWASM(ctx, src, name, o)
	}
	st, err := os.Stat(src)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	var img v1.Image
	compressedDigests := true
	if st.IsDir() {
		idx, err := layout.ImageIndexFromPath(src)
		if err != nil {
			return Image{}, fmt.Errorf("import %s: %w: not an OCI image layout (no readable index.json: %v)", src, ErrInvalid, err)
		}
		if img, err = pickImage(idx, 0); err != nil {
			return Image{}, fmt.Errorf("import %s: %w", src, err)
		}
	} else {
		// A `docker save` archive: its manifest.json names the config and the layers (stored
		// uncompressed by docker); its layers' "compressed" digests are computed here by
		// go-containerregistry, so what is verified is the config's diff IDs.
		if img, err = tarball.ImageFromPath(src, nil); err != nil {
			return Image{}, fmt.Errorf("import %s: %w: not a docker save archive (%v)", src, ErrInvalid, err)
		}
		compressedDigests = false
	}
	im, err := s.add(ctx, img, name, compressedDigests, opts)
	if err != nil {
		return Image{}, fmt.Errorf("import %s: %w", src, err)
	}
	return im, nil
}

// Pull adds the image ref names in a registry under name ("" : ref as given). Registries on
// localhost and loopback addresses are spoken to over plain HTTP (go-containerregistry's rule),
// others over HTTPS; credentials come from the docker config (~/.docker/config.json), if any.
func (s *Store) Pull(ctx context.Context, ref, name string, opts Options) (Image, error) {
	if name == "" {
		name = ref
	}
	if err := CheckName(name); err != nil {
		return Image{}, err
	}
	r, err := parseRef(ref)
	if err != nil {
		return Image{}, err
	}
	img, err := remote.Image(r, remote.WithContext(ctx), remote.WithPlatform(hostPlatform()),
		remote.WithAuthFromKeychain(authn.DefaultKeychain))
	if err != nil {
		return Image{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	im, err := s.add(ctx, img, name, true, opts)
	if err != nil {
		return Image{}, fmt.Errorf("pull %s: %w", ref, err)
	}
	return im, nil
}

func parseRef(ref string) (name.Reference, error) {
	r, err := name.ParseReference(ref, name.StrictValidation)
	if err != nil {
		return nil, fmt.Errorf("%w: reference %q: %v (want REGISTRY/REPOSITORY:TAG or @sha256:DIGEST, e.g. localhost:5000/python:3.12)", ErrInvalid, ref, err)
	}
	return r, nil
}

// pickImage returns the image of idx for this host: the only one, or the one whose platform is
// the host's (nested indexes, as `docker save` writes them, are followed).
func pickImage(idx v1.ImageIndex, depth int) (v1.Image, error) {
	if depth > 4 {
		return nil, fmt.Errorf("%w: image indexes nested too deep", ErrInvalid)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: index: %v", ErrInvalid, err)
	}
	want := hostPlatform()
	var found []v1.Descriptor
	var seen []string
	for _, d := range m.Manifests {
		if d.Platform != nil {
			seen = append(seen, d.Platform.String())
			if d.Platform.OS != want.OS || d.Platform.Architecture != want.Architecture {
				continue
			}
		}
		if d.MediaType.IsImage() || d.MediaType.IsIndex() {
			found = append(found, d)
		}
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("%w: no image for %s in the index (it has: %s)", ErrInvalid, want.String(), strings.Join(seen, ", "))
	}
	d := found[0] // several: the first (the index's order), as docker does
	if d.MediaType.IsIndex() {
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("%w: index %s: %v", ErrInvalid, d.Digest, err)
		}
		return pickImage(child, depth+1)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("%w: image %s: %v", ErrInvalid, d.Digest, err)
	}
	return img, nil
}

// add verifies img, unpacks it (once per digest) and names it.
func (s *Store) add(ctx context.Context, img v1.Image, imName string, compressedDigests bool, opts Options) (Image, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return Image{}, err
	}
	if opts.Mode != ModeContainer {
		return Image{}, fmt.Errorf("%w: an OCI image is a container image (--mode %s)", ErrInvalid, ModeContainer)
	}
	vi, err := verified(img, compressedDigests)
	if err != nil {
		return Image{}, err
	}
	if err := s.cleanTmp(ctx); err != nil {
		return Image{}, err
	}
	for attempt := 0; ; attempt++ {
		im, err := s.addOnce(ctx, vi, imName, opts)
		if errors.Is(err, errRootGone) && attempt == 0 {
			continue
		}
		return im, err
	}
}

// addOnce names vi's root, unpacking it unless the store has it.
func (s *Store) addOnce(ctx context.Context, vi *verifiedImage, imName string, opts Options) (Image, error) {
	im := Image{Name: imName, Digest: vi.digest.String(), Mode: ModeContainer, Runtime: opts.Runtime, Created: time.Now().UTC()}
	tmpRoot := ""
	if old, ok := s.known(im.Digest); ok {
		im.Size, im.Python, im.Packages = old.Size, old.Python, old.Packages
	} else {
		work, release, err := s.newWork(ctx, "unpack-"+vi.digest.Hex[:12]+"-")
		if err != nil {
			return Image{}, err
		}
		defer release()
		if tmpRoot, im.Size, im.Python, err = s.unpackImage(ctx, vi, work, opts); err != nil {
			return Image{}, err
		}
		if im.Packages, err = Packages(tmpRoot); err != nil {
			return Image{}, err
		}
	}
	return s.commit(ctx, im, tmpRoot, opts)
}

// unpackImage flattens and unpacks vi into work/root and checks its python3; it returns the
// root, its size and the Python version.
func (s *Store) unpackImage(ctx context.Context, vi *verifiedImage, work string, opts Options) (root string, size int64, python string, err error) {
	root = filepath.Join(work, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		return "", 0, "", err
	}
	rc := mutate.Extract(vi)
	st, err := unpack(ctx, rc, root, limits{maxBytes: opts.MaxBytes, maxEntries: opts.MaxEntries})
	if err == nil {
		// Extract ends its tar (end-of-archive marker) before it reports an error: what
		// follows the marker is that error, or nothing.
		if _, err = io.Copy(io.Discard, rc); err != nil {
			err = fmt.Errorf("flatten the layers: %w", err)
		}
	}
	rc.Close()
	if err != nil {
		// A layer that does not match its digest usually breaks the tar or the decompression
		// first: say so.
		if verr := vi.diagnose(); verr != nil {
			return "", 0, "", verr
		}
		return "", 0, "", fmt.Errorf("unpack: %w", err)
	}
	if err := vi.check(); err != nil {
		return "", 0, "", err
	}
	python, err = findPython(root)
	if err != nil {
		return "", 0, "", err
	}
	return root, st.bytes, python, nil
}

// verifiedImage is an image whose layers check their bytes while mutate.Extract reads them: each
// layer's compressed stream against the manifest's digest (unless it has none of its own) and
// its uncompressed tar against the config's diff ID. The manifest and config are read once and
// checked against their digests before anything else; check says whether every layer was read
// to its end and matched.
type verifiedImage struct {
	v1.Image
	digest v1.Hash
	layers []*checkedLayer
}

func (vi *verifiedImage) Layers() ([]v1.Layer, error) {
	out := make([]v1.Layer, len(vi.layers))
	for i, l := range vi.layers {
		out[i] = l
	}
	return out, nil
}

func (vi *verifiedImage) check() error {
	for i, l := range vi.layers {
		if l.err != nil {
			return fmt.Errorf("%w: layer %d: %v", ErrDigest, i, l.err)
		}
		if !l.compressedOK || !l.diffOK {
			return fmt.Errorf("%w: layer %d (%s) was not read to its end: unverified", ErrDigest, i, l.digest)
		}
	}
	return nil
}

// diagnose, after a failed unpack, reads the stored bytes of every layer not yet checked to
// its end: a mismatch is the cause to report.
func (vi *verifiedImage) diagnose() error {
	for i, l := range vi.layers {
		if l.err != nil {
			return fmt.Errorf("%w: layer %d: %v", ErrDigest, i, l.err)
		}
		if l.compressedOK {
			continue
		}
		rc, err := l.Compressed()
		if err != nil {
			continue
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if l.err != nil {
			return fmt.Errorf("%w: layer %d: %v", ErrDigest, i, l.err)
		}
	}
	return nil
}

func verified(img v1.Image, compressedDigests bool) (*verifiedImage, error) {
	raw, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrInvalid, err)
	}
	digest, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return nil, err
	}
	if claimed, err := img.Digest(); err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrInvalid, err)
	} else if claimed != digest {
		return nil, fmt.Errorf("%w: the manifest hashes to %s, its reference says %s", ErrDigest, digest, claimed)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrInvalid, err)
	}
	if !m.MediaType.IsImage() && m.MediaType != "" {
		return nil, fmt.Errorf("%w: manifest media type %s is not an image's", ErrInvalid, m.MediaType)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("%w: config: %v", ErrInvalid, err)
	}
	if h, _, _ := v1.SHA256(bytes.NewReader(rawCfg)); h != m.Config.Digest {
		return nil, fmt.Errorf("%w: the config hashes to %s, the manifest says %s", ErrDigest, h, m.Config.Digest)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("%w: config: %v", ErrInvalid, err)
	}
	if want := hostPlatform(); cfg.OS != want.OS || (cfg.Architecture != "" && cfg.Architecture != want.Architecture) {
		return nil, fmt.Errorf("%w: the image is for %s/%s, this host runs %s", ErrInvalid, cfg.OS, cfg.Architecture, want.String())
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("%w: the manifest has %d layers, the config %d diff IDs", ErrInvalid, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	vi := &verifiedImage{Image: img, digest: digest}
	var inner []v1.Layer
	if !compressedDigests {
		if inner, err = img.Layers(); err != nil {
			return nil, fmt.Errorf("%w: layers: %v", ErrInvalid, err)
		}
		if len(inner) != len(m.Layers) {
			return nil, fmt.Errorf("%w: %d layers, the manifest lists %d", ErrInvalid, len(inner), len(m.Layers))
		}
	}
	for i, d := range m.Layers {
		if !d.MediaType.IsLayer() {
			return nil, fmt.Errorf("%w: layer %d has media type %s (foreign or not a layer)", ErrInvalid, i, d.MediaType)
		}
		l := &checkedLayer{digest: d.Digest, size: d.Size, mediaType: d.MediaType, diffID: cfg.RootFS.DiffIDs[i]}
		if compressedDigests {
			if l.inner, err = img.LayerByDigest(d.Digest); err != nil {
				return nil, fmt.Errorf("%w: layer %d (%s): %v", ErrInvalid, i, d.Digest, err)
			}
		} else {
			l.inner, l.compressedOK, l.noDigest = inner[i], true, true
		}
		vi.layers = append(vi.layers, l)
	}
	return vi, nil
}

// checkedLayer is one layer as mutate.Extract reads it (Uncompressed), hashed on the way.
type checkedLayer struct {
	inner     v1.Layer
	digest    v1.Hash
	size      int64
	mediaType types.MediaType
	diffID    v1.Hash
	noDigest  bool // the source stores the layer uncompressed: only its diff ID is checked
	// Set by the readers once they reach the end (Extract reads each layer once, in one goroutine).
	compressedOK, diffOK bool
	err                  error
}

func (l *checkedLayer) Digest() (v1.Hash, error)            { return l.digest, nil }
func (l *checkedLayer) DiffID() (v1.Hash, error)            { return l.diffID, nil }
func (l *checkedLayer) Size() (int64, error)                { return l.size, nil }
func (l *checkedLayer) MediaType() (types.MediaType, error) { return l.mediaType, nil }

// Compressed is the layer's stored bytes, checked against the manifest's digest and size.
func (l *checkedLayer) Compressed() (io.ReadCloser, error) {
	rc, err := l.inner.Compressed()
	if err != nil {
		return nil, err
	}
	return &hashingReader{rc: rc, h: sha256.New(), want: l.digest, size: l.size, what: "compressed bytes", ok: &l.compressedOK, err: &l.err}, nil
}

// Uncompressed is the layer's tar, checked against the config's diff ID.
func (l *checkedLayer) Uncompressed() (io.ReadCloser, error) {
	var rc io.ReadCloser
	var err error
	if l.noDigest { // no digest of its own to check (docker save): read it as it is stored
		rc, err = l.inner.Uncompressed()
	} else {
		var ul v1.Layer
		if ul, err = partial.CompressedToLayer(compressedOnly{l}); err == nil {
			rc, err = ul.Uncompressed() // gzip, zstd or plain, by the bytes (go-containerregistry)
		}
	}
	if err != nil {
		return nil, err
	}
	return &hashingReader{rc: rc, h: sha256.New(), want: l.diffID, size: -1, what: "uncompressed tar (diff ID)", ok: &l.diffOK, err: &l.err}, nil
}

// compressedOnly hides checkedLayer's Uncompressed from partial.CompressedToLayer.
type compressedOnly struct{ l *checkedLayer }

func (c compressedOnly) Digest() (v1.Hash, error)            { return c.l.Digest() }
func (c compressedOnly) Compressed() (io.ReadCloser, error)  { return c.l.Compressed() }
func (c compressedOnly) Size() (int64, error)                { return c.l.Size() }
func (c compressedOnly) MediaType() (types.MediaType, error) { return c.l.MediaType() }

// hashingReader hashes what it reads; at the end it compares the hash (and size, unless -1)
// with want and returns an error instead of io.EOF when they differ.
type hashingReader struct {
	rc   io.ReadCloser
	h    hash.Hash
	n    int64
	want v1.Hash
	size int64
	what string
	ok   *bool
	err  *error
}

func (r *hashingReader) Read(p []byte) (int, error) {
	n, err := r.rc.Read(p)
	r.h.Write(p[:n])
	r.n += int64(n)
	if r.size >= 0 && r.n > r.size {
		err = fmt.Errorf("%s: more than the %d bytes the manifest says", r.what, r.size)
		*r.err = err
		return n, err
	}
	if err == io.EOF {
		got := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", r.h.Sum(nil))}
		switch {
		case r.want.Algorithm != "sha256":
			err = fmt.Errorf("%s: digest algorithm %q is not supported", r.what, r.want.Algorithm)
		case got != r.want:
			err = fmt.Errorf("%s hash to %s, expected %s", r.what, got, r.want)
		case r.size >= 0 && r.n != r.size:
			err = fmt.Errorf("%s: %d bytes, the manifest says %d", r.what, r.n, r.size)
		default:
			*r.ok = true
			return n, io.EOF
		}
		if *r.err == nil {
			*r.err = err
		}
	}
	return n, err
}

func (r *hashingReader) Close() error { return r.rc.Close() }
