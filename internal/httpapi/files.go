package httpapi

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
)

// putFile: PUT /api/sandbox/{id}/files?path=… with the raw content as body.
func (s *server) putFile(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	if max := s.svc.MaxUploadBytes(); r.ContentLength > max {
		err := apiError(http.StatusRequestEntityTooLarge, "payload_too_large",
			fmt.Sprintf("the file (%d bytes) is larger than the upload limit of %d bytes", r.ContentLength, max))
		if strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
			return err // the client waits for our word before it sends the body: nothing to drain
		}
		s.refuseUpload(w, r, err)
		return nil
	}
	out, err := s.svc.WriteFile(r.Context(), acct, r.PathValue("id"), r.URL.Query().Get("path"), r.Body)
	if sandbox.KindOf(err) == sandbox.KindPayloadTooLarge {
		s.refuseUpload(w, r, err)
		return nil
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}

// What refuseUpload reads and drops at most after its answer.
const (
	lingerBytes = 64 << 20
	lingerTime  = 10 * time.Second
)

// refuseUpload answers err to an upload whose body is still coming, then reads and drops the
// rest of the body (at most lingerBytes, for at most lingerTime) before the connection closes.
// A client writes its whole body before it reads the answer (Go's and Python's do): a server that
// closed the connection with unread bytes would reset it, and the client would see "connection
// reset by peer" instead of the 413 — as it did under load when net/http's 500 ms of grace ran
// out. nginx's lingering close does the same.
func (s *server) refuseUpload(w http.ResponseWriter, r *http.Request, err error) {
	rc := http.NewResponseController(w)
	_ = rc.EnableFullDuplex() // read the body after the answer is written
	w.Header().Set("Connection", "close")
	s.writeError(w, r, err)
	_ = rc.Flush()
	_ = rc.SetReadDeadline(time.Now().Add(lingerTime))
	_, _ = io.CopyN(io.Discard, r.Body, lingerBytes)
}

// getFile: GET /api/sandbox/{id}/files?path=… — a file's bytes (ETag: its SHA-256; Range
// supported), or a directory's listing as JSON.
func (s *server) getFile(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	f, err := s.svc.OpenFile(r.Context(), acct, r.PathValue("id"), r.URL.Query().Get("path"))
	if err != nil {
		return err
	}
	defer f.Close()
	if f.Info.Type == "dir" {
		list, err := f.List()
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, list)
		return nil
	}
	sum, err := f.SHA256()
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("ETag", `"`+sum+`"`)
	w.Header().Set("X-Content-SHA256", sum)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", f.Info.ModTime, f)
	f.Audited(r.Context(), cw.n)
	return nil
}

// deleteFile: DELETE /api/sandbox/{id}/files?path=…
func (s *server) deleteFile(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	if err := s.svc.DeleteFile(r.Context(), acct, r.PathValue("id"), r.URL.Query().Get("path")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// runEvents: GET /api/sandbox/{id}/runs/{run_id}/events — the run's output as Server-Sent
// Events ("stdout"/"stderr" with api.OutputChunk data and ids "<stdout bytes>.<stderr bytes>"),
// then one "output" event per rich output of the run (api.RunOutput: its file's path, type, kind
// and size), then one "end" event with the run. Last-Event-ID resumes after what the client has.
func (s *server) runEvents(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	at, err := parseOffsets(r.Header.Get("Last-Event-ID"))
	if err != nil {
		return err
	}
	// Fail before the stream starts if the run does not exist.
	if _, err := s.svc.GetRun(r.Context(), acct, r.PathValue("id"), r.PathValue("run_id")); err != nil {
		return err
	}
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	var mu sync.Mutex // events and keep-alives share the stream
	ended := false    // the handler has returned: w is no longer ours
	write := func(s string) error {
		mu.Lock()
		defer mu.Unlock()
		if ended {
			return io.ErrClosedPipe
		}
		if _, err := io.WriteString(w, s); err != nil {
			return err
		}
		return rc.Flush()
	}
	event := func(name, id string, v any) error {
		data, _ := json.Marshal(v)
		if id != "" {
			id = "id: " + id + "\n"
		}
		return write(fmt.Sprintf("%sevent: %s\ndata: %s\n\n", id, name, data))
	}
	// A comment line during silences keeps proxies from closing the stream.
	stop := make(chan struct{})
	defer func() {
		close(stop)
		mu.Lock()
		ended = true
		mu.Unlock()
	}()
	go func() {
		t := time.NewTicker(s.opts.KeepAlive)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if write(": keep-alive\n\n") != nil {
					return
				}
			}
		}
	}()
	run, err := s.svc.FollowRun(r.Context(), acct, r.PathValue("id"), r.PathValue("run_id"), at,
		func(st driver.Stream, p []byte, at sandbox.Offsets) error {
			return event(string(st), formatOffsets(at), api.OutputChunk{Data: string(p)})
		})
	if err != nil {
		return nil // the stream has started: the client sees it end without an "end" event
	}
	for _, o := range run.Outputs {
		if event("output", "", o) != nil {
			return nil
		}
	}
	_ = event("end", "", run)
	return nil
}

func formatOffsets(o sandbox.Offsets) string {
	return strconv.FormatInt(o.Stdout, 10) + "." + strconv.FormatInt(o.Stderr, 10)
}

func parseOffsets(id string) (sandbox.Offsets, error) {
	if id == "" {
		return sandbox.Offsets{}, nil
	}
	a, b, ok := strings.Cut(id, ".")
	o, err1 := strconv.ParseInt(a, 10, 64)
	e, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err1 != nil || err2 != nil || o < 0 || e < 0 {
		return sandbox.Offsets{}, apiError(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("Last-Event-ID %q is not an event id of this stream (<stdout bytes>.<stderr bytes>)", id))
	}
	return sandbox.Offsets{Stdout: o, Stderr: e}, nil
}
