package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/mountns"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// raw sends a request with a raw body and returns the response (the caller closes it).
func (s *server) raw(method, path, key string, body io.Reader, header ...string) *http.Response {
	s.t.Helper()
	req, _ := http.NewRequest(method, s.url+path, body)
	req.Header.Set("X-AgentCop-Key", key)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

func filesURL(id, p string) string { return "/api/sandbox/" + id + "/files?path=" + url.QueryEscape(p) }

// put uploads data and returns the status and the decoded answer.
func (s *server) put(id, p string, data []byte) (int, map[string]any) {
	s.t.Helper()
	resp := s.raw("PUT", filesURL(id, p), s.key, bytes.NewReader(data))
	defer resp.Body.Close()
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	return resp.StatusCode, m
}

// get downloads a file: status, body, ETag.
func (s *server) get(id, p string, header ...string) (int, []byte, string) {
	s.t.Helper()
	resp := s.raw("GET", filesURL(id, p), s.key, nil, header...)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header.Get("ETag")
}

type sse struct {
	id, event, data string
	at              time.Time
}

// events reads a run's event stream to its end.
func (s *server) events(id, runID, lastID string) []sse {
	s.t.Helper()
	var h []string
	if lastID != "" {
		h = []string{"Last-Event-ID", lastID}
	}
	resp := s.raw("GET", "/api/sandbox/"+id+"/runs/"+runID+"/events", s.key, nil, h...)
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		s.t.Fatalf("events: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	var out []sse
	var cur sse
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			cur.at = time.Now()
			out = append(out, cur)
			cur = sse{}
		case strings.HasPrefix(line, "id: "):
			cur.id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "event: "):
			cur.event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			cur.data = strings.TrimPrefix(line, "data: ")
		}
	}
	return out
}

func chunkText(e sse) string {
	var c struct{ Data string }
	json.Unmarshal([]byte(e.data), &c)
	return c.Data
}

