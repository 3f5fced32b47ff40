// Package metrics is sandboxd's Prometheus instrumentation: it implements the service's Observer,
// wraps the store to time its calls, and serves the text exposition format at /metrics.
//
// Metrics (all prefixed sandboxd_):
//
//	sandboxes{mode,status}                 gauge: live sandboxes (provisioning, ready, running)
//	                                       and warm ones (warm: provisioned, owned by no one)
//	warm_pool_total{mode,result}           counter: creates that found a warm sandbox (hit) or
//	                                       none (miss), while the warm pool is on
//	sandboxes_destroyed_total{mode,reason} counter
//	create_seconds{mode,outcome}           histogram: create requests (outcome: ready,
//	                                       provisioning or the error code)
//	run_seconds{mode,status}               histogram: runs, by final status (its _count is the
//	                                       number of runs by final status)
//	egress_denied_total                    counter: refused egress attempts
//	quota_rejections_total{reason}         counter: concurrency_limit, capacity_exhausted
//	store_seconds{op,result}               histogram: store calls (result: ok or error)
//
// plus the Go runtime's and the process's standard collectors.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Latency buckets from 1 ms to ~30 s.
var buckets = prometheus.ExponentialBuckets(0.001, 2.5, 12)

// Metrics holds the collectors. Create it with New.
type Metrics struct {
	reg       *prometheus.Registry
	destroyed *prometheus.CounterVec
	creates   *prometheus.HistogramVec
	runs      *prometheus.HistogramVec
	denied    prometheus.Counter
	quota     *prometheus.CounterVec
	store     *prometheus.HistogramVec
	warm      *prometheus.CounterVec
}

// New registers sandboxd's metrics; live reports the live sandboxes by (mode, status) at each
// scrape.
func New(live func() map[[2]string]int) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		destroyed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sandboxd_sandboxes_destroyed_total",
			Help: "Sandboxes destroyed, by mode and reason."}, []string{"mode", "reason"}),
		creates: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "sandboxd_create_seconds",
			Help: "Latency of create requests, by mode and outcome.", Buckets: buckets}, []string{"mode", "outcome"}),
		runs: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "sandboxd_run_seconds",
			Help: "Duration of runs, by mode and final status.", Buckets: buckets}, []string{"mode", "status"}),
		denied: prometheus.NewCounter(prometheus.CounterOpts{Name: "sandboxd_egress_denied_total",
			Help: "Egress attempts refused by the network rules."}),
		quota: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sandboxd_quota_rejections_total",
			Help: "Creates refused by a limit, by reason."}, []string{"reason"}),
		store: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "sandboxd_store_seconds",
			Help: "Latency of store calls, by operation and result.", Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12)},
			[]string{"op", "result"}),
		warm: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sandboxd_warm_pool_total",
			Help: "Creates that found a warm sandbox of their shape (hit) or none (miss)."}, []string{"mode", "result"}),
	}
	m.reg.MustRegister(m.destroyed, m.creates, m.runs, m.denied, m.quota, m.store, m.warm,
		&liveCollector{fn: live, desc: prometheus.NewDesc("sandboxd_sandboxes", "Live sandboxes, by mode and status.", []string{"mode", "status"}, nil)},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// Created, Destroyed, RunFinished, EgressDenied, QuotaRejected and WarmTaken implement
// sandbox.Observer.

func (m *Metrics) Created(mode, outcome string, took time.Duration) {
	m.creates.WithLabelValues(mode, outcome).Observe(took.Seconds())
}

func (m *Metrics) Destroyed(mode, reason string) { m.destroyed.WithLabelValues(mode, reason).Inc() }

func (m *Metrics) RunFinished(mode, status string, took time.Duration) {
	m.runs.WithLabelValues(mode, status).Observe(took.Seconds())
}

func (m *Metrics) EgressDenied(n int) { m.denied.Add(float64(n)) }

func (m *Metrics) QuotaRejected(kind string) { m.quota.WithLabelValues(kind).Inc() }

func (m *Metrics) WarmTaken(mode string, hit bool) {
	result := "miss"
	if hit {
		result = "hit"
	}
	m.warm.WithLabelValues(mode, result).Inc()
}

// liveCollector reports the live sandboxes at scrape time.
type liveCollector struct {
	fn   func() map[[2]string]int
	desc *prometheus.Desc
}

func (c *liveCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *liveCollector) Collect(ch chan<- prometheus.Metric) {
	counts := c.fn()
	for _, mode := range []string{"container", "wasm"} {
		for _, status := range []string{"provisioning", "ready", "running", "warm"} {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[[2]string{mode, status}]), mode, status)
		}
	}
}
