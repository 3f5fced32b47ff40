package sandbox

import "time"

// Observer receives the service's measurements (for metrics). Its methods are called on the
// request path and from the sandboxes' goroutines: they must be quick and safe for concurrent use.
type Observer interface {
	// Created: a create request ended, with the sandbox's status ("ready", "provisioning") or
	// the error kind.
	Created(mode, outcome string, took time.Duration)
	// Destroyed: a sandbox was destroyed for reason (deleted, expired, error, server_restart,
	// replica_lost).
	Destroyed(mode, reason string)
	// RunFinished: a run ended with status after running for took.
	RunFinished(mode, status string, took time.Duration)
	// EgressDenied: n egress attempts were refused.
	EgressDenied(n int)
	// QuotaRejected: a create was refused by a limit (concurrency_limit, capacity_exhausted).
	QuotaRejected(kind string)
}

// WarmObserver is an Observer that also wants to know about the warm pool: WarmTaken is called
// for each create (that passed validation) while the pool is on, hit when it found a warm
// sandbox of its shape.
type WarmObserver interface {
	WarmTaken(mode string, hit bool)
}

type noObserver struct{}

func (noObserver) Created(string, string, time.Duration)     {}
func (noObserver) Destroyed(string, string)                  {}
func (noObserver) RunFinished(string, string, time.Duration) {}
func (noObserver) EgressDenied(int)                          {}
func (noObserver) QuotaRejected(string)                      {}

// LiveCounts returns how many sandboxes are live, by mode and status ("provisioning", "ready",
// "running"), and how many are warm (status "warm": provisioned, owned by no one yet).
func (s *Service) LiveCounts() map[[2]string]int {
	s.mu.Lock()
	lvs := make([]*live, 0, len(s.live))
	for _, lv := range s.live {
		lvs = append(lvs, lv)
	}
	s.mu.Unlock()
	out := s.pool.counts()
	for _, lv := range lvs {
		lv.mu.Lock()
		out[[2]string{lv.rec.Mode, lv.rec.Status}]++
		lv.mu.Unlock()
	}
	return out
}
