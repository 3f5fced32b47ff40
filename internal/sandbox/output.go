package sandbox

import (
	"context"
	"errors"
	"sync"
	"unicode/utf8"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/store"
)

// Offsets are how many bytes of each stream of a run a follower has received: the id of the
// last output event it saw.
type Offsets struct{ Stdout, Stderr int64 }

// outputLog holds a run's output as the driver reports it (at most MaxOutputBytes per stream, as
// the run record), in the order it was written, for followers of the run's events.
type outputLog struct {
	mu     sync.Mutex
	bufs   [2][]byte // stdout, stderr
	order  []mark    // where each chunk ended, in the order written
	done   bool
	wakeup chan struct{} // closed and replaced at every change
}

type mark struct {
	stream int
	end    int64
}

func newOutputLog() *outputLog { return &outputLog{wakeup: make(chan struct{})} }

func streamIndex(s driver.Stream) int {
	if s == driver.Stderr {
		return 1
	}
	return 0
}

// add appends a chunk (the driver's OnOutput).
func (l *outputLog) add(s driver.Stream, p []byte) {
	i := streamIndex(s)
	l.mu.Lock()
	l.bufs[i] = append(l.bufs[i], p...)
	l.order = append(l.order, mark{i, int64(len(l.bufs[i]))})
	l.notifyLocked()
	l.mu.Unlock()
}

// finish marks the log complete.
func (l *outputLog) finish() {
	l.mu.Lock()
	l.done = true
	l.notifyLocked()
	l.mu.Unlock()
}

func (l *outputLog) notifyLocked() {
	close(l.wakeup)
	l.wakeup = make(chan struct{})
}

// follow calls emit for the output past at, in the order written, as it comes, until the log is
// complete or ctx ends. A chunk is cut after its last whole UTF-8 character (the rest goes with
// the stream's next chunk), except the stream's last chunk of a finished run.
func (l *outputLog) follow(ctx context.Context, at Offsets, emit func(driver.Stream, []byte, Offsets) error) error {
	pos := [2]int64{at.Stdout, at.Stderr}
	for {
		l.mu.Lock()
		order, done, wake := l.order, l.done, l.wakeup
		bufs := l.bufs
		l.mu.Unlock()
		// Slices only grow by append and are never rewritten: reading outside the lock is safe
		// up to the lengths taken under it.
		for k, m := range order {
			if m.end <= pos[m.stream] {
				continue
			}
			end := m.end
			if !done || !isLastOf(order[k+1:], m.stream) {
				// A character cut by the chunk's end goes with the stream's next chunk.
				if end = wholeRunes(bufs[m.stream], pos[m.stream], end); end <= pos[m.stream] {
					continue
				}
			}
			chunk := bufs[m.stream][pos[m.stream]:end]
			pos[m.stream] = end
			if err := emit([]driver.Stream{driver.Stdout, driver.Stderr}[m.stream], chunk, Offsets{pos[0], pos[1]}); err != nil {
				return err
			}
		}
		if done {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// isLastOf reports whether no mark of stream follows in rest.
func isLastOf(rest []mark, stream int) bool {
	for _, m := range rest {
		if m.stream == stream {
			return false
		}
	}
	return true
}

// wholeRunes moves end back so that b[from:end] does not end inside a UTF-8 character.
func wholeRunes(b []byte, from, end int64) int64 {
	for back := int64(0); back < utf8.UTFMax && end-back > from; back++ {
		c := b[end-back-1]
		if c < utf8.RuneSelf { // ASCII: whole
			return end - back
		}
		if utf8.RuneStart(c) {
			if utf8.FullRune(b[end-back-1 : end]) {
				return end
			}
			return end - back - 1
		}
	}
	return end
}

// FollowRun streams a run's output: emit gets every chunk past at (in the order written while
// the run is live; a finished run's stored stdout, then stderr), then FollowRun returns the final
// run. It works for queued, running and finished runs; ctx ends it early.
func (s *Service) FollowRun(ctx context.Context, acct store.Account, sandboxID, runID string, at Offsets, emit func(driver.Stream, []byte, Offsets) error) (api.Run, error) {
	if _, err := s.GetRun(ctx, acct, sandboxID, runID); err != nil {
		return api.Run{}, err
	}
	s.mu.Lock()
	lv := s.live[sandboxID]
	s.mu.Unlock()
	var j *job
	if lv != nil {
		lv.mu.Lock()
		j = lv.jobs[runID]
		lv.mu.Unlock()
	}
	if j != nil {
		if err := j.out.follow(ctx, at, emit); err != nil {
			return api.Run{}, err
		}
		select {
		case <-j.done:
			return runView(j.run), nil
		case <-ctx.Done():
			return api.Run{}, ctx.Err()
		}
	}
	// Finished (or its sandbox gone): the record holds everything.
	rec, err := s.st.GetRun(ctx, sandboxID, runID)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return api.Run{}, errorf(KindNotFound, "no run %q in sandbox %q", runID, sandboxID)
		}
		return api.Run{}, internal("get run", err)
	}
	stored := newOutputLog()
	stored.add(driver.Stdout, []byte(rec.Stdout))
	stored.add(driver.Stderr, []byte(rec.Stderr))
	stored.finish()
	if err := stored.follow(ctx, at, emit); err != nil {
		return api.Run{}, err
	}
	return runView(rec), nil
}
