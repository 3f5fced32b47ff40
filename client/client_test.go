package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

func fake(t *testing.T, h http.HandlerFunc) *Client {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return New(srv.URL, "sbxk_test")
}

func envelope(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.Error{Error: code, Message: msg, Code: status, Docs: "/docs/errors#" + code})
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    Error
	}{
		{"envelope", func(w http.ResponseWriter, r *http.Request) {
			envelope(w, 403, "image_not_approved", `image "x" is not approved`)
		}, Error{Status: 403, Code: CodeImageNotApproved, Message: `image "x" is not approved`, Docs: "/docs/errors#image_not_approved"}},
		{"retry after", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "3")
			envelope(w, 429, "rate_limited", "slow down")
		}, Error{Status: 429, Code: CodeRateLimited, Message: "slow down", Docs: "/docs/errors#rate_limited", RetryAfter: 3 * time.Second}},
		{"not an envelope", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "bad gateway\nmore", 502)
		}, Error{Status: 502, Code: "http_502", Message: "bad gateway"}},
		{"empty body", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(500)
		}, Error{Status: 500, Code: "http_500", Message: "Internal Server Error"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fake(t, tt.handler)
			_, err := c.Get(context.Background(), "sbx_x")
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("err %v (%T), want *Error", err, err)
			}
			if *e != tt.want {
				t.Fatalf("got %+v, want %+v", *e, tt.want)
			}
			if !errors.Is(err, &Error{Code: tt.want.Code}) || ErrorCode(err) != tt.want.Code {
				t.Fatalf("errors.Is / ErrorCode do not match %q", tt.want.Code)
			}
		})
	}
}

func TestAuthAndNoKey(t *testing.T) {
	var got atomic.Value
	c := fake(t, func(w http.ResponseWriter, r *http.Request) {
		got.Store(r.Header.Get("X-AgentCop-Key"))
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/health" {
			fmt.Fprint(w, `{"status":"ok","version":"1","runtimes":{"container":"ok"},"images":{"a":{"status":"ready"}}}`)
			return
		}
		fmt.Fprint(w, `{"images":[{"name":"a","mode":"container","digest":"sha256:1","default":true,"status":"ready"}]}`)
	})
	imgs, err := c.Images(context.Background())
	if err != nil || len(imgs.Images) != 1 || got.Load() != "sbxk_test" {
		t.Fatalf("images: %v %v, key sent %v", imgs, err, got.Load())
	}
	c.APIKey = ""
	if _, err := c.Images(context.Background()); !errors.Is(err, ErrNoKey) {
		t.Fatalf("no key: %v", err)
	}
	if _, err := c.Health(context.Background()); err != nil { // health needs none
		t.Fatalf("health without key: %v", err)
	}
}

func TestResolve(t *testing.T) {
	t.Setenv(EnvURL, "")
	t.Setenv(EnvKey, "")
	t.Setenv(EnvVendorKey, "")
	if u := ResolveURL(""); u != DefaultURL {
		t.Fatalf("default url %q", u)
	}
	t.Setenv(EnvURL, "localhost:9000/")
	if u := ResolveURL(""); u != "http://localhost:9000" {
		t.Fatalf("env url %q", u)
	}
	if u := ResolveURL("https://x.example/"); u != "https://x.example" {
		t.Fatalf("arg url %q", u)
	}
	t.Setenv(EnvKey, "ours")
	if k := ResolveKey(""); k != "ours" {
		t.Fatalf("key %q", k)
	}
	t.Setenv(EnvVendorKey, "vendor")
	if k := ResolveKey(""); k != "vendor" {
		t.Fatalf("vendor key %q", k)
	}
	if k := ResolveKey("arg"); k != "arg" {
		t.Fatalf("key %q", k)
	}
}

