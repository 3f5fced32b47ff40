package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

// Event is one server-sent event of a run's event stream.
type Event struct {
	ID   string // the last event ID when the event arrived: "<stdout bytes>.<stderr bytes>" delivered so far
	Type string // "stdout", "stderr", "end"; "message" when the event names none
	Data []byte // the event's data: an api.OutputChunk (stdout/stderr) or the final api.Run (end)
}

// Text returns the output of a stdout or stderr event.
func (e Event) Text() (string, error) {
	var c api.OutputChunk
	if err := json.Unmarshal(e.Data, &c); err != nil {
		return "", fmt.Errorf("%s event: %w", e.Type, err)
	}
	return c.Data, nil
}

// Run returns the final run of an end event.
func (e Event) Run() (*api.Run, error) {
	var r api.Run
	if err := json.Unmarshal(e.Data, &r); err != nil {
		return nil, fmt.Errorf("end event: %w", err)
	}
	return &r, nil
}

// EventStream reads the events of one connection to GET …/runs/{run_id}/events.
type EventStream struct {
	body io.ReadCloser
	r    *sseReader
}

// Events opens a run's event stream. lastEventID, when not empty, is sent as Last-Event-ID: the
// server then sends only what follows it. Close the stream when done.
func (c *Client) Events(ctx context.Context, id, runID, lastEventID string) (*EventStream, error) {
	h := http.Header{"Accept": {"text/event-stream"}}
	if lastEventID != "" {
		h.Set("Last-Event-ID", lastEventID)
	}
	resp, err := c.do(ctx, request{method: "GET", path: sandboxPath(id, "runs", runID, "events"), header: h}, http.StatusOK)
	if err != nil {
		return nil, err
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		resp.Body.Close()
		return nil, fmt.Errorf("events of run %s: answer is %q, not text/event-stream", runID, ct)
	}
	return &EventStream{body: resp.Body, r: newSSEReader(resp.Body, lastEventID)}, nil
}

// Next returns the next event. It returns io.EOF when the server closes the stream cleanly and
// another error when the connection breaks.
func (s *EventStream) Next() (Event, error) {
	return s.r.next()
}

// LastEventID returns the last event ID the stream has seen (the one to resume from).
func (s *EventStream) LastEventID() string { return s.r.lastID }

// Close closes the connection.
func (s *EventStream) Close() error { return s.body.Close() }

// OutputFunc receives a run's output as it is written: stream is "stdout" or "stderr".
// Returning an error stops Follow with that error.
type OutputFunc func(stream, text string) error

// Follow streams a run's output to fn until the run ends and returns the final run. When the
// connection breaks it reconnects with Last-Event-ID, so no output is lost or repeated; it gives
// up after 5 failed attempts in a row, or when ctx is done. fn may be nil; an error it returns
// stops Follow and is returned as is.
func (c *Client) Follow(ctx context.Context, id, runID string, fn OutputFunc) (*api.Run, error) {
	lastID := ""
	failures := 0
	var lastErr error
	for {
		if failures > 0 {
			if failures >= 5 {
				return nil, fmt.Errorf("follow run %s: %w", runID, lastErr)
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("follow run %s: %w", runID, ctx.Err())
			case <-time.After(time.Duration(100<<failures) * time.Millisecond):
			}
		}
		s, err := c.Events(ctx, id, runID, lastID)
		if err != nil {
			var e *Error
			if errors.As(err, &e) && e.Status < 500 && e.Code != CodeRateLimited || ctx.Err() != nil || errors.Is(err, ErrNoKey) {
				return nil, err
			}
			failures, lastErr = failures+1, err
			continue
		}
		run, progressed, err := follow(s, fn)
		lastID = s.LastEventID()
		s.Close()
		var fe fatalError
		switch {
		case run != nil:
			return run, nil
		case errors.As(err, &fe):
			return nil, fe.err
		case ctx.Err() != nil:
			return nil, fmt.Errorf("follow run %s: %w", runID, ctx.Err())
		}
		if progressed {
			failures = 0
		}
		if err == nil || errors.Is(err, io.EOF) {
			err = errors.New("the event stream ended before the run's end event")
		}
		failures, lastErr = failures+1, err
	}
}

// fatalError ends Follow without a retry.
type fatalError struct{ err error }

func (e fatalError) Error() string { return e.err.Error() }

// follow reads one connection's events; progressed reports whether any arrived.
func follow(s *EventStream, fn OutputFunc) (run *api.Run, progressed bool, err error) {
	for {
		ev, err := s.Next()
		if err != nil {
			return nil, progressed, err
		}
		progressed = true
		switch ev.Type {
		case "stdout", "stderr":
			text, err := ev.Text()
			if err != nil {
				return nil, progressed, fatalError{err}
			}
			if fn != nil {
				if err := fn(ev.Type, text); err != nil {
					return nil, progressed, fatalError{err}
				}
			}
		case "end":
			run, err := ev.Run()
			if err != nil {
				return nil, progressed, fatalError{err}
			}
			return run, progressed, nil
		}
	}
}

// sseReader parses text/event-stream (the WHATWG "server-sent events" format): lines end in
// CRLF, LF or CR; "field: value" lines build an event, a blank line dispatches it; comments
// (":…") and unknown fields are ignored; an event with no data is not dispatched, but its id
// still becomes the last event ID.
type sseReader struct {
	sc     *bufio.Scanner
	idBuf  string // the id field seen last
	lastID string // idBuf as of the last blank line: what a reconnection resumes from
}

func newSSEReader(r io.Reader, lastID string) *sseReader {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20) // an end event carries the whole run (≤ 2 MiB of output, escaped)
	sc.Split(scanSSELines)
	return &sseReader{sc: sc, idBuf: lastID, lastID: lastID}
}

func (r *sseReader) next() (Event, error) {
	var ev Event
	var data bytes.Buffer
	hasData := false
	for r.sc.Scan() {
		line := r.sc.Bytes()
		if len(line) == 0 {
			r.lastID = r.idBuf
			if !hasData {
				ev = Event{}
				continue
			}
			if ev.Type == "" {
				ev.Type = "message"
			}
			ev.ID = r.lastID
			ev.Data = bytes.TrimSuffix(data.Bytes(), []byte("\n"))
			return ev, nil
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "event":
			ev.Type = string(value)
		case "data":
			data.Write(value)
			data.WriteByte('\n')
			hasData = true
		case "id":
			if !bytes.Contains(value, []byte{0}) {
				r.idBuf = string(value)
			}
		}
	}
	if err := r.sc.Err(); err != nil {
		return Event{}, err
	}
	return Event{}, io.EOF // an unterminated last event is dropped, as the format says
}

// scanSSELines splits on CRLF, LF or a lone CR.
func scanSSELines(data []byte, atEOF bool) (advance int, token []byte, err error) {
	if atEOF && len(data) == 0 {
		return 0, nil, nil
	}
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		if data[i] == '\n' {
			return i + 1, data[:i], nil
		}
		if i+1 < len(data) {
			if data[i+1] == '\n' {
				return i + 2, data[:i], nil
			}
			return i + 1, data[:i], nil
		}
		if atEOF {
			return i + 1, data[:i], nil
		}
		return 0, nil, nil // a CR at the end of the buffer: is a LF next?
	}
	if atEOF {
		return len(data), data, nil
	}
	return 0, nil, nil
}
