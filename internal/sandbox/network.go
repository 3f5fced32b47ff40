package sandbox

import (
	"context"
	"sort"
	"sync"

	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/store"
)

// maxDeniedEvents is how many network.denied events one sandbox writes individually; past it the
// denials are counted and summed up in one event when the sandbox is destroyed, so that a loop of
// denied connections cannot flood the audit log.
const maxDeniedEvents = 500

// netCounters are a live sandbox's egress counts. Guarded by its own mutex: decisions arrive from
// the driver's goroutines.
type netCounters struct {
	mu            sync.Mutex
	run           string           // the run executing, "" between runs
	allowed       int64            // of the current run
	denied        int64            // of the current run
	allowedByHost map[string]int64 // of the current run (or between runs), for network.allowed
	deniedEvents  int              // written individually, over the sandbox's life
	deniedUnsaid  int64            // denied past maxDeniedEvents, not yet written
}

func (c *netCounters) start(runID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.run, c.allowed, c.denied = runID, 0, 0
}

// NetworkDecision takes an egress decision from a driver (any goroutine; it never blocks for long)
// and records it: denials as network.denied audit events, allowed attempts counted per host and
// written as network.allowed events when the run ends.
func (s *Service) NetworkDecision(d egress.Decision) {
	s.mu.Lock()
	lv := s.live[d.SandboxID]
	s.mu.Unlock()
	if lv == nil {
		return
	}
	c := &lv.net
	c.mu.Lock()
	runID := c.run
	write := false
	if d.Allowed {
		c.allowed++
		if c.allowedByHost == nil {
			c.allowedByHost = map[string]int64{}
		}
		c.allowedByHost[hostKey(d)]++
	} else {
		n := int64(max(1, d.Count))
		c.denied += n
		s.cfg.Observer.EgressDenied(int(n))
		if c.deniedEvents < maxDeniedEvents {
			c.deniedEvents++
			write = true
		} else {
			c.deniedUnsaid += n
		}
	}
	c.mu.Unlock()
	if write {
		detail := obj("host", d.Host, "address", addrString(d), "port", d.Port, "protocol", d.Proto, "reason", d.Reason,
			"count", max(1, d.Count))
		s.audit(context.Background(), store.Event{AccountID: lv.rec.AccountID, Type: "network.denied", SandboxID: lv.id,
			RunID: runID, AgentID: lv.rec.AgentID, Detail: detail})
	}
}

// endNetwork closes the network accounting of a run: it returns the run's allowed and denied
// counts and writes one network.allowed event per host.
func (s *Service) endNetwork(lv *live, runID string) (allowed, denied int64) {
	c := &lv.net
	c.mu.Lock()
	allowed, denied = c.allowed, c.denied
	byHost := c.allowedByHost
	c.run, c.allowed, c.denied, c.allowedByHost = "", 0, 0, nil
	c.mu.Unlock()
	s.writeAllowed(lv, runID, byHost)
	return allowed, denied
}

// flushNetwork writes what is left when a sandbox ends.
func (s *Service) flushNetwork(lv *live) {
	c := &lv.net
	c.mu.Lock()
	byHost, unsaid := c.allowedByHost, c.deniedUnsaid
	c.allowedByHost, c.deniedUnsaid = nil, 0
	c.mu.Unlock()
	s.writeAllowed(lv, "", byHost)
	if unsaid > 0 {
		s.audit(context.Background(), store.Event{AccountID: lv.rec.AccountID, Type: "network.denied", SandboxID: lv.id,
			AgentID: lv.rec.AgentID, Detail: obj("summary", true, "count", unsaid,
				"reason", "more denials than are recorded one by one")})
	}
}

func (s *Service) writeAllowed(lv *live, runID string, byHost map[string]int64) {
	hosts := make([]string, 0, len(byHost))
	for h := range byHost {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, h := range hosts {
		s.audit(context.Background(), store.Event{AccountID: lv.rec.AccountID, Type: "network.allowed", SandboxID: lv.id,
			RunID: runID, AgentID: lv.rec.AgentID, Detail: obj("host", h, "count", byHost[h])})
	}
}

// hostKey names the destination of an allowed decision: its host name, else its address.
func hostKey(d egress.Decision) string {
	if d.Host != "" {
		return d.Host
	}
	return addrString(d)
}

func addrString(d egress.Decision) string {
	if !d.Addr.IsValid() {
		return ""
	}
	return d.Addr.String()
}
