package sandbox

import (
	"context"
	"errors"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// Routing between replicas: a sandbox runs on the host of the replica that created it (its
// driver's processes, disk and network are there), so a request for it that reaches another
// replica is served by the owner. Owner says where; httpapi forwards the request as it came (the
// caller's own key, authenticated again by the owner), so forwarding grants nothing a caller could
// not ask of the owner directly.

// replicaCacheFor is how long the replicas' addresses are reused before the store is read again.
const replicaCacheFor = DefaultHeartbeatEvery

// Owner returns the API address of the replica that must serve a request for sandbox id of acct,
// or "" when this replica serves it: it owns the sandbox, the sandbox is unknown to the account
// (the answer is then this replica's not_found), its record is final (records are the same
// everywhere), or its owner was declared lost (its records were ended by the sweep).
func (s *Service) Owner(ctx context.Context, acct store.Account, id string) (string, error) {
	s.mu.Lock()
	_, here := s.live[id]
	s.mu.Unlock()
	if here {
		return "", nil
	}
	sb, err := s.st.GetSandbox(ctx, acct.ID, id)
	if errors.Is(err, store.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", internal("read sandbox", err)
	}
	if sb.Replica == "" || sb.Replica == s.cfg.Replica || sb.Status == store.SandboxDestroyed || sb.Status == store.SandboxError {
		return "", nil
	}
	rep, err := s.replica(ctx, sb.Replica)
	if err != nil {
		return "", err
	}
	if rep.ID == "" || rep.LostAt != nil {
		return "", nil
	}
	return rep.Address, nil
}

// Replica returns this service's replica ID.
func (s *Service) Replica() string { return s.cfg.Replica }

// replica returns the registered replica id (zero if none), from a cache of the replicas table
// read again when older than replicaCacheFor or when id is not in it.
func (s *Service) replica(ctx context.Context, id string) (store.Replica, error) {
	s.repMu.Lock()
	defer s.repMu.Unlock()
	rep, ok := s.repCache[id]
	if ok && time.Since(s.repRead) < replicaCacheFor {
		return rep, nil
	}
	reps, err := s.st.Replicas(ctx)
	if err != nil {
		return store.Replica{}, internal("read replicas", err)
	}
	s.repCache = make(map[string]store.Replica, len(reps))
	for _, r := range reps {
		s.repCache[r.ID] = r
	}
	s.repRead = time.Now()
	return s.repCache[id], nil
}
