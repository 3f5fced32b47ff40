package httpapi_test

import (
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/httpapi"
)

// TestRichOutputs: a run's display and outputs (the fake driver reads a runner report as the real
// drivers do) are on the run, readable as files below /.outputs/<run id>/, read-only, and in the
// run's events; what a hostile report holds beyond the rules is left out.
func TestRichOutputs(t *testing.T) {
	f := setup(t, httpapi.Options{})
	_, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, seedCreate)
	id := m["sandbox_id"].(string)
	png := "\x89PNG\r\n\x1a\nfake"
	report, _ := json.Marshal(map[string]any{
		"display": "   a\n0  1",
		"outputs": []map[string]string{
			{"type": "text/html", "kind": "result", "data": "<table></table>"},
			{"type": "image/png", "kind": "figure", "data": base64.StdEncoding.EncodeToString([]byte(png))},
			{"type": "application/x-sh", "kind": "display", "data": "rm -rf /"},
			{"type": "text/plain", "kind": "../../../etc", "data": "x"},
		},
	})
	body, _ := json.Marshal(map[string]string{"code": "rich:" + string(report)})
	status, run, _ := call(t, "POST", f.url+"/api/sandbox/"+id+"/run", f.key, string(body))
	if status != 200 || run["status"] != "completed" || run["display"] != "   a\n0  1" || run["outputs_truncated"] != true {
		t.Fatalf("run: %d %v", status, run)
	}
	runID := run["run_id"].(string)
	outs := run["outputs"].([]any)
	want := []struct{ typ, kind, path, data string }{
		{"text/html", "result", "/.outputs/" + runID + "/0.html", "<table></table>"},
		{"image/png", "figure", "/.outputs/" + runID + "/1.png", png},
		{"text/plain", "display", "/.outputs/" + runID + "/2.txt", "x"},
	}
	if len(outs) != len(want) {
		t.Fatalf("outputs %v", outs)
	}
	for i, w := range want {
		o := outs[i].(map[string]any)
		if o["type"] != w.typ || o["kind"] != w.kind || o["path"] != w.path || o["size"] != float64(len(w.data)) {
			t.Errorf("output %d: %v, want %+v", i, o, w)
		}
		if got := getFile(t, f, id, w.path); got != w.data {
			t.Errorf("file %s: %q, want %q", w.path, got, w.data)
		}
	}
	// Read-only, whatever the path.
	for _, p := range []string{want[0].path, "/.outputs/" + runID + "/new.txt", "/.outputs/x"} {
		if status, m, _ := call(t, "PUT", f.url+"/api/sandbox/"+id+"/files?path="+url.QueryEscape(p), f.key, "x"); status != 403 || m["error"] != "path_not_allowed" {
			t.Errorf("PUT %s: %d %v", p, status, m)
		}
		if status, m, _ := call(t, "DELETE", f.url+"/api/sandbox/"+id+"/files?path="+url.QueryEscape(p), f.key, ""); status != 403 || m["error"] != "path_not_allowed" {
			t.Errorf("DELETE %s: %d %v", p, status, m)
		}
	}
	if status, m, _ := call(t, "GET", f.url+"/api/sandbox/"+id+"/files?path=/.outputs/"+runID+"/", f.key, ""); status != 200 || len(m["entries"].([]any)) != 3 {
		t.Errorf("list: %d %v", status, m)
	}
	// The run as stored, and its events.
	if status, m, _ := call(t, "GET", f.url+"/api/sandbox/"+id+"/runs/"+runID, f.key, ""); status != 200 || len(m["outputs"].([]any)) != 3 || m["display"] != run["display"] {
		t.Errorf("get run: %d %v", status, m)
	}
	b := getRaw(t, f, "/api/sandbox/"+id+"/runs/"+runID+"/events")
	if n := strings.Count(string(b), "event: output\ndata: {\"type\":"); n != 3 || !strings.Contains(string(b), `"path":"`+want[1].path+`"`) ||
		strings.Index(string(b), "event: output") > strings.Index(string(b), "event: end") {
		t.Errorf("events: %s", b)
	}
	// No filesystem rule may name the outputs' path.
	if status, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, `{"agent_id":"a","config":{"filesystem":{"read_write":["/.outputs/x"]}}}`); status != 400 {
		t.Errorf("create with /.outputs: %d %v", status, m)
	}
	// A plain run has no display and an empty list.
	status, m, _ = call(t, "POST", f.url+"/api/sandbox/"+id+"/run", f.key, `{"code":"x = 1"}`)
	if status != 200 || m["display"] != nil || len(m["outputs"].([]any)) != 0 || m["outputs_truncated"] != false {
		t.Errorf("plain run: %d %v", status, m)
	}
}

func getFile(t *testing.T, f fixture, id, p string) string {
	t.Helper()
	return string(getRaw(t, f, "/api/sandbox/"+id+"/files?path="+url.QueryEscape(p)))
}

// getRaw GETs path with f's key and returns the body of its 200 answer.
func getRaw(t *testing.T, f fixture, path string) []byte {
	t.Helper()
	req, _ := http.NewRequest("GET", f.url+path, nil)
	req.Header.Set("X-AgentCop-Key", f.key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Errorf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	return b
}
