// Package waitfor waits, in tests, for a condition that another goroutine or process makes true:
// the event a test would otherwise guess the time of with a sleep.
package waitfor

import (
	"testing"
	"time"
)

// Interval is how often True checks its condition.
const Interval = 5 * time.Millisecond

// True returns once cond() holds, checking it every Interval; it fails the test (FailNow) if cond
// still does not hold after timeout. The timeout is a bound for a broken program, not a figure
// the test measures: pick one far above the event's usual time.
func True(t testing.TB, timeout time.Duration, cond func() bool) {
	t.Helper()
	if !Until(timeout, cond) {
		t.Fatalf("waitfor: the condition did not hold within %v", timeout)
	}
}

// Until is True for a caller that says itself what did not happen: it reports whether cond()
// held within timeout, checking it every Interval.
func Until(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(Interval)
	}
	return true
}