func TestCreateWaitsForReady(t *testing.T) {
	var polls atomic.Int32
	c := fake(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == "POST" && r.URL.Path == "/api/sandbox/create":
			var req api.CreateSandboxRequest
			dec := json.NewDecoder(r.Body)
			dec.DisallowUnknownFields()
			if err := dec.Decode(&req); err != nil || req.AgentID != "a" || req.Config.Resources.CPU != "0.5" {
				envelope(w, 400, "invalid_request", fmt.Sprint(err))
				return
			}
			w.WriteHeader(202)
			fmt.Fprint(w, `{"sandbox_id":"sbx_1","status":"provisioning","mode":"container"}`)
		case r.Method == "GET" && r.URL.Path == "/api/sandbox/sbx_1":
			status := "provisioning"
			if polls.Add(1) >= 3 {
				status = "ready"
			}
			fmt.Fprintf(w, `{"sandbox_id":"sbx_1","status":%q}`, status)
		default:
			envelope(w, 404, "not_found", r.URL.Path)
		}
	})
	ctx := context.Background()
	resp, err := c.Create(ctx, api.CreateSandboxRequest{AgentID: "a", Config: &api.Config{Resources: &api.Resources{CPU: "0.5"}}})
	if err != nil || resp.Status != "provisioning" {
		t.Fatalf("create: %+v %v", resp, err)
	}
	sb, err := c.WaitReady(ctx, resp.SandboxID)
	if err != nil || sb.Status != "ready" || polls.Load() != 3 {
		t.Fatalf("wait: %+v %v after %d polls", sb, err, polls.Load())
	}
}

func TestSSEReader(t *testing.T) {
	tests := []struct {
		name   string
		stream string
		want   []Event
		lastID string
	}{
		{"lf", "event: stdout\nid: 3.0\ndata: {\"data\":\"hi\\n\"}\n\n", []Event{{ID: "3.0", Type: "stdout", Data: []byte(`{"data":"hi\n"}`)}}, "3.0"},
		{"crlf and cr", "event: stderr\r\nid: 0.2\r\ndata: {}\r\n\r\n: comment\rdata:x\r\r", []Event{
			{ID: "0.2", Type: "stderr", Data: []byte("{}")}, {ID: "0.2", Type: "message", Data: []byte("x")}}, "0.2"},
		{"multi-line data, unknown fields", "retry: 10\nfoo: bar\ndata: a\ndata\ndata:  b\n\n", []Event{{Type: "message", Data: []byte("a\n\n b")}}, ""},
		{"id-only block moves the last id", "id: 7.1\n\nevent: end\ndata: {}\n\n", []Event{{ID: "7.1", Type: "end", Data: []byte("{}")}}, "7.1"},
		{"unterminated event is dropped", "event: stdout\ndata: x\n", nil, ""},
		{"empty id resets", "id: 1.0\ndata: a\n\nid\ndata: b\n\n", []Event{{ID: "1.0", Type: "message", Data: []byte("a")}, {ID: "", Type: "message", Data: []byte("b")}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Feed one byte at a time too: line ends split across reads (a CR then its LF).
			for _, r := range []io.Reader{strings.NewReader(tt.stream), &oneByteReader{s: tt.stream}} {
				sr := newSSEReader(r, "")
				var got []Event
				for {
					ev, err := sr.next()
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, ev)
				}
				if !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("got %q\nwant %q", got, tt.want)
				}
				if sr.lastID != tt.lastID {
					t.Fatalf("last id %q, want %q", sr.lastID, tt.lastID)
				}
			}
		})
	}
}

type oneByteReader struct {
	s string
	i int
}

func (r *oneByteReader) Read(p []byte) (int, error) {
	if r.i >= len(r.s) {
		return 0, io.EOF
	}
	p[0] = r.s[r.i]
	r.i++
	return 1, nil
}

// eventsServer mimics GET …/events: output chunks with ids "<out>.<err>" and a final end event;
// it cuts the first connection after `cut` chunks, and resumes from Last-Event-ID.
type eventsServer struct {
	chunks  []struct{ stream, text string }
	cut     int
	mu      sync.Mutex
	resumes []string // Last-Event-ID of each connection
}

func (s *eventsServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/events") || r.Header.Get("Accept") != "text/event-stream" {
		envelope(w, 404, "not_found", r.URL.Path)
		return
	}
	last := r.Header.Get("Last-Event-ID")
	s.mu.Lock()
	s.resumes = append(s.resumes, last)
	first := len(s.resumes) == 1
	s.mu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream")
	var out, errb int
	sent := 0
	var stdout, stderr strings.Builder
	for _, c := range s.chunks {
		if c.stream == "stdout" {
			out += len(c.text)
			stdout.WriteString(c.text)
		} else {
			errb += len(c.text)
			stderr.WriteString(c.text)
		}
		id := fmt.Sprintf("%d.%d", out, errb)
		if last != "" {
			var lo, le int
			fmt.Sscanf(last, "%d.%d", &lo, &le)
			if out <= lo && errb <= le {
				continue
			}
		}
		if first && sent == s.cut {
			// Half an event, then the connection drops.
			fmt.Fprintf(w, "event: %s\nid: %s\n", c.stream, id)
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		d, _ := json.Marshal(api.OutputChunk{Data: c.text})
		fmt.Fprintf(w, "event: %s\nid: %s\ndata: %s\n\n", c.stream, id, d)
		w.(http.Flusher).Flush()
		sent++
	}
	fmt.Fprint(w, ": keep-alive\n\n")
	run, _ := json.Marshal(api.Run{RunID: "run_1", Status: "completed", ExitCode: Int(0), Stdout: stdout.String(), Stderr: stderr.String()})
	fmt.Fprintf(w, "event: end\ndata: %s\n\n", run)
}

