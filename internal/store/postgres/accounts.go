package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/sandboxd/sandboxd/internal/store"
)

// CreateAccount adds an account; store.ErrConflict if its ID or name is taken.
func (d *DB) CreateAccount(ctx context.Context, a store.Account) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO accounts (id, name, plan, created_at) VALUES ($1, $2, $3, $4)`,
		a.ID, a.Name, a.Plan, a.CreatedAt.UTC())
	if err != nil {
		return fmt.Errorf("create account %s: %w", a.Name, classify(err))
	}
	return nil
}

// AccountByName returns the account called name, or store.ErrNotFound.
func (d *DB) AccountByName(ctx context.Context, name string) (store.Account, error) {
	a, err := scanAccount(d.db.QueryRowContext(ctx, `SELECT id, name, plan, created_at FROM accounts WHERE name = $1`, name))
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
	_, err := d.db.ExecContext(ctx, `INSERT INTO api_keys (id, account_id, key_hash, created_at) VALUES ($1, $2, $3, $4)`,
		keyID, accountID, keyHash, at.UTC())
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
	a, err := scanAccount(d.db.QueryRowContext(ctx, `SELECT a.id, a.name, a.plan, a.created_at
		FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = $1`, keyHash))
	if err != nil {
		// The hash identifies a secret: it stays out of the message.
		return store.Account{}, fmt.Errorf("account by key: %w", classify(err))
	}
	return a, nil
}

func scanAccount(s scanner) (store.Account, error) {
	var a store.Account
	if err := s.Scan(&a.ID, &a.Name, &a.Plan, &a.CreatedAt); err != nil {
		return store.Account{}, err
	}
	a.CreatedAt = a.CreatedAt.UTC()
	return a, nil
}
