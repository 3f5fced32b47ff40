package main

// `sandboxd images import|pull|ls|rm`: the operator's approved OCI images, and WASM images of
// pure-Python packages (internal/imagestore), with the server running or not, like `keys create`: they work on the data directory, and a
// running server sees the change at its next create or GET /api/images.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/imagestore"
	"github.com/sandboxd/sandboxd/internal/store"
)

const imagesUsage = `usage:
  sandboxd images import FILE|DIR --name NAME [--runtime crun|runc|runsc] [--max-size BYTES] [--data-dir DIR]
      FILE: a 'docker save' archive; DIR: an OCI image layout
  sandboxd images import DIR --name NAME --mode wasm [--base python:3.11-wasi] [--max-size BYTES] [--data-dir DIR]
      DIR: pure-Python wheels (*.whl, py3-none-any), or an importable tree of packages and modules,
      added to the WASM image --base (which the server must serve: --wasm-image or --wasm-build)
  sandboxd images pull REF [--name NAME] [--runtime crun|runc|runsc] [--max-size BYTES] [--data-dir DIR]
  sandboxd images ls [--json] [--data-dir DIR]
  sandboxd images rm NAME [--data-dir DIR] [--store postgres://…]
`

// imagesDir is the image store of a data directory.
func imagesDir(dataDir string) string { return filepath.Join(dataDir, "images") }

func images(args []string, stdout io.Writer) error {
	if len(args) < 1 {
		return fmt.Errorf("images: want a subcommand\n%s", imagesUsage)
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("images "+sub, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dataDir := fs.String("data-dir", "data", "the server's data directory")
	storeURL := fs.String("store", "", config.StoreUsage)
	name := fs.String("name", "", "the name sandboxes ask for (config.image)")
	rt := fs.String("runtime", "", "OCI runtime of the image's sandboxes: "+strings.Join(imagestore.Runtimes, ", ")+" (default: the server's --runtime)")
	mode := fs.String("mode", imagestore.ModeContainer, "import: container (an OCI image) or wasm (pure-Python packages)")
	base := fs.String("base", "", "import --mode wasm: the WASM image the packages are added to (default "+imagestore.DefaultWASMBase+")")
	maxSize := fs.Int64("max-size", imagestore.DefaultMaxBytes, "refuse an image that unpacks to more bytes")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return fmt.Errorf("images %s: %w\n%s", sub, err, imagesUsage)
	}
	want := map[string]int{"import": 1, "pull": 1, "ls": 0, "rm": 1}
	n, ok := want[sub]
	if !ok {
		return fmt.Errorf("images: unknown subcommand %q\n%s", sub, imagesUsage)
	}
	if len(pos) != n {
		return fmt.Errorf("images %s: want %d argument(s), got %d (%s)\n%s", sub, n, len(pos), strings.Join(pos, " "), imagesUsage)
	}
	if *rt != "" && !slices.Contains(imagestore.Runtimes, *rt) {
		return fmt.Errorf("images %s: --runtime %q: want one of %s", sub, *rt, strings.Join(imagestore.Runtimes, ", "))
	}
	if err := os.MkdirAll(*dataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	st, err := imagestore.Open(imagesDir(*dataDir))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	inUse := func(digest string) (bool, error) {
		ids, err := sandboxesRunning(ctx, *dataDir, *storeURL, digest)
		return len(ids) > 0, err
	}
	if *mode != imagestore.ModeContainer && sub != "import" {
		return fmt.Errorf("images %s: --mode is for import (pull fetches OCI images)", sub)
	}
	opts := imagestore.Options{Mode: *mode, Base: *base, Runtime: *rt, MaxBytes: *maxSize, InUse: inUse}
	switch sub {
	case "import":
		if *name == "" {
			return fmt.Errorf("images import: --name is required: the name sandboxes ask for in config.image (e.g. sandboxd images import %s --name myorg/app:1)", pos[0])
		}
		im, err := st.Import(ctx, pos[0], *name, opts)
		if err != nil {
			return imagesExplain(err)
		}
		printImported(stdout, im)
	case "pull":
		im, err := st.Pull(ctx, pos[0], *name, opts)
		if err != nil {
			return imagesExplain(err)
		}
		printImported(stdout, im)
	case "ls":
		ims, err := st.List()
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(ims)
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tMODE\tDIGEST\tSIZE\tPYTHON\tRUNTIME/BASE\tPACKAGES\tCREATED")
		for _, im := range ims {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", im.Name, im.Mode, shortDigest(im.Digest), mib(im.Size), im.Python,
				im.Runtime+im.Base, len(im.Packages), im.Created.Format("2006-01-02 15:04:05Z"))
		}
		return tw.Flush()
	case "rm":
		im, err := st.Get(pos[0])
		if err != nil {
			return imagesExplain(err)
		}
		if ids, err := sandboxesRunning(ctx, *dataDir, *storeURL, im.Digest); err != nil {
			return err
		} else if len(ids) > 0 {
			return fmt.Errorf("images rm: image %s (%s) is in use by live sandbox(es) %s: delete them first (sandboxd rm ID, or DELETE /api/sandbox/ID)",
				im.Name, shortDigest(im.Digest), strings.Join(ids, ", "))
		}
		// Checked again under the store's lock: a sandbox created meanwhile keeps it.
		if err := st.Remove(ctx, pos[0], inUse); err != nil {
			return imagesExplain(err)
		}
		fmt.Fprintf(stdout, "removed %s\n", im.Name)
	}
	return nil
}

// parseInterleaved parses flags anywhere among args (a "--" ends them) and returns the
// positional arguments in order.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos, rest []string
	if i := cliIndex(args, "--"); i >= 0 {
		args, rest = args[:i], args[i+1:]
	}
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if args = fs.Args(); len(args) == 0 {
			break
		}
		pos, args = append(pos, args[0]), args[1:]
	}
	return append(pos, rest...), nil
}

