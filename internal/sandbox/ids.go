package sandbox

import (
	"errors"
	"fmt"
	"sync"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// IDRange is where the host uids and gids of sandboxes come from: Sandboxes ranges of
// driver.IDsPerSandbox ids each, the first starting at First. No two live sandboxes (warm ones
// included) share a range; a range is given again only once its sandbox is destroyed.
type IDRange struct {
	First     uint32
	Sandboxes int
}

// DefaultIDRange is 8,192 sandboxes' ranges from 2^30: far above the ids of a host's users and
// of the subordinate ranges tools give them (/etc/subuid starts at 100000), below
// driver.HelperIDs.
func DefaultIDRange() IDRange { return IDRange{First: 1 << 30, Sandboxes: 8192} }

// Check reports whether r is usable: at least one range, none at the host's own ids (below
// driver.IDsPerSandbox), all before driver.HelperIDs.
func (r IDRange) Check() error {
	if r.Sandboxes < 1 {
		return errors.New("the id range holds no sandbox")
	}
	if r.First < driver.IDsPerSandbox {
		return fmt.Errorf("the id range starts at %d, among the host's own ids (below %d)", r.First, driver.IDsPerSandbox)
	}
	if end := uint64(r.First) + uint64(r.Sandboxes)*driver.IDsPerSandbox; end > uint64(driver.HelperIDs) {
		return fmt.Errorf("the id range ends at %d, past %d (the drivers' own)", end, driver.HelperIDs)
	}
	return nil
}

// idAllocator hands out the ranges of an IDRange, the least recently returned first.
type idAllocator struct {
	r    IDRange
	mu   sync.Mutex
	used []bool
	next int
}

func newIDAllocator(r IDRange) *idAllocator {
	return &idAllocator{r: r, used: make([]bool, r.Sandboxes)}
}

// take returns the first id of a free range; capacity_exhausted when every range is in use.
func (a *idAllocator) take() (uint32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range a.used {
		n := (a.next + i) % len(a.used)
		if !a.used[n] {
			a.used[n] = true
			a.next = n + 1
			return a.r.First + uint32(n)*driver.IDsPerSandbox, nil
		}
	}
	return 0, errorf(KindCapacityExhausted, "this host has no free uid range for another sandbox (%d in use)", len(a.used))
}

// give returns the range that starts at first.
func (a *idAllocator) give(first uint32) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if n := int((first - a.r.First) / driver.IDsPerSandbox); first >= a.r.First && n < len(a.used) {
		a.used[n] = false
	}
}
