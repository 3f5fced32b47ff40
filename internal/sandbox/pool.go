package sandbox

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// Warm pool tunables.
const (
	warmShapes     = 4                // shapes kept warm at once; the least recently asked for goes first
	warmRetryAfter = 30 * time.Second // after a failed refill, how long a shape waits before the next
	// warmRefillQuiet is how long a taken warm sandbox must go without a run ending before its
	// refill starts, and warmRefillGrace bounds the whole wait (replenishAfter).
	warmRefillQuiet = 250 * time.Millisecond
	warmRefillGrace = 3 * time.Second
	// catalogWatch is how often the catalog is read while warm sandboxes of its images are kept
	// (warmPool.watch).
	catalogWatch = 2 * time.Second
)

// warmPool keeps sandboxes that are provisioned but belong to no one yet ("warm"), so that a create
// takes one instead of provisioning from nothing. Sandboxes are kept per shape — what a create asks
// for apart from its owner: mode, image, limits (disk included), paths, allow_spawn and the shape of its egress
// policy (block_outbound, and whether the allow list is empty). The allow list itself is given to
// the sandbox when it is taken (driver.NetworkSetter); drivers without it only share a shape
// between equal policies.
//
// The pool learns shapes from demand: each create names its shape, the pool keeps Config.WarmPool
// sandboxes of the warmShapes shapes asked for last, and provisions a replacement in the
// background once the sandbox of the create that took one has gone quiet after its first run (see
// replenishAfter). A warm sandbox has the ID it will keep (no record exists
// until a create takes it), its host directories and everything the driver gives a sandbox; it
// has run nothing. A crash leaves warm sandboxes to the start-up reconciliation, which destroys
// what the drivers list and no record claims; Close destroys them.
type warmPool struct {
	s      *Service
	ctx    context.Context // ends at close: provisioning in flight is aborted
	cancel context.CancelFunc

	mu     sync.Mutex
	size   int // warm sandboxes per shape; 0: the pool is off
	shapes map[string]*shape
	closed bool
	wg     sync.WaitGroup // refill goroutines
	busy   int            // provisioning in flight, over all shapes
	idle   chan struct{}  // closed when busy drops to 0; replaced when it rises

	quiet, grace time.Duration // warmRefillQuiet and warmRefillGrace (tests set others)
}

// shape is the pool of one shape.
type shape struct {
	key     string
	sp      spec     // the spec warm sandboxes are made from (the last create's, policy included)
	ready   []string // warm sandbox IDs, oldest first
	filling int      // being provisioned
	used    time.Time
	retry   time.Time // no refill before (after a failure)
}

func newWarmPool(s *Service, size int) *warmPool {
	p := &warmPool{s: s, size: size, shapes: map[string]*shape{}, idle: make(chan struct{}),
		quiet: warmRefillQuiet, grace: warmRefillGrace}
	close(p.idle)
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p
}

// shapeKey is what two creates must share to be served by the same warm sandboxes.
func (p *warmPool) shapeKey(sp spec) string {
	_, canSet := p.s.drivers[sp.mode].(driver.NetworkSetter)
	k := struct {
		Mode, Image, RootFS, SitePackages, Generation string
		CPU                                           float64
		Memory, Disk                                  int64
		AllowSpawn                                    bool
		FS                                            any
		Network                                       any
	}{sp.mode, sp.image.Name, sp.image.RootFS, sp.image.SitePackages, sp.image.Generation, sp.cpu, sp.memoryBytes, sp.diskBytes,
		sp.allowSpawn, sp.config.Filesystem, sp.network}
	if canSet {
		k.Network = [2]bool{sp.network.BlockOutbound, len(sp.network.Rules) == 0}
	}
	b, _ := json.Marshal(k)
	return string(b)
}

// take returns the ID of a warm sandbox of sp's shape, if one is ready. Either way sp's shape
// becomes the most recently asked for; the caller calls replenish once its create is done.
func (p *warmPool) take(sp spec) (string, bool) {
	key := p.shapeKey(sp)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.size <= 0 {
		return "", false
	}
	sh := p.shapes[key]
	if sh == nil {
		sh = &shape{key: key}
		p.shapes[key] = sh
		p.evictLocked()
	}
	sh.sp, sh.used = sp, time.Now()
	var id string
	if n := len(sh.ready); n > 0 {
		id, sh.ready = sh.ready[0], sh.ready[1:]
	}
	if o, ok := p.s.cfg.Observer.(WarmObserver); ok {
		o.WarmTaken(sp.mode, id != "")
	}
	return id, id != ""
}

