package main

import (
	"context"
	"errors"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/client"
	"github.com/sandboxd/sandboxd/internal/mcpserver"
)

// mcp serves the MCP tools (package mcpserver) over stdin/stdout to the MCP client that started
// this process, as a client of a running server: every tool call is API calls with --key. It
// refuses to start without a key (the tools could do nothing), ends when its stdin closes, and
// on SIGINT or SIGTERM. Nothing but MCP messages goes to stdout.
func (c *cli) mcp(args []string) error {
	if _, err := c.parse(args, 0, 0); err != nil {
		return err
	}
	if c.c.APIKey == "" {
		return client.ErrNoKey
	}
	c.c.UserAgent = "sandboxd-mcp/" + version
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv := mcpserver.New(func(context.Context, *mcp.CallToolRequest) (*client.Client, error) { return c.c, nil },
		mcpserver.Options{Version: version})
	err := srv.Run(ctx, &mcp.StdioTransport{MaxLineLength: mcpserver.MaxMessageBytes})
	if ctx.Err() != nil || errors.Is(err, io.EOF) {
		return nil // a signal, or the client closed stdin: a normal end
	}
	return err
}
