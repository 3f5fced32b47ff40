package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

// run: sandboxd run ID [CODE | --file FILE | -] streams the run's output live (an async run
// followed through its event stream), prints the value of `result` when it is set (else the
// display of a trailing expression, as a notebook would), and exits with
// the run's status (cliRunExit). Ctrl-C cancels the run on the server.
func (c *cli) run(args []string) error {
	file := c.fs.String("file", "", "read the code from FILE (- for stdin)")
	timeout := c.fs.Int("timeout", 0, "run timeout in seconds, 1-600 (default 30)")
	var env cliStrings
	c.fs.Var(&env, "env", "environment variable K=V for the run (repeatable)")
	inContext := c.fs.String("context", "", "run in this code context (sandboxd context create ID makes one)")
	detach := c.fs.Bool("detach", false, "print the run ID and return at once (then: sandboxd logs ID RUN_ID)")
	pos, err := c.parse(args, 1, 2)
	if err != nil {
		return err
	}
	code, err := c.code(pos[1:], *file)
	if err != nil {
		return err
	}
	req := api.RunRequest{Code: &code, Context: *inContext}
	if *timeout != 0 {
		req.Timeout = timeout
	}
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return cliUsagef("--env %q: want K=V", kv)
		}
		if req.Env == nil {
			req.Env = map[string]string{}
		}
		req.Env[k] = v
	}
	ctx, cancel := c.ctx()
	defer cancel()
	acc, err := c.c.RunAsync(ctx, pos[0], req)
	if err != nil {
		return err
	}
	if *detach {
		if c.json {
			return c.printJSON(acc)
		}
		fmt.Fprintln(c.stdout, acc.RunID)
		return nil
	}
	return c.follow(ctx, pos[0], acc.RunID, true)
}

// code returns the run's code: the argument, FILE, or stdin ("-", or no argument with stdin not
// a terminal).
func (c *cli) code(arg []string, file string) (string, error) {
	var r io.Reader
	switch {
	case file != "" && len(arg) > 0:
		return "", cliUsagef("give the code once: as an argument or with --file")
	case file == "-" || len(arg) > 0 && arg[0] == "-":
		r = c.stdin
	case file != "":
		b, err := os.ReadFile(file)
		return string(b), err
	case len(arg) > 0:
		return arg[0], nil
	default:
		if f, ok := c.stdin.(*os.File); !ok || cliIsTerminal(f) {
			return "", cliUsagef("no code: pass CODE, --file FILE, or - to read stdin")
		}
		r = c.stdin
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return "", fmt.Errorf("read the code from stdin: %w", err)
	}
	return string(b), nil
}

func cliIsTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// logs: sandboxd logs ID RUN_ID replays a run's output and, while it runs, streams the rest; it
// exits like run.
func (c *cli) logs(args []string) error {
	pos, err := c.parse(args, 2, 2)
	if err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	return c.follow(ctx, pos[0], pos[1], false)
}

// follow streams a run's output to stdout and stderr (with --json: prints only the final run)
// and ends with the run's exit status. With cancelOnInterrupt, a first Ctrl-C cancels the run on
// the server and keeps following it to its end; a second one stops waiting.
func (c *cli) follow(ctx context.Context, id, runID string, cancelOnInterrupt bool) error {
	if c.signals && cancelOnInterrupt {
		sigc := make(chan os.Signal, 2)
		signal.Notify(sigc, os.Interrupt, syscall.SIGTERM)
		done := make(chan struct{})
		defer func() { signal.Stop(sigc); close(done) }()
		go func() {
			select {
			case <-sigc:
			case <-done:
				return
			}
			fmt.Fprintf(c.stderr, "\nsandboxd run: cancelling run %s (Ctrl-C again to stop waiting)\n", runID)
			cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := c.c.CancelRun(cctx, id, runID); err != nil {
				fmt.Fprintf(c.stderr, "sandboxd run: cancel: %s\n", cliExplain(err, c.url))
			}
			select {
			case <-sigc:
				os.Exit(130)
			case <-done:
			}
		}()
	}
	var print func(stream, text string) error
	outEndsInNewline := true
	if !c.json {
		print = func(stream, text string) error {
			w := c.stdout
			if stream == "stderr" {
				w = c.stderr
			} else if text != "" {
				outEndsInNewline = strings.HasSuffix(text, "\n")
			}
			_, err := io.WriteString(w, text)
			return err
		}
	}
	run, err := c.c.Follow(ctx, id, runID, print)
	if err != nil {
		return err
	}
	if c.json {
		if err := c.printJSON(run); err != nil {
			return err
		}
	} else if len(run.Result) > 0 && string(run.Result) != "null" {
		if !outEndsInNewline {
			fmt.Fprintln(c.stdout)
		}
		fmt.Fprintf(c.stdout, "%s\n", run.Result)
	} else if run.Display != nil {
		if !outEndsInNewline {
			fmt.Fprintln(c.stdout)
		}
		fmt.Fprintf(c.stdout, "%s\n", *run.Display)
	}
	status, msg := cliRunExit(run)
	if msg != "" {
		fmt.Fprintf(c.stderr, "sandboxd %s: %s\n", c.name, msg)
	}
	for _, s := range []struct {
		name string
		cut  bool
	}{{"stdout", run.StdoutTruncated}, {"stderr", run.StderrTruncated}} {
		if s.cut {
			fmt.Fprintf(c.stderr, "sandboxd %s: note: the run's %s was over the limit and was cut\n", c.name, s.name)
		}
	}
	if status != 0 {
		return cliExitStatus(status)
	}
	return nil
}

// cliRunExit maps a finished run to the command's exit status and a line for stderr:
// completed 0; failed the code's exit code (1 for an uncaught exception); timeout 124 (like
// timeout(1)); oom 137 (a SIGKILL); cancelled 130 (like Ctrl-C); error and anything else 1.
func cliRunExit(run *api.Run) (int, string) {
	switch run.Status {
	case "completed":
		return 0, ""
	case "failed":
		code := 1
		if run.ExitCode != nil && *run.ExitCode > 0 && *run.ExitCode < 256 {
			code = *run.ExitCode
		}
		return code, "" // the traceback, if any, is on stderr already
	case "timeout":
		return 124, fmt.Sprintf("run %s timed out (set its limit with --timeout, at most 600 seconds)", run.RunID)
	case "oom":
		return 137, fmt.Sprintf("run %s was killed: out of memory (the sandbox's limit is set at create with --memory)", run.RunID)
	case "cancelled":
		return 130, fmt.Sprintf("run %s was cancelled", run.RunID)
	case "error":
		msg := "the service failed to run it"
		var e struct{ Message string }
		if json.Unmarshal(run.Error, &e) == nil && e.Message != "" {
			msg += ": " + e.Message
		}
		return 1, fmt.Sprintf("run %s: %s", run.RunID, msg)
	}
	return 1, fmt.Sprintf("run %s ended with status %q", run.RunID, run.Status)
}
