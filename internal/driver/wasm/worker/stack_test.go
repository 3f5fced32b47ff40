package worker

import (
	"errors"
	"testing"

	"github.com/tetratelabs/wazero/api"
)

// spGlobal is a stack pointer global with a fixed value.
type spGlobal uint32

func (g spGlobal) String() string      { return "sp" }
func (g spGlobal) Type() api.ValueType { return api.ValueTypeI32 }
func (g spGlobal) Get() uint64         { return uint64(g) }

// TestStackOverflowRecognised: which traps count as a stack overflow (an 8 MiB stack first).
func TestStackOverflowRecognised(t *testing.T) {
	const top = 8 << 20
	const oob = "wasm error: out of bounds memory access\nwasm stack trace:\n\t.list_repr(i32) i32"
	for _, tc := range []struct {
		name string
		err  string
		sp   api.Global
		want bool
	}{
		{"out of bounds, the stack pointer wrapped below 0", oob, spGlobal(0xffff_ff80), true},
		{"out of bounds, the stack pointer near 0 (a leaf's frame)", oob, spGlobal(200), true},
		{"out of bounds, the stack pointer in the stack's body", oob, spGlobal(top - 4096), false},
		{"out of bounds, the stack pointer just above the margin", oob, spGlobal(stackMargin), false},
		{"out of bounds, no exported stack pointer", oob, nil, false},
		{"wazero's call stack", "stack overflow", spGlobal(5 << 20), true},
		{"wazero's call stack, prefixed", "wasm error: stack overflow\nwasm stack trace:\n\t.f()", nil, true},
		{"invalid table access near 0", "wasm error: invalid table access", spGlobal(100), false},
		{"unreachable", "wasm error: unreachable", spGlobal(0xffff_ff80), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := stackOverflow(errors.New(tc.err), tc.sp, top); got != tc.want {
				t.Errorf("stackOverflow = %v, want %v", got, tc.want)
			}
		})
	}
}
