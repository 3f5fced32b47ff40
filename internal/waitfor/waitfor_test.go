package waitfor

import (
	"sync/atomic"
	"testing"
	"time"
)

// fakeT records a failure instead of ending the test.
type fakeT struct {
	testing.TB
	failed bool
}

func (f *fakeT) Helper()               {}
func (f *fakeT) Fatalf(string, ...any) { f.failed = true }
func (f *fakeT) Logf(string, ...any)   {}
func (f *fakeT) Errorf(string, ...any) { f.failed = true }
func (f *fakeT) Cleanup(func())        {}
func (f *fakeT) Failed() bool          { return f.failed }

func TestTrue(t *testing.T) {
	for _, tc := range []struct {
		name     string
		holdsAt  int32 // the call of cond from which it holds (0: never)
		wantFail bool
	}{
		{"at once", 1, false},
		{"after a few checks", 4, false},
		{"never", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			ft := &fakeT{TB: t}
			True(ft, 50*time.Millisecond, func() bool {
				n := calls.Add(1)
				return tc.holdsAt != 0 && n >= tc.holdsAt
			})
			if ft.failed != tc.wantFail {
				t.Errorf("failed %v, want %v (after %d checks)", ft.failed, tc.wantFail, calls.Load())
			}
			if !tc.wantFail && calls.Load() != tc.holdsAt {
				t.Errorf("%d checks, want %d", calls.Load(), tc.holdsAt)
			}
		})
	}
}

func TestUntil(t *testing.T) {
	for _, tc := range []struct {
		name    string
		holdsAt int32 // the call of cond from which it holds (0: never)
	}{
		{"at once", 1},
		{"after a few checks", 4},
		{"never", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			got := Until(50*time.Millisecond, func() bool {
				n := calls.Add(1)
				return tc.holdsAt != 0 && n >= tc.holdsAt
			})
			if want := tc.holdsAt != 0; got != want || want && calls.Load() != tc.holdsAt {
				t.Errorf("Until: %v after %d checks, want %v after %d", got, calls.Load(), want, tc.holdsAt)
			}
		})
	}
}
