package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"github.com/sandboxd/sandboxd/internal/store"
)

// keyPrefix starts every API key, so that a leaked key is recognisable.
const keyPrefix = "sbxk_"

// HashKey is how API keys are stored: SHA-256 of the whole key (keys carry 256 random bits, so a
// fast hash is enough).
func HashKey(key string) []byte {
	h := sha256.Sum256([]byte(key))
	return h[:]
}

// CreateKey creates the account called name on plan if it does not exist yet, and a new API key
// for it. It returns the key (shown once, stored only hashed) and the account. An existing
// account keeps its plan; created reports whether the account is new.
func CreateKey(ctx context.Context, st store.Store, plans map[string]Plan, name, plan string) (key string, acct store.Account, created bool, err error) {
	if _, ok := plans[plan]; !ok {
		return "", acct, false, fmt.Errorf("unknown plan %q (known: free, pro, enterprise)", plan)
	}
	if !agentIDRe.MatchString(name) {
		return "", acct, false, errors.New("account names are 1-128 characters of A-Z a-z 0-9 . _ : -")
	}
	acct, err = st.AccountByName(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		acct = store.Account{ID: newID("acct_"), Name: name, Plan: plan, CreatedAt: now()}
		err = st.CreateAccount(ctx, acct)
		if errors.Is(err, store.ErrConflict) { // created concurrently
			acct, err = st.AccountByName(ctx, name)
		} else {
			created = err == nil
		}
	}
	if err != nil {
		return "", acct, false, fmt.Errorf("account %s: %w", name, err)
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", acct, false, fmt.Errorf("random key: %w", err)
	}
	key = keyPrefix + base64.RawURLEncoding.EncodeToString(b)
	if err := st.AddKey(ctx, acct.ID, newID("key_"), HashKey(key), now()); err != nil {
		return "", acct, false, fmt.Errorf("store key: %w", err)
	}
	return key, acct, created, nil
}

// Authenticate returns the account owning key; an unknown key is KindNotFound.
func (s *Service) Authenticate(ctx context.Context, key string) (store.Account, error) {
	if !strings.HasPrefix(key, keyPrefix) || len(key) > 128 {
		return store.Account{}, errorf(KindNotFound, "unknown API key")
	}
	acct, err := s.st.AccountByKeyHash(ctx, HashKey(key))
	if errors.Is(err, store.ErrNotFound) {
		return store.Account{}, errorf(KindNotFound, "unknown API key")
	}
	if err != nil {
		return store.Account{}, internal("authenticate", err)
	}
	return acct, nil
}