// replenish starts provisioning what sp's shape lacks. Creates call it when they are done, so
// that provisioning in the background does not compete with them for the CPU.
func (p *warmPool) replenish(sp spec) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sh := p.shapes[p.shapeKey(sp)]; sh != nil && !p.closed {
		p.refillLocked(sh)
	}
}

// replenishAfter is replenish once the sandbox made by the create that called take has ended its
// first run and then been quiet for warmRefillQuiet — no run in flight, none ended meanwhile:
// quietSince returns when its last run ended, or the zero time while one runs — or is gone, or
// was never made (first is closed; quietSince nil) — or after warmRefillGrace: a refill (a whole
// sandbox booting, a few hundred ms of CPU on every core) does not compete for the CPU with the
// runs an agent makes back to back right after its create (on 2 cores it doubled the CPU and
// tripled the latency of the first runs; bench measures both). Until it replenishes it counts as
// provisioning (settled waits for it).
func (p *warmPool) replenishAfter(sp spec, first <-chan struct{}, quietSince func() time.Time) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.beginLocked()
	quiet, graceFor := p.quiet, p.grace
	p.mu.Unlock()
	go func() {
		defer p.end()
		grace := time.NewTimer(graceFor)
		defer grace.Stop()
		select {
		case <-first:
		case <-grace.C:
			p.replenish(sp)
			return
		case <-p.ctx.Done():
		}
		for quietSince != nil && p.ctx.Err() == nil {
			wait := quiet
			if since := quietSince(); !since.IsZero() {
				if wait = quiet - time.Since(since); wait <= 0 {
					break
				}
			}
			t := time.NewTimer(wait)
			select {
			case <-t.C:
				continue
			case <-grace.C:
			case <-p.ctx.Done():
			}
			t.Stop()
			break
		}
		p.replenish(sp)
	}()
}

// beginLocked counts one more piece of background work (settled waits for it); end ends it.
func (p *warmPool) beginLocked() {
	if p.busy == 0 {
		p.idle = make(chan struct{})
	}
	p.busy++
	p.wg.Add(1)
}

func (p *warmPool) end() {
	p.mu.Lock()
	if p.busy--; p.busy == 0 {
		close(p.idle)
	}
	p.mu.Unlock()
	p.wg.Done()
}

// give puts back a sandbox take returned that was not used (its create failed before the sandbox
// was recorded). If the shape's refill has made it full meanwhile, its newest sandbox goes instead.
func (p *warmPool) give(sp spec, id string) {
	p.mu.Lock()
	sh := p.shapes[p.shapeKey(sp)]
	if sh == nil || p.closed {
		p.mu.Unlock()
		p.discard(sp.mode, id) // not in the background: close may be waiting already
		return
	}
	defer p.mu.Unlock()
	sh.ready = append([]string{id}, sh.ready...)
	if len(sh.ready) > p.size {
		p.discardAll(sp.mode, slices.Clone(sh.ready[p.size:]))
		sh.ready = sh.ready[:p.size]
	}
}

// evictLocked drops the least recently used shapes beyond warmShapes; their warm sandboxes are
// destroyed in the background (provisioning in flight destroys its sandbox when it ends).
func (p *warmPool) evictLocked() {
	for len(p.shapes) > warmShapes {
		var old *shape
		for _, sh := range p.shapes {
			if old == nil || sh.used.Before(old.used) {
				old = sh
			}
		}
		delete(p.shapes, old.key)
		p.discardAll(old.sp.mode, old.ready)
	}
}

// prune destroys the warm sandboxes of catalog images (the operator's image store) whose
// generation listed does not hold: the image was removed (`sandboxd images rm`), or its name now
// names another root or another unpacking of it. Nobody owns a warm sandbox, so removing an image
// never waits for them, and none made from a removed root is ever taken: a create resolves its
// image from the catalog (which calls prune) before it takes one, and the shape of a new
// generation is another shape. Provisioning in flight for a pruned shape destroys its sandbox
// when it ends (provision).
func (p *warmPool) prune(listed map[string]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, sh := range p.shapes {
		if im := sh.sp.image; im.Generation != "" && !listed[generationKey(im)] {
			delete(p.shapes, key)
			p.s.log.Info("destroying the warm sandboxes of an image no longer approved", "image", im.Name, "warm", len(sh.ready))
			p.discardAll(sh.sp.mode, sh.ready)
			sh.ready = nil
		}
	}
}

