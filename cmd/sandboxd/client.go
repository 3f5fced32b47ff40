package main

// The client subcommands (create, ls, get, run, logs, cp, rm, mcp) talk to a running server through
// package client. They share: the flags --url, --key and --json (anywhere on the line), the
// environment SANDBOXD_URL and AGENTCOP_API_KEY or SANDBOXD_API_KEY (in that order, as the Python
// SDK), human output by default and the API's JSON with --json, one error line with the fix on
// stderr, and the exit statuses 0 (done), 1 (failed), 2 (usage); `run` and `logs` exit with the
// run's status (see cliRunExit).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/client"
)

// clientUsage is each client subcommand's synopsis.
var clientUsage = map[string]string{
	"create": "sandboxd create [--agent-id ID] [--mode container|wasm] [--image NAME] [--ro PATH]... [--rw PATH]... [--blocked PATH]...\n" +
		"                [--allow HOST]... [--block-outbound=false] [--cpu N] [--memory SIZE] [--timeout SECONDS] [--allow-spawn]\n" +
		"                [--config FILE.json] [--no-wait]",
	"ls":      "sandboxd ls [--status STATUS] [--agent-id ID] [--limit N] [--all]   |   sandboxd ls ID:/DIR",
	"get":     "sandboxd get ID",
	"run":     "sandboxd run ID [CODE | --file FILE | -] [--timeout SECONDS] [--env K=V]... [--context CTX] [--detach]",
	"context": "sandboxd context create ID   |   sandboxd context ls ID   |   sandboxd context rm ID CTX...",
	"logs":    "sandboxd logs ID RUN_ID",
	"cp":      "sandboxd cp LOCAL ID:/PATH   |   sandboxd cp ID:/PATH LOCAL   (LOCAL - is stdin/stdout)",
	"rm":      "sandboxd rm ID|ID:/PATH...",
	"mcp":     "sandboxd mcp [--url URL] [--key KEY]   (an MCP server on stdin/stdout for an MCP client to start)",
}

// cli is one invocation of a client subcommand.
type cli struct {
	name   string
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer

	fs      *flag.FlagSet
	url     string
	key     string
	json    bool
	c       *client.Client
	signals bool // run: cancel the run on Ctrl-C (off in tests)
}

// cliUsageError is a command line that does not parse: exit status 2.
type cliUsageError struct{ msg string }

func (e cliUsageError) Error() string { return e.msg }

func cliUsagef(format string, args ...any) error { return cliUsageError{fmt.Sprintf(format, args...)} }

// cliExitStatus ends a command with a status of its own (after it printed what it had to).
type cliExitStatus int

func (e cliExitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// clientMain runs the client subcommand name and returns the process's exit status.
func clientMain(name string, args []string) int {
	c := &cli{name: name, stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, signals: true}
	return c.main(args)
}

func (c *cli) main(args []string) int {
	c.fs = flag.NewFlagSet(c.name, flag.ContinueOnError)
	c.fs.SetOutput(io.Discard)
	c.fs.StringVar(&c.url, "url", "", "server URL (default $SANDBOXD_URL, else "+client.DefaultURL+")")
	c.fs.StringVar(&c.key, "key", "", "API key (default $AGENTCOP_API_KEY, else $SANDBOXD_API_KEY)")
	c.fs.BoolVar(&c.json, "json", false, "print the API's JSON instead of human output")
	var err error
	switch c.name {
	case "create":
		err = c.create(args)
	case "ls":
		err = c.ls(args)
	case "get":
		err = c.get(args)
	case "run":
		err = c.run(args)
	case "logs":
		err = c.logs(args)
	case "cp":
		err = c.cp(args)
	case "rm":
		err = c.rm(args)
	case "context":
		err = c.contextCmd(args)
	case "mcp":
		err = c.mcp(args)
	default:
		err = cliUsagef("unknown command %q", c.name)
	}
	return c.exit(err)
}

// exit prints err (if any) as one line with its fix and returns the exit status.
func (c *cli) exit(err error) int {
	var es cliExitStatus
	var ue cliUsageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &es):
		return int(es)
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(c.stdout, "usage: %s\n\nflags:\n", clientUsage[c.name])
		c.fs.SetOutput(c.stdout)
		c.fs.PrintDefaults()
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(c.stderr, "sandboxd %s: %s\nusage: %s\n", c.name, ue.msg, clientUsage[c.name])
		return 2
	}
	fmt.Fprintf(c.stderr, "sandboxd %s: %s\n", c.name, cliExplain(err, c.url))
	return 1
}

