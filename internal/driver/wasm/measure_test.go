package wasm

// A worker's memory beyond the guest's (TestWorkerOverhead, figures logged with -v):
//
//	SANDBOXD_PYTHON_WASM=… go test -run TestWorkerOverhead -v ./internal/driver/wasm/
// The latency figures (create, a print(1) run, against a fresh instance) are sandboxd bench's.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
)

// smapsRollup returns a process's RSS and PSS in bytes.
func smapsRollup(t testing.TB, pid int) (rss, pss int64) {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "Rss:":
			rss = v << 10
		case "Pss:":
			pss = v << 10
		}
	}
	return rss, pss
}

// TestWorkerOverhead: what a worker's memory cgroup is charged beyond the guest's linear memory
// while it serves a run (the basis of WorkerOverhead).
func TestWorkerOverhead(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	spec := baseSpec(t, pyImage) // /tmp is on a disk: nothing of it in the figure
	id := harness.Sandbox(t, d, spec)
	dir := d.cg.MemoryDir(sandboxGroup(t, d, id))
	peakFile, resettable := "memory.max_usage_in_bytes", true
	if d.cg.MemoryV2() {
		peakFile, resettable = "memory.peak", false
	}
	readBytes := func(name string) int64 {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		return v
	}
	var worst int64
	for i, code := range []string{
		"print(1)",
		"import json, sqlite3, zlib, decimal, datetime, re, collections\ndb = sqlite3.connect(':memory:')\ndb.execute('create table t(a)')\nresult = json.dumps([1])",
		"x = [str(i) for i in range(200000)]\nresult = len(x)",
	} {
		if resettable {
			os.WriteFile(filepath.Join(dir, peakFile), []byte("0"), 0)
		}
		res := drivertest.Exec(t, d, id, code, 30*time.Second)
		if res.Status != driver.StatusCompleted {
			t.Fatalf("%s: %s", code, res.Stderr)
		}
		peak := readBytes(peakFile)
		over := peak - res.MemoryPeak
		worst = max(worst, over)
		t.Logf("run %d: cgroup peak %.1f MiB, linear memory peak %.1f MiB: overhead %.1f MiB", i, float64(peak)/(1<<20), float64(res.MemoryPeak)/(1<<20), float64(over)/(1<<20))
	}
	// What stays charged between runs: anonymous memory (the worker's Go heap, the compiled
	// code) and page cache (reclaimable).
	st, _ := os.ReadFile(filepath.Join(dir, "memory.stat"))
	var parts []string
	for _, l := range strings.Split(string(st), "\n") {
		k, v, _ := strings.Cut(l, " ")
		switch k {
		case "rss", "cache", "mapped_file", "anon", "file":
			n, _ := strconv.ParseInt(v, 10, 64)
			parts = append(parts, fmt.Sprintf("%s %.1f MiB", k, float64(n)/(1<<20)))
		}
	}
	t.Logf("between runs: %s", strings.Join(parts, ", "))
	if worst > WorkerOverhead {
		t.Errorf("overhead %d MiB is over WorkerOverhead (%d MiB)", worst>>20, WorkerOverhead>>20)
	}
}

// TestMeasureWorkers: the bench's measurement of workers (sandboxd bench: compile time cold and
// from the cache, a ready worker's memory) takes a sample of each kind per worker and leaves no
// worker, cgroup or cold cache behind; an image that is none is refused.
func TestMeasureWorkers(t *testing.T) {
	needPython(t)
	d := openDriver(t, "measure")
	if _, err := d.MeasureWorkers(context.Background(), filepath.Join(tmpRoot, "no-image"), 1); err == nil {
		t.Error("MeasureWorkers of no image: no error")
	}
	const n = 2
	wc, err := d.MeasureWorkers(context.Background(), pyImage, n)
	if err != nil {
		t.Fatal(err)
	}
	if len(wc.CompileCold) != n || len(wc.CompileCached) != n || len(wc.IdleRSS) != n {
		t.Fatalf("samples: %+v, want %d of each", wc, n)
	}
	for i := range n {
		if wc.CompileCold[i] <= 0 || wc.CompileCached[i] <= 0 || wc.IdleRSS[i] <= 0 {
			t.Errorf("sample %d: %v cold, %v cached, %d bytes", i, wc.CompileCold[i], wc.CompileCached[i], wc.IdleRSS[i])
		}
	}
	if left, _ := filepath.Glob(filepath.Join(d.stateDir, "cold-cache-*")); len(left) > 0 {
		t.Errorf("cold caches left: %v", left)
	}
	if groups, err := d.cg.Children(d.cgParent); err != nil || len(groups) > 0 {
		t.Errorf("worker cgroups left: %v %v", groups, err)
	}
}
