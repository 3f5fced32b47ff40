package openapitest_test

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/openapitest"
)

const run = `{"run_id":"run_x","sandbox_id":"sbx_y","status":"completed","exit_code":0,"stdout":"","stderr":"",
 "stdout_truncated":false,"stderr_truncated":false,"result":{"rows":[{"a":1}]},"error":null,
 "created_at":"2026-04-06T14:23:11Z","started_at":"2026-04-06T14:23:11.5Z","finished_at":"2026-04-06T14:23:12Z",
 "duration_ms":41,"usage":{"cpu_ms":38,"memory_peak_bytes":9437184},"network":{"allowed":0,"denied":0}}`

// unreadable fails the test if anything reads it.
type unreadable struct{ t *testing.T }

func (u unreadable) Read([]byte) (int, error) {
	u.t.Error("a streaming body was read")
	return 0, errors.New("unreadable")
}
func (u unreadable) Close() error { return nil }

// TestCheck holds fabricated answers to the real document: the checker must catch each mismatch.
func TestCheck(t *testing.T) {
	c, err := openapitest.New(api.OpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	json := "application/json"
	cases := []struct {
		name, method, path string
		status             int
		ctype, body        string
		header             []string
		stream             bool
		fails              string // "" = valid; else a part of the error
	}{
		{"run", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, run, nil, false, ""},
		{"run under v1", "GET", "/api/v1/sandbox/sbx_y/runs/run_x", 200, json, run, nil, false, ""},
		{"undeclared property", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"stdout":""`, `"stdout":"","colour":1`, 1), nil, false, "colour"},
		{"undeclared nested property", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"cpu_ms":38`, `"cpu_ms":38,"gpu_ms":1`, 1), nil, false, "gpu_ms"},
		{"missing property", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"exit_code":0,`, ``, 1), nil, false, "exit_code"},
		{"null where not nullable", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"stdout":""`, `"stdout":null`, 1), nil, false, "stdout"},
		{"status out of enum", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"completed"`, `"done"`, 1), nil, false, "status"},
		{"timestamp not UTC", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, json, strings.Replace(run, `"2026-04-06T14:23:11Z"`, `"2026-04-06T16:23:11+02:00"`, 1), nil, false, "created_at"},
		{"undeclared status", "GET", "/api/sandbox/sbx_y/runs/run_x", 418, json, run, nil, false, "418"},
		{"undeclared content type", "GET", "/api/sandbox/sbx_y/runs/run_x", 200, "text/html", "<p>", nil, false, "text/html"},
		{"error envelope", "GET", "/api/sandbox/sbx_y", 404, json, `{"error":"not_found","message":"no sandbox","code":404,"docs":"/docs/errors#not_found"}`, nil, false, ""},
		{"error code of another status", "GET", "/api/sandbox/sbx_y", 404, json, `{"error":"conflict","message":"x","code":404,"docs":"/docs/errors#conflict"}`, nil, false, "error"},
		{"error without docs", "GET", "/api/sandbox/sbx_y", 404, json, `{"error":"not_found","message":"x","code":404}`, nil, false, "docs"},
		{"429 without Retry-After", "GET", "/api/sandbox", 429, json, `{"error":"rate_limited","message":"x","code":429,"docs":"/docs/errors#rate_limited"}`, nil, false, "Retry-After"},
		{"429", "GET", "/api/sandbox", 429, json, `{"error":"rate_limited","message":"x","code":429,"docs":"/docs/errors#rate_limited"}`, []string{"Retry-After", "1"}, false, ""},
		{"free-form detail and map", "GET", "/health", 200, json, `{"status":"ok","version":"1","runtimes":{"container":"ok","wasm":"ok"}}`, nil, false, ""},
		{"event stream unread", "GET", "/api/sandbox/sbx_y/runs/run_x/events", 200, "text/event-stream", "", []string{"Cache-Control", "no-cache", "X-Accel-Buffering", "no"}, true, ""},
		{"download unread", "GET", "/api/sandbox/sbx_y/files", 200, "application/octet-stream", "", []string{"ETag", `"` + strings.Repeat("a", 64) + `"`}, true, ""},
		{"download with a bad ETag", "GET", "/api/sandbox/sbx_y/files", 200, "application/octet-stream", "", []string{"ETag", `"nope"`}, true, "etag"},
		{"metrics", "GET", "/metrics", 200, "text/plain; version=0.0.4; charset=utf-8; escaping=underscores", "", nil, true, ""},
		{"no such route", "GET", "/api/nothing", 404, json, `{"error":"not_found","message":"no route","code":404,"docs":"/docs/errors#not_found"}`, nil, false, ""},
		{"no such route, other answer", "GET", "/api/nothing", 200, json, `{}`, nil, false, "no such operation"},
		{"no such method", "PATCH", "/api/sandbox", 200, json, `{}`, nil, false, "no such operation"},
		{"no base path", "GET", "/sandbox/sbx_y/runs/run_x", 200, json, run, nil, false, "no such operation"},
		{"root operation under /api", "GET", "/api/health", 200, json, `{"status":"ok","version":"1","runtimes":{}}`, nil, false, "no such operation"},
		{"root operation under /api, catch-all", "GET", "/api/v1/health", 404, json, `{"error":"not_found","message":"no route","code":404,"docs":"/docs/errors#not_found"}`, nil, false, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, "http://x"+tc.path, nil)
			resp := &http.Response{StatusCode: tc.status, Header: http.Header{}, Request: req, Body: io.NopCloser(strings.NewReader(tc.body))}
			if tc.stream {
				resp.Body = unreadable{t}
			}
			resp.Header.Set("Content-Type", tc.ctype)
			for i := 0; i+1 < len(tc.header); i += 2 {
				resp.Header.Set(tc.header[i], tc.header[i+1])
			}
			err := c.Check(req, resp)
			switch {
			case tc.fails == "" && err != nil:
				t.Fatalf("want valid, got %v", err)
			case tc.fails != "" && err == nil:
				t.Fatalf("want a failure about %q, got none", tc.fails)
			case tc.fails != "" && !strings.Contains(err.Error(), tc.fails):
				t.Fatalf("want a failure about %q, got %v", tc.fails, err)
			}
			if !tc.stream { // the body is still there for the caller
				if b, _ := io.ReadAll(resp.Body); string(b) != tc.body {
					t.Fatalf("body after the check: %q", b)
				}
			}
		})
	}
}
