package sandbox

import "time"

// SetWarmRefillWait sets how long the refill for a taken warm sandbox waits for it to go quiet and
// at most (warmRefillQuiet, warmRefillGrace), for the creates that follow.
func (s *Service) SetWarmRefillWait(quiet, grace time.Duration) {
	s.pool.mu.Lock()
	defer s.pool.mu.Unlock()
	s.pool.quiet, s.pool.grace = quiet, grace
}
