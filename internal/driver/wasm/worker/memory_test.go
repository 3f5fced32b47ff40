package worker

import "testing"

// TestMemoryBudget: the instances of a worker share one budget: a grow past what the others left
// is refused (and flagged), memory comes back to the budget when it is unmapped, and the peak of
// a context's run starts again at its memory's size.
func TestMemoryBudget(t *testing.T) {
	budget := newMemoryBudget(4 * wasmPage)
	a, b := newMemoryAllocator(4*wasmPage, budget), newMemoryAllocator(4*wasmPage, budget)
	ma, mb := a.Allocate(wasmPage, 4*wasmPage), b.Allocate(wasmPage, 4*wasmPage)
	steps := []struct {
		name    string
		do      func() []byte
		granted bool
	}{
		{"a takes 3 pages", func() []byte { return ma.Reallocate(3 * wasmPage) }, true},
		{"b takes 1 page", func() []byte { return mb.Reallocate(wasmPage) }, true},
		{"b cannot take a 2nd", func() []byte { return mb.Reallocate(2 * wasmPage) }, false},
		{"a cannot pass its cap", func() []byte { return ma.Reallocate(5 * wasmPage) }, false},
	}
	for _, st := range steps {
		if got := st.do() != nil; got != st.granted {
			t.Errorf("%s: granted %v", st.name, got)
		}
	}
	if _, refused := b.stats(); !refused {
		t.Error("b's refusal not flagged")
	}
	b.resetPeak()
	if peak, refused := b.stats(); peak != wasmPage || refused {
		t.Errorf("after resetPeak: peak %d, refused %v", peak, refused)
	}
	ma.Free()
	a.release()
	if mb.Reallocate(4*wasmPage) == nil {
		t.Error("b cannot grow into what a gave back")
	}
	mb.Free()
	b.release()
	if budget.used != 0 {
		t.Errorf("budget holds %d bytes after every memory was released", budget.used)
	}
}
