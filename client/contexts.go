package client

import (
	"context"
	"net/http"

	"github.com/sandboxd/sandboxd/api"
)

// CreateContext starts a code context in a sandbox and returns it once its interpreter is ready;
// runs with api.RunRequest.Context set to its ContextID execute in it.
func (c *Client) CreateContext(ctx context.Context, id string) (*api.CodeContext, error) {
	var out api.CodeContext
	if _, err := c.call(ctx, request{method: "POST", path: sandboxPath(id, "contexts")}, &out, http.StatusCreated); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListContexts returns a sandbox's code contexts, oldest first (deleted ones too).
func (c *Client) ListContexts(ctx context.Context, id string) (*api.ContextList, error) {
	var out api.ContextList
	if _, err := c.call(ctx, request{method: "GET", path: sandboxPath(id, "contexts")}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// GetContext returns one code context.
func (c *Client) GetContext(ctx context.Context, id, contextID string) (*api.CodeContext, error) {
	var out api.CodeContext
	if _, err := c.call(ctx, request{method: "GET", path: sandboxPath(id, "contexts", contextID)}, &out, http.StatusOK); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeleteContext ends a code context (idempotent).
func (c *Client) DeleteContext(ctx context.Context, id, contextID string) error {
	_, err := c.call(ctx, request{method: "DELETE", path: sandboxPath(id, "contexts", contextID)}, nil, http.StatusNoContent)
	return err
}
