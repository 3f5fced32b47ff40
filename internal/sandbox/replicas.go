package sandbox

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/store"
)

// Replicas: several services (each a `sandboxd serve` process, a replica) may share one store.
// Each owns the sandboxes it created (their driver runs them on its host) and heartbeats into the
// store; one at a time (the store's "sweeper" lock) declares lost the replicas whose heartbeat is
// stale and ends what they owned: their open runs error with a ReplicaLost reason, their live
// sandboxes are recorded destroyed with reason replica_lost. A local driver's sandboxes die with
// their host, so they are only recorded; a shared driver's (driver.ReplicaDestroyer: kubernetes,
// whose pods outlive the replica that made them) are destroyed by the sweeping replica.
//
// The records are what makes this safe, not the lock: a run or a sandbox is final once (the
// store refuses a second final write, store.ErrFinal), so a replica that was slow rather than
// dead, and finishes a run the sweeper already ended, changes nothing and writes no second
// event. When such a replica's heartbeat is refused (store.ErrReplicaLost) it destroys every
// sandbox it still runs and registers again, with none.

// Replica defaults (Config.HeartbeatEvery, Config.StaleAfter).
const (
	// DefaultHeartbeatEvery is how often a replica heartbeats, and sweeps when it holds the lock.
	DefaultHeartbeatEvery = 3 * time.Second
	// DefaultStaleAfter is how old a replica's last heartbeat may be before it is declared lost:
	// five missed heartbeats. A shorter one would declare lost a replica that is only slow — a
	// long garbage collection, a loaded host, a database failover of a few seconds — and kill its
	// runs for nothing; a longer one leaves the runs of a dead replica showing "running", and its
	// sandboxes counting against their account's quota, for longer. 15 s is the most a client
	// waits to learn that its run died with its replica.
	DefaultStaleAfter = 15 * time.Second
	// LocalReplica is the replica ID of a service given none (a single server's tests).
	LocalReplica = "rep_local"
)

// ReasonReplicaLost is the destroy reason of a sandbox whose replica stopped heartbeating.
const ReasonReplicaLost = "replica_lost"

// sweepLock is the name of the leadership lock the sweep runs under.
const sweepLock = "sweeper"