// sandboxesRunning returns the live sandboxes whose records say they run digest.
func sandboxesRunning(ctx context.Context, dataDir, storeURL, digest string) ([]string, error) {
	st, err := openStore(ctx, dataDir, storeURL)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	live, err := st.LiveSandboxes(ctx)
	if err != nil {
		return nil, fmt.Errorf("live sandboxes: %w", err)
	}
	var ids []string
	for _, sb := range live {
		if sb.ImageDigest == digest && sb.Status != store.SandboxDestroyed {
			ids = append(ids, sb.ID)
		}
	}
	return ids, nil
}

// imagesExplain adds the fix to the store's errors an operator can act on.
func imagesExplain(err error) error {
	switch {
	case errors.Is(err, imagestore.ErrNotFound):
		return fmt.Errorf("%w (sandboxd images ls lists them)", err)
	case errors.Is(err, imagestore.ErrTooLarge):
		return fmt.Errorf("%w: raise --max-size if the image is meant to be that large", err)
	case errors.Is(err, imagestore.ErrDigest):
		return fmt.Errorf("%w: the image was changed or damaged after it was written; export or pull it again", err)
	}
	return err
}

func printImported(w io.Writer, im imagestore.Image) {
	names := make([]string, len(im.Packages))
	for i, p := range im.Packages {
		names[i] = p.Name + " " + p.Version
	}
	if im.Mode == imagestore.ModeWASM {
		fmt.Fprintf(w, "%s %s wasm on %s (python %s), %s, %d package(s): %s\n", im.Name, im.Digest, im.Base, im.Python, mib(im.Size), len(names), strings.Join(names, ", "))
		return
	}
	rt := im.Runtime
	if rt == "" {
		rt = "the server's"
	}
	fmt.Fprintf(w, "%s %s python %s, %s, runtime %s, %d package(s)\n", im.Name, im.Digest, im.Python, mib(im.Size), rt, len(names))
}

func shortDigest(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return d[:len(d)-len(hex)] + hex[:12]
	}
	return d
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
