package main

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// stopSignals stop serve cleanly. SIGHUP too: a closed terminal would otherwise end the server
// with its sandboxes left running.
var stopSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP}

// stopWatch receives the stop signals for the whole life of serve: ctx ends at the first, again
// is closed at the second (the ones after are ignored: the stop is bounded already).
type stopWatch struct {
	ctx   context.Context
	again chan struct{}
	c     chan os.Signal
	done  chan struct{}

	mu    sync.Mutex
	first os.Signal
}

func watchStop() *stopWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &stopWatch{ctx: ctx, again: make(chan struct{}), c: make(chan os.Signal, 4), done: make(chan struct{})}
	signal.Notify(w.c, stopSignals...)
	go func() {
		defer close(w.done)
		defer cancel()
		s, ok := <-w.c
		if !ok {
			return
		}
		w.mu.Lock()
		w.first = s
		w.mu.Unlock()
		cancel()
		if _, ok := <-w.c; ok {
			close(w.again)
		}
		for range w.c {
		}
	}()
	return w
}

// signal returns the first stop signal (nil if none came).
func (w *stopWatch) signal() os.Signal {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.first
}

// stop stops watching (the signals go back to their default action) and waits for the watcher.
func (w *stopWatch) stop() {
	signal.Stop(w.c)
	close(w.c)
	<-w.done
}

// shutdown stops serving and destroys every live sandbox: one by one for up to grace (the
// records say destroyed, reason server_restart), then — or at once on a second signal — the
// rest are killed and still recorded. The log says what it does and how long it took. Either way
// serve then exits 0: no sandbox is left live in the records.
func (d *daemon) shutdown(w *stopWatch, grace time.Duration) {
	log := d.log
	start := time.Now()
	n := 0
	if d.svc != nil {
		n = d.svc.LiveCount()
	}
	why := "the server failed"
	if s := w.signal(); s != nil {
		why = s.String()
	}
	log.Info("sandboxd stopping: destroying live sandboxes", "signal", why, "sandboxes", n, "grace", grace,
		"hint", "a second signal kills them now")
	gctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	watched := make(chan struct{})
	defer close(watched)
	go func() {
		select {
		case <-w.again:
			log.Warn("second signal: killing sandboxes now")
			cancel()
		case <-gctx.Done():
		case <-watched:
		}
	}()
	// Serving stops at once (the listener closes); requests in flight — a synchronous run, a
	// stream of its output — end when their sandbox is destroyed, so the HTTP server is waited for
	// beside the service, not before it.
	srvDone := make(chan struct{})
	go func() {
		defer close(srvDone)
		if d.srv != nil {
			_ = d.srv.Shutdown(gctx)
		}
	}()
	clean := true
	if d.svc != nil {
		if err := d.svc.Close(gctx); err != nil {
			clean = false
			log.Error("sandboxd stopping: sandboxes killed", "err", err)
		}
	}
	select {
	case <-srvDone:
	case <-time.After(time.Second):
	}
	if d.srv != nil {
		_ = d.srv.Close() // connections still open after the sandboxes are gone
	}
	d.svc = nil // closed above
	d.srv = nil
	d.close(context.Background())
	log.Info("sandboxd stopped", "sandboxes", n, "took", time.Since(start).Round(time.Millisecond), "killed", !clean)
}

// serveErr is what serve returns once Serve has returned err (nil after a stop).
func serveErr(err error) error {
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
