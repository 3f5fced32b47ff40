package wasm

import (
	"context"
	"encoding/json"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/imagestore"
	"github.com/sandboxd/sandboxd/internal/imagestore/imagetest"
)

// TestPythonSitePackages: a WASM image of pure-Python packages (a wheel built here, imported
// into an image store, whose directories are root's 0700) is importable in a sandbox given its
// root as Spec.SitePackages — with its metadata, read-only — and absent from one without it.
func TestPythonSitePackages(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	st, err := imagestore.Open(filepath.Join(t.TempDir(), "images"))
	if err != nil {
		t.Fatal(err)
	}
	wheels := t.TempDir()
	imagetest.Wheel(t, wheels, "thepkg-1.0-py3-none-any.whl", "thepkg", "1.0",
		imagetest.WheelFile{Name: "thepkg/__init__.py", Body: "from .core import answer\nVALUE = 42\n"},
		imagetest.WheelFile{Name: "thepkg/core.py", Body: "def answer():\n    return 'from a wheel'\n"})
	im, err := st.Import(context.Background(), wheels, "team/wasm:1", imagestore.Options{Mode: imagestore.ModeWASM})
	if err != nil {
		t.Fatal(err)
	}
	const code = `
import errno, importlib.metadata as md
try:
    import thepkg
except ImportError as e:
    result = ["ImportError", str(e)]
else:
    result = [thepkg.VALUE, thepkg.answer(), thepkg.__file__, md.version("thepkg")]
    try:
        open(thepkg.__file__, "a")
        result.append("written")
    except OSError as e:
        result.append(errno.errorcode[e.errno])
`
	for _, tc := range []struct {
		name string
		site string
		want []any
	}{
		{"with the image's packages", st.RootFS(im.Digest),
			[]any{42.0, "from a wheel", "/usr/local/lib/python3.11/dist-packages/thepkg/__init__.py", "1.0", "EROFS"}},
		{"without", "", []any{"ImportError", "No module named 'thepkg'"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := baseSpec(t, pyImage)
			spec.SitePackages = tc.site
			id := harness.Sandbox(t, d, spec)
			res := drivertest.Exec(t, d, id, code, 30*time.Second)
			var got []any
			if err := json.Unmarshal(res.Result, &got); err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("result %s (%v), want %v; stderr %s", res.Result, err, tc.want, res.Stderr)
			}
		})
	}
}
