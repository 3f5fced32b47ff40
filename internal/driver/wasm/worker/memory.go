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
type memoryAllocator struct {
	limit uint64 // bytes, a multiple of wasmPage

	mu      sync.Mutex
	peak    uint64        // largest size ever granted (the linear memory's high-water mark)
	refused bool          // a grow past limit was refused
	freed   []*mmapMemory // memories wazero freed, unmapped by release
}

func newMemoryAllocator(limit int64) *memoryAllocator {
	l := uint64(limit) / wasmPage * wasmPage
	if l < wasmPage {
		l = wasmPage
	}
	return &memoryAllocator{limit: l}
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
		if err := unix.Mprotect(m.buf[m.committed:size], unix.PROT_READ|unix.PROT_WRITE); err != nil {
			return nil
		}
		m.committed = size
	}
	m.a.mu.Lock()
	m.a.peak = max(m.a.peak, size)
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
		m.buf, m.committed = nil, 0
	}
}
