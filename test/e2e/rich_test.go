package e2e

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestRichResults: as in a notebook, on the default image — a DataFrame as the last line is the
// run's display (its text) and an HTML output; a matplotlib figure is a PNG output read through
// the files API and announced in the run's events; a context closes the figures it showed; and a
// hostile report (the code writes its own to the runner's descriptor) is cut to the rules.
func TestRichResults(t *testing.T) {
	s := sharedServer(t)
	pro := s.newKey("e2e-rich", "pro")
	id := s.create(pro, map[string]any{"filesystem": map[string]any{"read_only": []string{"/workspace/data"}}})
	run := func(body map[string]any) map[string]any {
		t.Helper()
		status, m := s.do("POST", "/api/sandbox/"+id+"/run", pro, body)
		if status != 200 || m["status"] != "completed" {
			t.Fatalf("run %v: %d %v", body["code"], status, m)
		}
		return m
	}
	outputs := func(r map[string]any) []map[string]any {
		var out []map[string]any
		for _, o := range r["outputs"].([]any) {
			out = append(out, o.(map[string]any))
		}
		return out
	}
	read := func(p string) []byte {
		t.Helper()
		resp := s.raw("GET", filesURL(id, p), pro, nil)
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", p, resp.StatusCode, b.Bytes())
		}
		return b.Bytes()
	}

	r := run(map[string]any{"code": "import pandas as pd\ndf = pd.DataFrame({'region': ['north', 'south'], 'units': [10, 4]})\ndf.head()"})
	outs := outputs(r)
	if d, _ := r["display"].(string); !strings.Contains(d, "region") || !strings.Contains(d, "north") || len(outs) != 1 ||
		outs[0]["type"] != "text/html" || outs[0]["kind"] != "result" {
		t.Fatalf("DataFrame: display %q outputs %v", r["display"], r["outputs"])
	}
	if html := read(outs[0]["path"].(string)); !bytes.Contains(html, []byte("<table")) || int64(len(html)) != int64(outs[0]["size"].(float64)) {
		t.Errorf("HTML output: %q", html)
	}

	r = run(map[string]any{"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"})
	outs = outputs(r)
	if r["display"] != nil || len(outs) != 1 || outs[0]["type"] != "image/png" || outs[0]["kind"] != "figure" {
		t.Fatalf("figure: display %v outputs %v (stderr %s)", r["display"], r["outputs"], r["stderr"])
	}
	if png := read(outs[0]["path"].(string)); !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Errorf("PNG output starts %q", png[:min(len(png), 8)])
	}
	s.t = t
	saved := s.key
	s.key = pro
	evs := s.events(id, r["run_id"].(string), "")
	s.key = saved
	var outEvents []string
	for _, e := range evs {
		if e.event == "output" {
			outEvents = append(outEvents, e.data)
		}
	}
	if len(outEvents) != 1 || !strings.Contains(outEvents[0], outs[0]["path"].(string)) {
		t.Errorf("output events %q", outEvents)
	}

	// A context: display() and the figure of one run; the next run shows no figure again.
	status, m := s.do("POST", "/api/sandbox/"+id+"/contexts", pro, nil)
	if status != 201 {
		t.Fatalf("context: %d %v", status, m)
	}
	cx := m["context_id"].(string)
	r = run(map[string]any{"context": cx, "code": "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([3, 1])\ndisplay({'a': 1})\nlen('abc')"})
	if outs = outputs(r); r["display"] != "3" || len(outs) != 2 || outs[0]["type"] != "text/plain" || outs[1]["kind"] != "figure" {
		t.Fatalf("context run: display %v outputs %v (stderr %s)", r["display"], r["outputs"], r["stderr"])
	}
	r = run(map[string]any{"context": cx, "code": "fig, ax = plt.subplots()\nax.plot([1, 3])\nfig"})
	if outs = outputs(r); len(outs) != 1 || outs[0]["type"] != "image/png" || outs[0]["kind"] != "result" {
		t.Fatalf("a figure as the last line, shown once: outputs %v (stderr %s)", r["outputs"], r["stderr"])
	}
	r = run(map[string]any{"context": cx, "code": "fig is not None"})
	if r["display"] != "True" || len(outputs(r)) != 0 {
		t.Errorf("next context run: display %v outputs %v", r["display"], r["outputs"])
	}

	// Hostile reports, written to the runner's descriptor before the runner could.
	items := make([]string, 1000)
	for i := range items {
		items[i] = `{"type": "text/plain", "kind": "display", "data": "x"}`
	}
	bad := `{"display": 5, "outputs": [{"type": "../../etc/passwd", "data": "x"}, {"type": "image/png", "data": "!!"}, ` + strings.Join(items, ", ") + `]}`
	code, _ := json.Marshal(bad)
	r = run(map[string]any{"code": "import os\nos.write(4, " + string(code) + ".encode())\nos._exit(0)"})
	if outs = outputs(r); r["display"] != nil || len(outs) != 32 || r["outputs_truncated"] != true || outs[31]["path"] != "/.outputs/"+r["run_id"].(string)+"/31.txt" {
		t.Errorf("hostile report: display %v, %d outputs, truncated %v", r["display"], len(outs), r["outputs_truncated"])
	}
	r = run(map[string]any{"code": "import os\nb = b'{\"outputs\": [{\"type\": \"text/plain\", \"data\": \"' + b'x' * (40 << 20) + b'\"}]}'\nwhile b:\n    b = b[os.write(4, b):]\nos._exit(0)"})
	if len(outputs(r)) != 0 {
		t.Errorf("huge report: %d outputs", len(outputs(r)))
	}
	// The sandbox works on.
	if r = run(map[string]any{"code": "1+1"}); r["display"] != "2" {
		t.Errorf("after: display %v", r["display"])
	}
}
