package metrics

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
)

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

func TestExposition(t *testing.T) {
	m := New(func() map[[2]string]int { return map[[2]string]int{{"container", "ready"}: 3, {"wasm", "running"}: 1} })
	m.Created("container", "ready", 30*time.Millisecond)
	m.Created("container", "concurrency_limit", time.Millisecond)
	m.QuotaRejected("concurrency_limit")
	m.RunFinished("wasm", "timeout", 2*time.Second)
	m.Destroyed("container", "expired")
	m.EgressDenied(5)
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "db"))
	if err != nil {
		t.Fatal(err)
	}
	ts := m.Store(st)
	defer ts.Close()
	if _, err := ts.GetSandbox(context.Background(), "", "sbx_missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get: %v", err)
	}
	wantLines(t, scrape(t, m),
		`sandboxd_sandboxes{mode="container",status="ready"} 3`,
		`sandboxd_sandboxes{mode="wasm",status="running"} 1`,
		`sandboxd_sandboxes{mode="container",status="provisioning"} 0`,
		`sandboxd_create_seconds_count{mode="container",outcome="ready"} 1`,
		`sandboxd_create_seconds_count{mode="container",outcome="concurrency_limit"} 1`,
		`sandboxd_quota_rejections_total{reason="concurrency_limit"} 1`,
		`sandboxd_run_seconds_count{mode="wasm",status="timeout"} 1`,
		`sandboxd_sandboxes_destroyed_total{mode="container",reason="expired"} 1`,
		`sandboxd_egress_denied_total 5`,
		`sandboxd_store_seconds_count{op="get_sandbox",result="error"} 1`,
		`go_goroutines`,
		`process_resident_memory_bytes`,
	)
}

// wantLines fails the test for each of wants that the exposition out does not hold.
func wantLines(t *testing.T, out string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(out, want) {
			t.Errorf("no %s in:\n%s", want, out)
		}
	}
}

func TestWarmPoolMetrics(t *testing.T) {
	m := New(func() map[[2]string]int { return map[[2]string]int{{"container", "warm"}: 2} })
	m.WarmTaken("container", true)
	m.WarmTaken("container", true)
	m.WarmTaken("wasm", false)
	wantLines(t, scrape(t, m),
		`sandboxd_sandboxes{mode="container",status="warm"} 2`,
		`sandboxd_sandboxes{mode="wasm",status="warm"} 0`,
		`sandboxd_warm_pool_total{mode="container",result="hit"} 2`,
		`sandboxd_warm_pool_total{mode="wasm",result="miss"} 1`,
	)
}