// replicaLoop heartbeats and sweeps every Config.HeartbeatEvery until stop is closed.
type replicaLoop struct {
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// startReplica registers the service's replica and starts its two loops: the heartbeat, on its
// own so that a long sweep never delays it (a replica whose heartbeat waits on its own sweep could
// be declared lost by the next sweeper), and the sweep; the first sweep runs at once.
func (s *Service) startReplica(ctx context.Context) error {
	if err := s.st.RegisterReplica(ctx, s.cfg.Replica, s.cfg.Address); err != nil {
		return fmt.Errorf("register replica: %w", err)
	}
	s.setHealthy(true)
	s.loop = &replicaLoop{stop: make(chan struct{}), done: make(chan struct{})}
	var wg sync.WaitGroup
	every := func(first bool, f func()) {
		wg.Go(func() {
			t := time.NewTicker(s.cfg.HeartbeatEvery)
			defer t.Stop()
			if first {
				f()
			}
			for {
				select {
				case <-s.loop.stop:
					return
				case <-t.C:
				}
				f()
			}
		})
	}
	every(false, s.heartbeat)
	every(true, s.sweep)
	go func() { wg.Wait(); close(s.loop.done) }()
	return nil
}

// setHealthy records whether this replica's last heartbeat succeeded; healthySince is when the
// current run of successful heartbeats began (zero while they fail).
func (s *Service) setHealthy(ok bool) {
	s.repMu.Lock()
	defer s.repMu.Unlock()
	switch {
	case !ok:
		s.healthySince = time.Time{}
	case s.healthySince.IsZero():
		s.healthySince = time.Now()
	}
}

// mayDeclareLost reports whether this replica has heartbeated without a failure for StaleAfter:
// only then may it declare others lost. After the database was out of reach for everyone, every
// replica's heartbeat is stale; the first one back must give the others a full StaleAfter to
// heartbeat again rather than declare them all lost (and have them destroy their sandboxes).
func (s *Service) mayDeclareLost() bool {
	s.repMu.Lock()
	defer s.repMu.Unlock()
	return !s.healthySince.IsZero() && time.Since(s.healthySince) >= s.cfg.StaleAfter
}

// stopReplica stops the loop and waits for it.
func (s *Service) stopReplica() {
	if s.loop == nil {
		return
	}
	s.loop.once.Do(func() { close(s.loop.stop) })
	<-s.loop.done
}

// heartbeat records this replica alive. If it was declared lost meanwhile (it stopped for longer
// than StaleAfter: a pause, a partition from the database), what it runs was recorded ended by
// another replica: it destroys those sandboxes here too and registers again.
func (s *Service) heartbeat() {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HeartbeatEvery)
	err := s.st.Heartbeat(ctx, s.cfg.Replica)
	cancel()
	s.setHealthy(err == nil)
	if err == nil {
		return
	}
	if !errors.Is(err, store.ErrReplicaLost) {
		s.log.Error("replica heartbeat", "replica", s.cfg.Replica, "err", err)
		return
	}
	s.lost.Store(true) // creates are refused until it is registered again
	defer s.lost.Store(false)
	ctx = context.Background()
	s.log.Warn("this replica was declared lost: destroying its sandboxes, whose records another replica ended", "replica", s.cfg.Replica)
	s.mu.Lock()
	var all []*live
	for _, lv := range s.live {
		all = append(all, lv)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, lv := range all {
		wg.Go(func() { s.destroy(lv, ReasonReplicaLost) })
	}
	wg.Wait()
	if err := s.st.RegisterReplica(ctx, s.cfg.Replica, s.cfg.Address); err != nil {
		s.log.Error("register replica again", "replica", s.cfg.Replica, "err", err)
	}
}

// sweep, when this replica holds the sweep lock, declares lost the replicas whose heartbeat is
// stale and ends the records of every live sandbox of a lost replica.
func (s *Service) sweep() {
	ctx := context.Background()
	l, err := s.st.TryLock(ctx, sweepLock)
	if err != nil {
		s.log.Error("sweep lock", "err", err)
		return
	}
	if l == nil {
		return // another replica sweeps
	}
	defer l.Release()
	if err := s.sweepLocked(ctx); err != nil {
		s.log.Error("sweep lost replicas", "err", err)
	}
}

func (s *Service) sweepLocked(ctx context.Context) error {
	if reps, err := s.st.Replicas(ctx); err != nil {
		return err
	} else if len(reps) == 1 && reps[0].ID == s.cfg.Replica {
		return nil // alone (a SQLite file has one server): a read, not a write, every period
	}
	var stale []store.Replica
	if s.mayDeclareLost() {
		var err error
		if stale, err = s.st.MarkStaleReplicas(ctx, s.cfg.StaleAfter); err != nil {
			return err
		}
	}
	for _, r := range stale {
		s.log.Warn("replica declared lost: its heartbeat is stale", "lost_replica", r.ID, "address", r.Address,
			"last_heartbeat", r.HeartbeatAt)
	}
	// Sandboxes first, replicas second: a sandbox listed here was created before the replicas are
	// read, so if they say its replica is lost, the replica had not registered again when it
	// created it — it belongs to the lost time, which the replica ends itself too (heartbeat).
	recs, err := s.st.LiveSandboxes(ctx)
	if err != nil {
		return err
	}
	reps, err := s.st.Replicas(ctx)
	if err != nil {
		return err
	}
	lost := map[string]bool{}
	for _, r := range reps {
		lost[r.ID] = r.LostAt != nil && r.ID != s.cfg.Replica
	}
	for _, rec := range recs {
		if lost[rec.Replica] {
			if err := s.endLost(ctx, rec); err != nil {
				return err
			}
		}
	}
	for _, r := range reps {
		if lost[r.ID] {
			s.destroyLost(ctx, r)
		}
	}
	return nil
}

// destroyLostWait bounds one sweep's wait for a lost replica's sandboxes to be destroyed.
const destroyLostWait = time.Minute

// destroyLost destroys what lost replica r left in the drivers every replica reaches
// (driver.ReplicaDestroyer: the kubernetes driver's pods and Secrets, its warm pods included),
// once per time r is declared lost (again after a failure, at the next sweep). The records are
// ended first (endLost); a local driver's sandboxes went with r's host.
func (s *Service) destroyLost(ctx context.Context, r store.Replica) {
	if s.swept[r.ID].Equal(*r.LostAt) {
		return
	}
	done := true
	seen := map[driver.ReplicaDestroyer]bool{}
	for _, d := range s.drivers {
		rd, ok := d.(driver.ReplicaDestroyer)
		if !ok || seen[rd] {
			continue
		}
		seen[rd] = true
		// Bounded: a pod on a node that went with the replica may never confirm its end; the
		// next sweep tries again, and the sweep's other work is not held for ever.
		dctx, cancel := context.WithTimeout(ctx, destroyLostWait)
		n, err := rd.DestroyReplica(dctx, r.ID, *r.LostAt)
		cancel()
		if err != nil {
			done = false
			s.log.Error("destroy the sandboxes of a lost replica", "lost_replica", r.ID, "driver", d.Name(), "destroyed", n, "err", err)
			continue
		}
		if n > 0 {
			s.log.Warn("destroyed the sandboxes a lost replica left", "lost_replica", r.ID, "driver", d.Name(), "destroyed", n)
		}
	}
	if done {
		if s.swept == nil {
			s.swept = map[string]time.Time{}
		}
		s.swept[r.ID] = *r.LostAt
	}
}

// endLost records the end of rec, a live sandbox of a lost replica: its open runs error (each
// with its run.finished event, in the same commit), its contexts are deleted, it is destroyed
// (reason replica_lost). Every record is written by whoever ends it first, with its event.
func (s *Service) endLost(ctx context.Context, rec store.Sandbox) error {
	t := now()
	runs, _, err := s.st.ListRuns(ctx, rec.ID, 0, 0)
	if err != nil {
		return fmt.Errorf("runs of %s: %w", rec.ID, err)
	}
	n := 0
	for _, r := range runs {
		if store.FinalRun(r.Status) {
			continue
		}
		r.Status, r.FinishedAt = RunError, &t
		r.Error = obj("type", "ReplicaLost", "message", fmt.Sprintf("replica %s stopped heartbeating while the run ran", rec.Replica), "traceback", "")
		// The run's end and its event: one commit, refused if its replica ended it first.
		ev := s.event(store.Event{AccountID: r.AccountID, Type: "run.finished", SandboxID: rec.ID, RunID: r.ID, AgentID: rec.AgentID,
			Detail: obj("status", r.Status, "exit_code", nil, "duration_ms", 0, "reason", ReasonReplicaLost)})
		if err := s.st.RecordRun(ctx, r, nil, &ev); errors.Is(err, store.ErrFinal) {
			continue
		} else if err != nil {
			return fmt.Errorf("end run %s: %w", r.ID, err)
		}
		n++
	}
	if _, err := s.st.EndContexts(ctx, rec.ID, "sandbox "+ReasonReplicaLost, t); err != nil {
		return fmt.Errorf("end contexts of %s: %w", rec.ID, err)
	}
	rec.Status, rec.DestroyedAt, rec.DestroyReason = store.SandboxDestroyed, &t, ReasonReplicaLost
	if err := s.st.UpdateSandbox(ctx, rec); errors.Is(err, store.ErrFinal) {
		return nil // its replica (slow, not dead) or another sweeper ended it first
	} else if err != nil {
		return fmt.Errorf("record %s destroyed: %w", rec.ID, err)
	}
	s.audit(ctx, store.Event{AccountID: rec.AccountID, Type: "sandbox.destroyed", SandboxID: rec.ID, AgentID: rec.AgentID,
		Detail: obj("reason", ReasonReplicaLost, "replica", rec.Replica)})
	s.log.Warn("ended the sandbox of a lost replica", "sandbox", rec.ID, "lost_replica", rec.Replica, "runs_ended", n)
	return nil
}