// cliExplain turns an error into one line a person can act on.
func cliExplain(err error, url string) string {
	var ae *client.Error
	var te *client.TransportError
	var ce *client.ChecksumError
	switch {
	case errors.Is(err, client.ErrNoKey):
		return "no API key: pass --key or set SANDBOXD_API_KEY (make run prints one)"
	case errors.As(err, &te):
		return fmt.Sprintf("cannot reach sandboxd at %s: %v (is it running? make run starts one; or pass --url / set SANDBOXD_URL)",
			client.ResolveURL(url), cliRootCause(te.Err))
	case errors.As(err, &ce):
		return ce.Error() + ": the transfer was corrupted, try again"
	case errors.As(err, &ae):
		hint := ""
		switch ae.Code {
		case client.CodeUnauthorized:
			return "the server refused the API key (unauthorized): check --key or SANDBOXD_API_KEY"
		case client.CodeConcurrencyLimit:
			hint = " (remove one with sandboxd rm ID; sandboxd ls --status ready lists them)"
		case client.CodeSandboxDestroyed:
			hint = " (make a new one with sandboxd create)"
		case client.CodeRateLimited, client.CodeRunQueueFull, client.CodeCapacityExhausted, client.CodeUnavailable:
			if ae.RetryAfter > 0 {
				hint = fmt.Sprintf(" (retry in %v)", ae.RetryAfter)
			} else {
				hint = " (retry later)"
			}
		}
		return fmt.Sprintf("%s: %s%s", ae.Code, ae.Message, hint)
	}
	return err.Error()
}

func cliRootCause(err error) error {
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return err
		}
		err = u
	}
}

// parse parses flags anywhere among the arguments (a "--" ends the flags) and returns the
// positional arguments; it then makes the client.
func (c *cli) parse(args []string, minPos, maxPos int) ([]string, error) {
	pos, err := parseInterleaved(c.fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, cliUsageError{err.Error()}
	}
	if len(pos) < minPos {
		return nil, cliUsagef("missing arguments")
	}
	if maxPos >= 0 && len(pos) > maxPos {
		return nil, cliUsagef("unexpected argument %q", pos[maxPos])
	}
	c.c = client.New(c.url, c.key)
	c.c.UserAgent = "sandboxd-cli/" + version
	return pos, nil
}

func cliIndex(args []string, s string) int {
	for i, a := range args {
		if a == s {
			return i
		}
	}
	return -1
}

// cliStrings is a repeatable string flag.
type cliStrings []string

func (l *cliStrings) String() string     { return strings.Join(*l, ",") }
func (l *cliStrings) Set(v string) error { *l = append(*l, v); return nil }

// printJSON writes v as indented JSON.
func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// ctx is the context of one command: long enough for any run (600 s) and a slow server.
func (c *cli) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Hour)
}

// cliSplitRemote splits "ID:/path" into its sandbox ID and path; ok is false for a local path.
func cliSplitRemote(s string) (id, path string, ok bool) {
	id, path, ok = strings.Cut(s, ":")
	if !ok || id == "" || strings.ContainsAny(id, `/\`) || !strings.HasPrefix(path, "/") {
		return "", "", false
	}
	return id, path, true
}