func TestFollowResumes(t *testing.T) {
	es := &eventsServer{cut: 2, chunks: []struct{ stream, text string }{
		{"stdout", "one\n"}, {"stderr", "warn\n"}, {"stdout", "twö\n"}, {"stdout", "three\n"}}}
	srv := httptest.NewServer(es)
	defer srv.Close()
	c := New(srv.URL, "k")
	var got strings.Builder
	run, err := c.Follow(context.Background(), "sbx_1", "run_1", func(stream, text string) error {
		fmt.Fprintf(&got, "%s:%s", stream, text)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "stdout:one\nstderr:warn\nstdout:twö\nstdout:three\n"
	if got.String() != want || run.Status != "completed" || run.Stdout != "one\ntwö\nthree\n" {
		t.Fatalf("output %q, run %+v", got.String(), run)
	}
	if !reflect.DeepEqual(es.resumes, []string{"", "4.5"}) {
		t.Fatalf("Last-Event-ID per connection: %q", es.resumes)
	}
}

func TestFollowStops(t *testing.T) {
	es := &eventsServer{cut: -1, chunks: []struct{ stream, text string }{{"stdout", "a"}, {"stdout", "b"}}}
	srv := httptest.NewServer(es)
	defer srv.Close()
	c := New(srv.URL, "k")
	stop := errors.New("stop")
	if _, err := c.Follow(context.Background(), "sbx_1", "run_1", func(string, string) error { return stop }); err != stop {
		t.Fatalf("callback error: %v", err)
	}
	c = fake(t, func(w http.ResponseWriter, r *http.Request) { envelope(w, 404, "not_found", "no run") })
	if _, err := c.Follow(context.Background(), "sbx_1", "run_2", nil); ErrorCode(err) != CodeNotFound {
		t.Fatalf("unknown run: %v", err)
	}
	// A server that always drops the stream before the end: Follow gives up.
	c = fake(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
	})
	if _, err := c.Follow(context.Background(), "sbx_1", "run_1", nil); err == nil || !strings.Contains(err.Error(), "ended before") {
		t.Fatalf("endless drops: %v", err)
	}
}

func TestPutFile(t *testing.T) {
	var bodyRead atomic.Int64
	var lie atomic.Bool
	c := fake(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/sandbox/sbx_1/files" || r.Method != "PUT" {
			envelope(w, 404, "not_found", r.URL.Path)
			return
		}
		if r.Header.Get("Expect") != "100-continue" {
			envelope(w, 400, "invalid_request", "no Expect header")
			return
		}
		path := r.URL.Query().Get("path")
		if !strings.HasPrefix(path, "/workspace/") {
			envelope(w, 403, "path_not_allowed", path+" is outside the sandbox's declared paths")
			return
		}
		if r.ContentLength > 1<<20 {
			envelope(w, 413, "payload_too_large", "too big")
			return
		}
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		bodyRead.Add(n)
		sum := hex.EncodeToString(h.Sum(nil))
		if lie.Load() {
			sum = strings.Repeat("0", 64)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(201)
		json.NewEncoder(w).Encode(api.FileWritten{Path: path, Size: n, SHA256: sum})
	})
	ctx := context.Background()
	data := bytes.Repeat([]byte("0123456789"), 1000)
	fw, err := c.PutFile(ctx, "sbx_1", "/workspace/data/a.txt", bytes.NewReader(data), int64(len(data)))
	if err != nil || fw.Size != int64(len(data)) {
		t.Fatalf("put: %+v %v", fw, err)
	}
	// Unknown length: chunked.
	if fw, err = c.PutFile(ctx, "sbx_1", "/workspace/data/b", io.MultiReader(bytes.NewReader(data)), -1); err != nil || fw.Size != int64(len(data)) {
		t.Fatalf("put chunked: %+v %v", fw, err)
	}
	if fw, err = c.PutFile(ctx, "sbx_1", "/workspace/data/empty", bytes.NewReader(nil), 0); err != nil || fw.Size != 0 {
		t.Fatalf("put empty: %+v %v", fw, err)
	}
	before := bodyRead.Load()
	if _, err := c.PutFile(ctx, "sbx_1", "/etc/passwd", bytes.NewReader(data), int64(len(data))); ErrorCode(err) != CodePathNotAllowed {
		t.Fatalf("outside: %v", err)
	}
	big := io.LimitReader(zeros{}, 64<<20)
	if _, err := c.PutFile(ctx, "sbx_1", "/workspace/data/big", big, 64<<20); ErrorCode(err) != CodePayloadTooLarge {
		t.Fatalf("too large: %v", err)
	}
	if bodyRead.Load() != before {
		t.Fatalf("refused uploads were read by the server")
	}
	lie.Store(true)
	var ce *ChecksumError
	if _, err := c.PutFile(ctx, "sbx_1", "/workspace/data/a.txt", bytes.NewReader(data), int64(len(data))); !errors.As(err, &ce) {
		t.Fatalf("checksum: %v", err)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestDownload(t *testing.T) {
	content := []byte("hello, sandbox\n")
	sum := sha256.Sum256(content)
	etag := `"` + hex.EncodeToString(sum[:]) + `"`
	var corrupt atomic.Bool
	c := fake(t, func(w http.ResponseWriter, r *http.Request) {
		path := r.URL.Query().Get("path")
		switch {
		case strings.HasSuffix(path, "/") && path != "/workspace/out/f.txt/":
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(api.FileList{Path: path, Entries: []api.FileEntry{{Name: "f.txt", Size: 15, Type: "file"}}})
		case strings.TrimSuffix(path, "/") == "/workspace/out/f.txt": // as sandboxd does, a "/" after a file
			w.Header().Set("ETag", etag)
			body := content
			if corrupt.Load() {
				body = []byte("hello, sandbOx\n")
			}
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
		case path == "/workspace/out/json.txt": // a file whose bytes are JSON is still a file
			w.Header().Set("ETag", `"`+strings.Repeat("a", 64)+`"`)
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{}`)
		default:
			envelope(w, 404, "not_found", path)
		}
	})
	ctx := context.Background()
	var buf bytes.Buffer
	n, got, err := c.Download(ctx, "sbx_1", "/workspace/out/f.txt", &buf)
	if err != nil || n != int64(len(content)) || got != etag[1:65] || buf.String() != string(content) {
		t.Fatalf("download: %d %s %v %q", n, got, err, buf.String())
	}
	f, err := c.GetFile(ctx, "sbx_1", "/workspace/out/f.txt", &Range{Offset: 7, Length: 7})
	if err != nil {
		t.Fatal(err)
	}
	part, _ := io.ReadAll(f)
	f.Close()
	if string(part) != "sandbox" || !f.Partial || f.Total != int64(len(content)) {
		t.Fatalf("range: %q partial %v total %d", part, f.Partial, f.Total)
	}
	corrupt.Store(true)
	var ce *ChecksumError
	if _, _, err := c.Download(ctx, "sbx_1", "/workspace/out/f.txt", io.Discard); !errors.As(err, &ce) {
		t.Fatalf("corrupt download: %v", err)
	}
	if _, _, err := c.Download(ctx, "sbx_1", "/workspace/out/", io.Discard); !errors.Is(err, ErrIsDirectory) {
		t.Fatalf("directory download: %v", err)
	}
	if _, _, err := c.Download(ctx, "sbx_1", "/workspace/out/json.txt", io.Discard); !errors.As(err, &ce) {
		t.Fatalf("json file: %v (want it treated as a file, and its fake ETag to mismatch)", err)
	}
	list, err := c.ListFiles(ctx, "sbx_1", "/workspace/out")
	if err != nil || list.Path != "/workspace/out/" || len(list.Entries) != 1 {
		t.Fatalf("list: %+v %v", list, err)
	}
	if _, err := c.ListFiles(ctx, "sbx_1", "/workspace/out/f.txt"); !errors.Is(err, ErrNotDirectory) {
		t.Fatalf("list a file: %v", err)
	}
	if _, _, err := c.Download(ctx, "sbx_1", "/workspace/out/missing", io.Discard); ErrorCode(err) != CodeNotFound {
		t.Fatalf("missing: %v", err)
	}
}
