package worker

import (
	"sync"

	"github.com/tetratelabs/wazero/experimental"
	"golang.org/x/sys/unix"
)

// wasmPage is the size of a WebAssembly memory page.
const wasmPage = 64 << 10

// memoryAllocator backs every linear memory of one run with an mmap'ed reservation (trap 4 of the
// package doc): the sandbox's whole cap is reserved at once (PROT_NONE, no swap reservation) and
// grown in place with mprotect, so growing never copies and the host's resident memory is what
// the guest has touched, not a multiple of it. It also enforces the sandbox's memory cap: a grow
// past limit returns nil, which the guest sees as memory.grow failing (-1), exactly as if the
// module's maximum were the cap — Python's allocator then raises MemoryError.
//
// Every instance of a worker has its own allocator, and all of them draw on one memoryBudget, the
// sandbox's cap: what the standby, a fresh run and the code contexts' instances have committed
// together never exceeds it (a grow past it fails the same way).
type memoryAllocator struct {
	limit  uint64 // bytes, a multiple of wasmPage
	budget *memoryBudget

	mu      sync.Mutex
	peak    uint64        // largest size ever granted (the linear memory's high-water mark)
	size    uint64        // the size last granted
	refused bool          // a grow past limit was refused
	freed   []*mmapMemory // memories wazero freed, unmapped by release
}

func newMemoryAllocator(limit int64, budget *memoryBudget) *memoryAllocator {
	l := uint64(limit) / wasmPage * wasmPage
	if l < wasmPage {
		l = wasmPage
	}
	return &memoryAllocator{limit: l, budget: budget}
}

// memoryBudget is the linear memory all instances of a worker may hold together: the sandbox's
// cap. Memory is taken when an instance's memory grows and given back when it is unmapped.
type memoryBudget struct {
	mu          sync.Mutex
	limit, used uint64
}

func newMemoryBudget(limit int64) *memoryBudget { return &memoryBudget{limit: uint64(max(limit, 0))} }

// take reserves n bytes, or reports that they would exceed the budget.
func (b *memoryBudget) take(n uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n > b.limit {
		return false
	}
	b.used += n
	return true
}

// give returns n bytes.
func (b *memoryBudget) give(n uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= min(n, b.used)
}

// Allocate implements experimental.MemoryAllocator.
func (a *memoryAllocator) Allocate(_, max uint64) experimental.LinearMemory {
	reserve := min(max, a.limit)
	m := &mmapMemory{a: a}
	if reserve > 0 {
		b, err := unix.Mmap(-1, 0, int(reserve), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err == nil {
			m.buf = b
		}
	}
	return m
}

// resetPeak starts the high-water mark and the refusal flag again (a code context's next run):
// the peak becomes the size its linear memory has now.
func (a *memoryAllocator) resetPeak() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.peak, a.refused = a.size, false
}

// stats returns the high-water mark and whether a grow was refused.
func (a *memoryAllocator) stats() (peak uint64, refused bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.peak, a.refused
}

type mmapMemory struct {
	a         *memoryAllocator
	buf       []byte // the reservation
	committed uint64 // bytes made read-write
}

// Reallocate implements experimental.LinearMemory: it grows in place, or returns nil past the
// cap (or when the reservation or mprotect failed).
func (m *mmapMemory) Reallocate(size uint64) []byte {
	if size > uint64(len(m.buf)) {
		m.a.mu.Lock()
		m.a.refused = true
		m.a.mu.Unlock()
		return nil
	}
	if size > m.committed {
		if !m.a.budget.take(size - m.committed) {
			// The sandbox's other instances (its code contexts) hold the rest of its cap.
			m.a.mu.Lock()
			m.a.refused = true
			m.a.mu.Unlock()
			return nil
		}
		if err := unix.Mprotect(m.buf[m.committed:size], unix.PROT_READ|unix.PROT_WRITE); err != nil {
			m.a.budget.give(size - m.committed)
			return nil
		}
		m.committed = size
	}
	m.a.mu.Lock()
	m.a.peak, m.a.size = max(m.a.peak, size), size
	m.a.mu.Unlock()
	return m.buf[:size:size]
}

// Free implements experimental.LinearMemory. The unmapping is left to release: wazero frees an
// instance's memory when the instance ends, and unmapping what a run touched costs about half a
// millisecond that the worker spends after it has reported the run.
func (m *mmapMemory) Free() {
	m.a.mu.Lock()
	defer m.a.mu.Unlock()
	if m.buf != nil {
		m.a.freed = append(m.a.freed, m)
	}
}

// release unmaps the memories freed so far. The worker calls it once an instance has ended and
// its run is reported, before it starts another instance.
func (a *memoryAllocator) release() {
	a.mu.Lock()
	freed := a.freed
	a.freed = nil
	a.mu.Unlock()
	for _, m := range freed {
		_ = unix.Munmap(m.buf)
		a.budget.give(m.committed)
		m.buf, m.committed = nil, 0
	}
}
