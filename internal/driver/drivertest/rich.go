package drivertest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// testRich: the trailing expression's repr is the run's Display; display() calls and the trailing
// value's rich form (_repr_html_, _repr_png_, …) are its Outputs, within the runner's limits.
func testRich(t *testing.T, h Harness, d driver.Driver) {
	id := h.Sandbox(t, d, h.Spec(t))
	const html = "class H:\n    def _repr_html_(self): return '<b>h</b>'\n    def __repr__(self): return 'H()'\n"
	const png = "class P:\n    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\n\\x00\\xff'\n"
	for _, tc := range []struct {
		name      string
		code      string
		display   string   // "-": none
		outputs   []string // "type kind data"
		truncated bool
		result    string // the run's result, as JSON ("": not checked)
	}{
		{name: "no expression", code: "x = 3", display: "-"},
		{name: "print returns None", code: "print(1)", display: "-"},
		{name: "constant", code: "1+1", display: "2"},
		{name: "name after comments", code: "x = {'a': 1}\nx\n# done\n\n", display: "{'a': 1}"},
		{name: "multi-line expression", code: "x = 2\n(x *\n  21)", display: "42"},
		{name: "indented last line is no expression", code: "if True:\n    5", display: "-"},
		{name: "continued assignment", code: "x = 1 + \\\n  2", display: "-"},
		{name: "error in the expression", code: "x = 1\nx / 0", display: "-"},
		{name: "rich value", code: html + "H()", display: "H()", outputs: []string{"text/html result <b>h</b>"}},
		{name: "display calls", code: "display(1, 'a')\n" + html + "display(H())",
			display: "-", outputs: []string{"text/plain display 1", "text/plain display 'a'", "text/html display <b>h</b>"}},
		{name: "binary", code: png + "display(P())", display: "-", outputs: []string{"image/png display \x89PNG\r\n\x1a\n\x00\xff"}},
		{name: "too many", code: "display(*range(40))", display: "-", outputs: firstN(32), truncated: true},
		{name: "too large", code: "display('x' * (6 << 20), 'y' * (3 << 20), 'z')", display: "-",
			outputs: []string{"text/plain display '" + strings.Repeat("x", 6<<20) + "'", "text/plain display 'z'"}, truncated: true},
		// 4 MiB of control characters: 24 MiB of JSON escapes, over the report's room; left out,
		// and the report (its result) is kept.
		{name: "escapes count", code: "class C:\n    def _repr_html_(self): return '\\x01' * (4 << 20)\ndisplay(C(), 'a')\nresult = 5",
			display: "-", outputs: []string{"text/plain display 'a'"}, truncated: true, result: "5"},
		// Characters count in UTF-8 bytes: 2 Mi '€' (6 MiB) and 1680 KiB of escapes are 11.8 Mi
		// characters of JSON but 15.8 MiB, which with the result's 1 MB is over the report's room.
		{name: "multi-byte characters count in bytes",
			code:    "class C:\n    def _repr_html_(self): return '\\u20ac' * (2 << 20) + '\\x01' * (1680 << 10)\ndisplay(C(), 'a')\nresult = 'x' * 1000000",
			display: "-", outputs: []string{"text/plain display 'a'"}, truncated: true, result: `"` + strings.Repeat("x", 1000000) + `"`},
		// The code lifts the runner's limits (it controls the runner's process) and fills the
		// report to its cap with '<', which HTML escaping would make six times as long: the run
		// still completes, the host keeps what its own limits allow.
		{name: "report at the cap of markup", code: "import sys\nr = sys._getframe(1).f_globals\n" +
			"r['_MAX_OUTPUT_BYTES'] = r['_MAX_OUTPUT_JSON'] = 32 << 20\n" +
			"display('<' * ((8 << 20) - 2), '<' * ((8 << 20) - 4096))\nresult = 5",
			display: "-", outputs: []string{"text/plain display '" + strings.Repeat("<", 8<<20-2) + "'"}, truncated: true, result: "5"},
		{name: "own display kept", code: "display = len\ndisplay('abc')", display: "3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: tc.code, Timeout: time.Minute, MaxOutput: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			got := "-"
			if res.Display != nil {
				got = *res.Display
			}
			if got != tc.display {
				t.Errorf("display %q, want %q (stderr %s)", got, tc.display, res.Stderr)
			}
			var outs []string
			for _, o := range res.Outputs {
				outs = append(outs, o.Type+" "+o.Kind+" "+string(o.Data))
			}
			if len(outs) != len(tc.outputs) {
				t.Fatalf("%d outputs, want %d: %.300q (stderr %s)", len(outs), len(tc.outputs), outs, res.Stderr)
			}
			for i := range outs {
				if outs[i] != tc.outputs[i] {
					t.Errorf("output %d: %.200q, want %.200q", i, outs[i], tc.outputs[i])
				}
			}
			if tc.result != "" && !SameJSON(res.Result, tc.result) {
				t.Errorf("result %s, want %s", res.Result, tc.result)
			}
			if res.OutputsTruncated != tc.truncated {
				t.Errorf("truncated %v, want %v", res.OutputsTruncated, tc.truncated)
			}
		})
	}
}

func firstN(n int) []string {
	var out []string
	for i := range min(n, pyrunner.MaxOutputs) {
		out = append(out, fmt.Sprintf("text/plain display %d", i))
	}
	return out
}