// TestFilesAndLiveOutput is the README's walk-through: upload a CSV into a read_only path, run
// code that reads it and writes a report into a read_write path while its output is followed
// live, download the report — and every refusal the contract lists.
func TestFilesAndLiveOutput(t *testing.T) {
	s := sharedServer(t)
	id := s.create(s.key, map[string]any{"filesystem": map[string]any{
		"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/output"},
		"blocked": []string{"/workspace/data/private"}}})

	csv := []byte("region,amount\nnorth,10\nsouth,32\n")
	status, m := s.put(id, "/workspace/data/sales.csv", csv)
	sum := sha256.Sum256(csv)
	if status != 201 || m["sha256"] != hex.EncodeToString(sum[:]) || m["size"] != float64(len(csv)) || m["path"] != "/workspace/data/sales.csv" {
		t.Fatalf("upload: %d %v", status, m)
	}

	code := `import csv, json, time
rows = list(csv.DictReader(open("/workspace/data/sales.csv")))
print("read", len(rows), "rows", flush=True)
time.sleep(1.5)
total = sum(int(r["amount"]) for r in rows)
json.dump({"total": total}, open("/workspace/output/report.json", "w"))
print("total", total)
result = total`
	status, m = s.do("POST", "/api/sandbox/"+id+"/run", s.key, map[string]any{"code": code, "async": true})
	if status != 202 {
		t.Fatalf("async run: %d %v", status, m)
	}
	runID := m["run_id"].(string)
	evs := s.events(id, runID, "")
	if len(evs) < 3 || evs[len(evs)-1].event != "end" {
		t.Fatalf("events: %v", evs)
	}
	// Chunk boundaries are the writer's (unbuffered print writes piece by piece): the first line
	// is complete at some event, with the id counting its bytes.
	end := evs[len(evs)-1]
	var first sse
	text := ""
	for _, e := range evs[:len(evs)-1] {
		if text += chunkText(e); text == "read 2 rows\n" {
			first = e
			break
		}
	}
	if first.event != "stdout" || first.id != "12.0" {
		t.Errorf("the first line's last event: %+v (events %v)", first, evs)
	}
	if end.at.Sub(first.at) < time.Second {
		t.Errorf("the first chunk came %v before the end: not live", end.at.Sub(first.at))
	}
	var run map[string]any
	json.Unmarshal([]byte(end.data), &run)
	if run["status"] != "completed" || run["result"] != float64(42) || run["stdout"] != "read 2 rows\ntotal 42\n" {
		t.Fatalf("end event: %v", run)
	}
	// After the run: a replay, and a resume after the first chunk.
	replay := s.events(id, runID, "")
	var all string
	for _, e := range replay[:len(replay)-1] {
		all += chunkText(e)
	}
	if all != "read 2 rows\ntotal 42\n" {
		t.Errorf("replay: %q", all)
	}
	resumed := s.events(id, runID, first.id)
	rest := ""
	for _, e := range resumed[:len(resumed)-1] {
		rest += chunkText(e)
	}
	if rest != "total 42\n" || resumed[len(resumed)-2].id != "21.0" || resumed[len(resumed)-1].event != "end" {
		t.Errorf("resumed: %+v", resumed)
	}

	status, body, etag := s.get(id, "/workspace/output/report.json")
	rsum := sha256.Sum256(body)
	if status != 200 || string(body) != `{"total": 42}` || etag != `"`+hex.EncodeToString(rsum[:])+`"` {
		t.Fatalf("download: %d %q %s", status, body, etag)
	}
	if status, body, _ = s.get(id, "/workspace/output/report.json", "Range", "bytes=2-6"); status != 206 || string(body) != "total" {
		t.Errorf("range: %d %q", status, body)
	}
	if status, _, _ = s.get(id, "/workspace/output/report.json", "If-None-Match", etag); status != 304 {
		t.Errorf("conditional get: %d", status)
	}
	resp := s.raw("GET", filesURL(id, "/workspace/output/"), s.key, nil)
	var list struct {
		Entries []struct {
			Name string
			Size int64
			Type string
		}
	}
	json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if len(list.Entries) != 1 || list.Entries[0].Name != "report.json" || list.Entries[0].Type != "file" || list.Entries[0].Size != 13 {
		t.Errorf("listing: %+v", list)
	}

	// The sandbox owns what the host writes into its read_write paths.
	if status, _ = s.put(id, "/workspace/output/notes/todo.txt", []byte("v1")); status != 201 {
		t.Fatalf("upload into a new dir: %d", status)
	}
	r := s.run(s.key, id, "p = '/workspace/output/notes/todo.txt'\nopen(p, 'a').write(' v2')\nresult = open(p).read()", 30)
	if r["result"] != "v1 v2" {
		t.Errorf("sandbox edits an uploaded file: %v", r)
	}
	// What the sandbox plants is refused: a symlink out of the mount, a FIFO.
	s.run(s.key, id, "import os\nos.symlink('/etc/shadow', '/workspace/output/esc')\nos.symlink('../../../etc', '/workspace/output/up')\nos.mkfifo('/workspace/output/fifo')", 30)

	for _, tc := range []struct {
		method, path string
		want         int
		code         string
	}{
		{"GET", "/etc/passwd", 403, "path_not_allowed"},
		{"GET", "/workspace/data/private/x", 403, "path_not_allowed"},
		{"PUT", "/workspace/data/private/x", 403, "path_not_allowed"},
		{"GET", "/workspace/data/../output/report.json", 403, "path_not_allowed"},
		{"GET", "workspace/data/sales.csv", 403, "path_not_allowed"},
		{"GET", "/workspace/output/esc", 403, "path_not_allowed"},
		{"GET", "/workspace/output/up/passwd", 403, "path_not_allowed"},
		{"PUT", "/workspace/output/up/evil", 403, "path_not_allowed"},
		{"GET", "/workspace/output/fifo", 403, "path_not_allowed"},
		{"GET", "/workspace/output/missing", 404, "not_found"},
		{"GET", "", 400, "invalid_request"},
		{"PUT", "/workspace/output", 403, "path_not_allowed"},
		{"PUT", "/workspace/output/notes", 409, "conflict"},
		{"DELETE", "/workspace/output/notes", 409, "conflict"},
	} {
		var body io.Reader
		if tc.method == "PUT" {
			body = strings.NewReader("x")
		}
		resp := s.raw(tc.method, filesURL(id, tc.path), s.key, body)
		var env map[string]any
		json.NewDecoder(resp.Body).Decode(&env)
		resp.Body.Close()
		if resp.StatusCode != tc.want || env["error"] != tc.code {
			t.Errorf("%s %q: %d %v, want %d %s", tc.method, tc.path, resp.StatusCode, env, tc.want, tc.code)
		}
	}
	if _, err := os.Stat("/etc/evil"); err == nil {
		t.Fatal("an upload escaped the mount")
	}
	// Delete, then it is gone; another account sees nothing.
	if resp := s.raw("DELETE", filesURL(id, "/workspace/output/esc"), s.key, nil); resp.StatusCode != 204 {
		t.Errorf("delete: %d", resp.StatusCode)
	}
	if _, err := os.Stat("/etc/shadow"); err != nil {
		t.Fatal("deleting a symlink removed its target")
	}
	other := s.newKey("e2e-files-other", "free")
	if resp := s.raw("GET", filesURL(id, "/workspace/data/sales.csv"), other, nil); resp.StatusCode != 404 {
		t.Errorf("another account reads the file: %d", resp.StatusCode)
	}
	_, m = s.do("GET", "/api/audit?type=file.written&sandbox_id="+id, s.key, nil)
	if m["total"] != float64(2) {
		t.Errorf("file.written events: %v", m)
	}
	_, m = s.do("GET", "/api/audit?type=file.read&sandbox_id="+id, s.key, nil)
	if n, _ := m["total"].(float64); n < 2 {
		t.Errorf("file.read events: %v", m)
	}
	// Files live as long as the sandbox.
	s.do("DELETE", "/api/sandbox/"+id, s.key, nil)
	if status, m := s.put(id, "/workspace/output/late", []byte("x")); status != 409 || m["error"] != "sandbox_destroyed" {
		t.Errorf("upload after delete: %d %v", status, m)
	}
}

