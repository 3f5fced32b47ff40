package sqlite

import (
	"context"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// CreateAccount adds an account; store.ErrConflict if its ID or name is taken.
func (d *DB) CreateAccount(ctx context.Context, a store.Account) error {
	var e enc
	args := []any{a.ID, a.Name, a.Plan, e.time(a.CreatedAt)}
	if e.err != nil {
		return fmt.Errorf("create account %s: %w", a.Name, e.err)
	}
	_, err := d.exec(ctx, nil, `INSERT INTO accounts (id, name, plan, created_at) VALUES (?, ?, ?, ?)`, args...)
	if err != nil {
		return fmt.Errorf("create account %s: %w", a.Name, classify(err))
	}
	return nil
}

// AccountByName returns the account called name, or store.ErrNotFound.
func (d *DB) AccountByName(ctx context.Context, name string) (store.Account, error) {
	a, err := scanAccount(d.queryRow(ctx,
		`SELECT id, name, plan, created_at FROM accounts WHERE name = ?`, name))
	if err != nil {
		return store.Account{}, fmt.Errorf("account %s: %w", name, classify(err))
	}
	return a, nil
}

// AddKey stores the hash of a new API key; store.ErrConflict if the key ID or the hash is taken,
// store.ErrNotFound if the account does not exist.
func (d *DB) AddKey(ctx context.Context, accountID, keyID string, keyHash []byte, at time.Time) error {
	if len(keyHash) == 0 {
		return fmt.Errorf("add key %s: empty key hash", keyID)
	}
	var e enc
	args := []any{keyID, accountID, keyHash, e.time(at)}
	if e.err != nil {
		return fmt.Errorf("add key %s: %w", keyID, e.err)
	}
	_, err := d.exec(ctx, nil, `INSERT INTO api_keys (id, account_id, key_hash, created_at) VALUES (?, ?, ?, ?)`, args...)
	if err != nil {
		return fmt.Errorf("add key %s: %w", keyID, classify(err))
	}
	return nil
}

// AccountByKeyHash returns the account owning the key with that hash, or store.ErrNotFound.
func (d *DB) AccountByKeyHash(ctx context.Context, keyHash []byte) (store.Account, error) {
	if len(keyHash) == 0 {
		return store.Account{}, fmt.Errorf("account by key: %w", store.ErrNotFound)
	}
	a, err := scanAccount(d.queryRow(ctx, `SELECT a.id, a.name, a.plan, a.created_at
		FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?`, keyHash))
	if err != nil {
		// The hash identifies a secret: it stays out of the message.
		return store.Account{}, fmt.Errorf("account by key: %w", classify(err))
	}
	return a, nil
}

func scanAccount(s scanner) (store.Account, error) {
	var a store.Account
	var created string
	if err := s.Scan(&a.ID, &a.Name, &a.Plan, &created); err != nil {
		return store.Account{}, err
	}
	t, err := parseTime(created)
	if err != nil {
		return store.Account{}, err
	}
	a.CreatedAt = t
	return a, nil
}
