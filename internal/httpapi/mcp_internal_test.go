package httpapi

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestInProcess: the transport of /mcp's tools hands a request to a handler in this process and
// streams its answer back; a handler that panics or a reader that stops early ends the exchange
// without hanging or crashing anything.
func TestInProcess(t *testing.T) {
	stopped := make(chan error, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/echo":
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Remote", r.RemoteAddr)
			w.Header().Set("X-Query", r.URL.Query().Get("path"))
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(append([]byte(r.Method+" "+r.Header.Get("X-AgentCop-Key")+" "), body...))
		case "/silent":
		case "/panic":
			_, _ = w.Write([]byte("partial"))
			panic("boom")
		case "/endless":
			chunk := make([]byte, 64<<10)
			for {
				if _, err := w.Write(chunk); err != nil {
					stopped <- err
					return
				}
			}
		}
	})
	c := &http.Client{Transport: &inProcess{handler: h, remoteAddr: "192.0.2.1:1234"}}
	do := func(method, url, body string) (*http.Response, string, error) {
		t.Helper()
		req, _ := http.NewRequest(method, url, strings.NewReader(body))
		req.Header.Set("X-AgentCop-Key", "k")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b), err
	}
	for _, tc := range []struct {
		method, path, body string
		status             int
		want               string
		wantErr            bool
	}{
		{"PUT", "/echo?path=/a%20b", "data", 201, "PUT k data", false},
		{"GET", "/silent", "", 200, "", false},
		{"GET", "/panic", "", 200, "partial", true},
	} {
		resp, body, err := do(tc.method, "http://sandboxd"+tc.path, tc.body)
		if resp.StatusCode != tc.status || body != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("%s %s: %d %q %v", tc.method, tc.path, resp.StatusCode, body, err)
		}
		if tc.path == "/echo?path=/a%20b" && (resp.Header.Get("X-Remote") != "192.0.2.1:1234" || resp.Header.Get("X-Query") != "/a b") {
			t.Errorf("echo's headers: %v", resp.Header)
		}
	}
	resp, err := c.Get("http://sandboxd/endless")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if err := <-stopped; !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("the endless handler's write after the reader closed: %v", err)
	}
}