// TestLargeFileRoundTrip: 1 GiB up and down intact (on a disk of 3 GiB), the server's memory
// flat; an interrupted upload leaves nothing; over the limit is 413.
func TestLargeFileRoundTrip(t *testing.T) {
	hostOnly(t, "measures the serving process's memory and its staging files on the host")
	requireEnv(t)
	dir, err := os.MkdirTemp("", "sbxd-big-") // short: the agent's socket path has a length limit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := filepath.Join(dir, "sandboxd.json")
	os.WriteFile(cfg, []byte(`{"max_upload_bytes": 1073741824}`), 0o644)
	s := startServerWith(t, filepath.Join(dir, "data"), "--config", cfg)
	key := s.newKey("e2e-big", "pro")
	id := s.create(key, map[string]any{"filesystem": map[string]any{"read_write": []string{"/workspace/big"}},
		"resources": map[string]any{"disk": "3g"}}) // the blob, and the refused one streaming in
	s.key = key

	pid := s.servingPid()
	resetPeakRSS(t, pid)
	rssBefore := rss(t, pid, "VmRSS")
	const size = 1 << 30
	src := &randReader{r: rand.NewChaCha8([32]byte{7}), n: size}
	up := sha256.New()
	resp := s.raw("PUT", filesURL(id, "/workspace/big/blob"), s.key, io.TeeReader(src, up))
	var m map[string]any
	json.NewDecoder(resp.Body).Decode(&m)
	resp.Body.Close()
	want := hex.EncodeToString(up.Sum(nil))
	if resp.StatusCode != 201 || m["sha256"] != want || m["size"] != float64(size) {
		t.Fatalf("upload: %d %v", resp.StatusCode, m)
	}
	resp = s.raw("GET", filesURL(id, "/workspace/big/blob"), s.key, nil)
	down := sha256.New()
	var n int64
	n, err = io.Copy(down, resp.Body)
	resp.Body.Close()
	if err != nil || n != size || hex.EncodeToString(down.Sum(nil)) != want || resp.Header.Get("ETag") != `"`+want+`"` {
		t.Fatalf("download: %d bytes, %v, etag %s", n, err, resp.Header.Get("ETag"))
	}
	if grew := rss(t, pid, "VmHWM") - rssBefore; grew > 16<<20 {
		t.Errorf("the server's memory grew by %d MiB during a 1 GiB round trip", grew>>20)
	} else {
		t.Logf("peak RSS growth over the 1 GiB round trip: %.1f MiB", float64(grew)/(1<<20))
	}
	// Over the limit: refused from the Content-Length, and while streaming without one.
	resp = s.raw("PUT", filesURL(id, "/workspace/big/too"), s.key, &randReader{r: rand.NewChaCha8([32]byte{}), n: size + 1})
	resp.Body.Close()
	if resp.StatusCode != 413 {
		t.Errorf("over the limit: %d", resp.StatusCode)
	}
	// An upload cut off midway leaves no file.
	c, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "PUT %s HTTP/1.1\r\nHost: x\r\nX-AgentCop-Key: %s\r\nContent-Length: 10000000\r\n\r\n", filesURL(id, "/workspace/big/cut"), s.key)
	c.Write(bytes.Repeat([]byte("x"), 1<<20))
	// The server stages the upload, and drops what it staged once the client is gone.
	waitfor.True(t, 30*time.Second, func() bool { return len(s.stagedUploads()) > 0 })
	c.Close()
	waitfor.True(t, 30*time.Second, func() bool { return len(s.stagedUploads()) == 0 })
	for _, p := range []string{"/workspace/big/cut", "/workspace/big/too"} {
		if status, _, _ := s.get(id, p); status != 404 {
			t.Errorf("%s after a failed upload: %d", p, status)
		}
	}
	if r := s.run(s.key, id, "import os\nresult = sorted(os.listdir('/workspace/big'))", 30); fmt.Sprint(r["result"]) != "[blob]" {
		t.Errorf("the sandbox sees %v", r["result"])
	}
}

// stagedUploads lists the uploads the server s is receiving: the files in its sandboxes' staging
// directories (<disk>/.staging, internal/sandbox/host.go), on their disks, mounted below
// mountns.Base in the serving process's mount namespace, which its /proc/<pid>/root shows (not
// the launcher's: that one is the host's).
func (s *server) stagedUploads() []string {
	m, _ := filepath.Glob(fmt.Sprintf("/proc/%d/root%s/*/*/.staging/upload-*", s.servingPid(), mountns.Base))
	return m
}

type randReader struct {
	r *rand.ChaCha8
	n int64
}

func (r *randReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	n, _ := r.r.Read(p)
	r.n -= int64(n)
	return n, nil
}

// rss reads a memory figure (kB in /proc) of a process, in bytes.
func rss(t *testing.T, pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// resetPeakRSS makes VmHWM start again from the current RSS.
func resetPeakRSS(t *testing.T, pid int) {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatal(err)
	}
}
