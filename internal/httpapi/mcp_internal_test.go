package httpapi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/mcpserver"
)

// TestInProcess: the transport of /mcp's tools hands a request to a handler in this process and
// streams its answer back; a handler that panics, a reader that stops early and a caller that
// gives up end the exchange without hanging or crashing anything.
func TestInProcess(t *testing.T) {
	stopped := make(chan error, 1) // what the last write of /endless or /hang returned
	entered, release := make(chan struct{}), make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/echo":
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Remote", r.RemoteAddr)
			w.Header().Set("X-Query", r.URL.Query().Get("path"))
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(append([]byte(r.Method+" "+r.Header.Get("X-AgentCop-Key")+" "), body...))
		case "/silent":
		case "/panic-late":
			_, _ = w.Write([]byte("partial"))
			panic("boom")
		case "/panic":
			panic("boom")
		case "/endless":
			chunk := make([]byte, 64<<10)
			for {
				if _, err := w.Write(chunk); err != nil {
					stopped <- err
					return
				}
			}
		case "/hang": // ignores its context, answers once released
			close(entered)
			<-release
			_, err := w.Write([]byte("late"))
			stopped <- err
		}
	})
	c := &http.Client{Transport: &inProcess{handler: h, remoteAddr: "192.0.2.1:1234", log: slog.New(slog.DiscardHandler)}}
	for _, tc := range []struct {
		method, path, body string
		status             int // 0: no answer
		want               string
		readErr            bool
	}{
		{"PUT", "/echo?path=/a%20b", "data", 201, "PUT k data", false},
		{"GET", "/silent", "", 200, "", false},
		{"GET", "/panic", "", 0, "", false},
		{"GET", "/panic-late", "", 200, "partial", true},
	} {
		req, _ := http.NewRequest(tc.method, "http://sandboxd"+tc.path, strings.NewReader(tc.body))
		req.Header.Set("X-AgentCop-Key", "k")
		resp, err := c.Do(req)
		if tc.status == 0 {
			if !errors.Is(err, mcpserver.ErrInternal) || strings.Contains(err.Error(), "boom") {
				t.Errorf("%s: %v", tc.path, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.path, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if tc.readErr && (!errors.Is(err, mcpserver.ErrInternal) || strings.Contains(err.Error(), "boom")) {
			t.Errorf("%s: the read's error %v: want the fixed internal error", tc.path, err)
		}
		if resp.StatusCode != tc.status || string(b) != tc.want || (err != nil) != tc.readErr {
			t.Errorf("%s %s: %d %q %v", tc.method, tc.path, resp.StatusCode, b, err)
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

	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-entered
		cancel()
	}()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://sandboxd/hang", nil)
	if _, err := c.Do(req); !errors.Is(err, context.Canceled) {
		t.Errorf("a request given up before its answer: %v", err)
	}
	close(release)
	if err := <-stopped; !errors.Is(err, context.Canceled) {
		t.Errorf("the write of a handler whose caller gave up: %v", err)
	}
}
