package wasm

import (
	"context"
	"sync"
	"time"
)

// pool keeps up to size idle workers of one image started and compiled, so that Create only has
// to claim one. A goroutine (the filler) refills it one worker at a time; when the pool is empty,
// get starts a worker itself rather than wait for the filler.
type pool struct {
	d     *Driver
	image string
	size  int

	idle chan *proc
	kick chan struct{}
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	lastErr error // the filler's last start failure, nil after a success
}

// Backoff of the filler after a failed start; its delay after a claim (so that a worker's start
// does not compete for the CPU with the Create that claimed its predecessor).
const (
	fillBackoffMin = time.Second
	fillBackoffMax = 30 * time.Second
	fillDelay      = 50 * time.Millisecond
)

func newPool(d *Driver, image string, size int) *pool {
	p := &pool{
		d: d, image: image, size: size,
		idle: make(chan *proc, size), kick: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	go p.fill()
	return p
}

// fill keeps the pool full until close.
func (p *pool) fill() {
	defer close(p.done)
	backoff := fillBackoffMin
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-p.stop
		cancel()
	}()
	for {
		for len(p.idle) < p.size {
			w, err := p.d.startProc(ctx, p.image, true)
			p.mu.Lock()
			p.lastErr = err
			p.mu.Unlock()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				p.d.log.Warn("starting a pool worker failed", "image", p.image, "err", err, "retry_in", backoff)
				select {
				case <-p.stop:
					return
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, fillBackoffMax)
				continue
			}
			backoff = fillBackoffMin
			select {
			case p.idle <- w:
			case <-p.stop:
				p.d.discard(w)
				return
			}
		}
		select {
		case <-p.stop:
			return
		case <-p.kick:
		}
		select {
		case <-p.stop:
			return
		case <-time.After(fillDelay):
		}
	}
}

// get returns a ready, unconfigured worker: an idle one when there is one (the filler then
// starts its replacement), else a new one.
func (p *pool) get(ctx context.Context) (*proc, error) {
	defer p.refill()
	for {
		select {
		case w := <-p.idle:
			if w.alive() {
				return w, nil
			}
			p.d.discard(w) // died while idle (killed from outside): reap it, take the next
			continue
		default:
		}
		return p.d.startProc(ctx, p.image, false)
	}
}

// wait blocks until the pool has an idle worker, the filler fails to start one (its error), or
// ctx ends (used to prepare a pool).
func (p *pool) wait(ctx context.Context) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for len(p.idle) == 0 {
		if err := p.err(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

func (p *pool) refill() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *pool) err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// close stops the filler and kills the idle workers.
func (p *pool) close() {
	close(p.stop)
	<-p.done
	for {
		select {
		case w := <-p.idle:
			p.d.discard(w)
		default:
			return
		}
	}
}