// catalogShapes says whether a shape of a catalog image is kept (watch reads the catalog then).
func (p *warmPool) catalogShapes() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, sh := range p.shapes {
		if sh.sp.image.Generation != "" {
			return true
		}
	}
	return false
}

// watch reads the catalog (read, which prunes) every period while warm sandboxes of catalog
// images are kept, so that those of an image removed while no create came are destroyed
// soon after, not at the next create. It ends when the pool closes.
func (p *warmPool) watch(period time.Duration, read func()) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-p.ctx.Done():
				return
			case <-t.C:
				if p.catalogShapes() {
					read()
				}
			}
		}
	}()
}

// refillLocked starts provisioning for what sh lacks.
func (p *warmPool) refillLocked(sh *shape) {
	if time.Now().Before(sh.retry) {
		return
	}
	for ; len(sh.ready)+sh.filling < p.size; sh.filling++ {
		p.beginLocked()
		go p.provision(sh, sh.sp)
	}
}

// provision makes one warm sandbox of shape sh from sp.
func (p *warmPool) provision(sh *shape, sp spec) {
	defer p.end()
	id := newID("sbx_")
	err := p.create(id, sp)
	p.mu.Lock()
	sh.filling--
	keep := err == nil && !p.closed && p.shapes[sh.key] == sh && len(sh.ready) < p.size
	if keep {
		sh.ready = append(sh.ready, id)
	}
	if err != nil && p.ctx.Err() == nil {
		sh.retry = time.Now().Add(warmRetryAfter)
		p.s.log.Error("provision a warm sandbox", "mode", sp.mode, "err", err)
	}
	p.mu.Unlock()
	if err == nil && !keep {
		p.discard(sp.mode, id)
	}
}

// create provisions sandbox id from sp; on error nothing of it is left.
func (p *warmPool) create(id string, sp spec) error {
	drv := p.s.drivers[sp.mode]
	err := p.s.createOn(p.ctx, drv, id, sp)
	if w, ok := drv.(driver.Warmer); ok && err == nil {
		err = w.Warm(p.ctx, id)
	}
	if err != nil {
		p.s.releaseHost(id, drv.Destroy(context.Background(), id) == nil)
	}
	return err
}

// discard destroys a warm sandbox and its host side.
func (p *warmPool) discard(mode, id string) {
	destroyed := false
	if drv, ok := p.s.drivers[mode]; ok {
		err := drv.Destroy(context.Background(), id)
		if err != nil {
			p.s.log.Error("destroy a warm sandbox", "sandbox", id, "err", err)
		}
		destroyed = err == nil
	}
	p.s.releaseHost(id, destroyed)
}

// discardAll destroys warm sandboxes in the background, within the pool's wait group.
func (p *warmPool) discardAll(mode string, ids []string) {
	if len(ids) == 0 {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for _, id := range ids {
			p.discard(mode, id)
		}
	}()
}

// resize sets how many warm sandboxes each shape keeps; the ones over it are destroyed.
func (p *warmPool) resize(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.size = max(n, 0)
	if p.closed {
		return
	}
	for _, sh := range p.shapes {
		if len(sh.ready) > p.size {
			p.discardAll(sh.sp.mode, slices.Clone(sh.ready[p.size:]))
			sh.ready = sh.ready[:p.size]
		}
		p.refillLocked(sh)
	}
}

// counts returns the warm sandboxes by (mode, "warm").
func (p *warmPool) counts() map[[2]string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[[2]string]int{}
	for _, sh := range p.shapes {
		out[[2]string{sh.sp.mode, "warm"}] += len(sh.ready)
	}
	return out
}

// settled returns a channel closed once no warm sandbox is being provisioned.
func (p *warmPool) settled() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.idle
}

// close aborts provisioning, destroys every warm sandbox and waits until that is done.
func (p *warmPool) close() {
	p.mu.Lock()
	p.closed = true
	for _, sh := range p.shapes {
		p.discardAll(sh.sp.mode, sh.ready)
		sh.ready = nil
	}
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
}

// adopt gives a warm sandbox its owner's egress policy. Its shape guarantees the policy it was made
// with differs at most in the allow list, which a driver.NetworkSetter replaces; for other drivers
// the shape includes the whole policy.
func adopt(ctx context.Context, drv driver.Driver, id string, sp spec) error {
	if ns, ok := drv.(driver.NetworkSetter); ok {
		return ns.SetNetwork(ctx, id, sp.network)
	}
	return nil
}
