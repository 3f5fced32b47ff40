package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Run executes req on the agent listening at socketPath and returns the run's result.
//
// It dials, sends the request line and reads events until the "exit" event; onEvent, when not nil,
// is called (on the calling goroutine, in order) for every "stdout"/"stderr" chunk as it arrives.
// A slow onEvent slows the run down (back-pressure reaches the process's pipes) but does not lose
// output.
//
// Errors: a nil error means the agent reported the run; RunResult.AgentError then says whether
// the agent itself failed (e.g. the interpreter is missing). A non-nil error means there is no
// result: the agent could not be reached, or the connection broke before the exit event (wrapping
// io.ErrUnexpectedEOF when the agent closed it), or ctx ended.
//
// Agent calls: each "call" event is answered by onCall in a goroutine of its own (so output keeps
// flowing meanwhile), its answer written back as one line; a call that comes while another is
// being answered (the agent sends one at a time) is refused at once. With onCall nil every call
// is refused. Run returns only once the call it was answering has returned (its ctx ends with the
// run).
//
// Cancellation: when ctx ends, Run closes the connection, which makes the agent kill the run's
// whole process tree, and returns an error wrapping ctx.Err(). Run does not wait for the agent to
// finish killing; the agent serves the next connection only once it has.
func Run(ctx context.Context, socketPath string, req RunRequest, onEvent func(Event), onCall CallHandler) (RunResult, error) {
	return RunDial(ctx, UnixDial(socketPath), req, onEvent, onCall)
}

// RunDial is Run on a connection dial makes (TCPDial: an agent in TCP mode).
func RunDial(ctx context.Context, dial Dial, req RunRequest, onEvent func(Event), onCall CallHandler) (RunResult, error) {
	conn, err := dial(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return RunResult{}, fmt.Errorf("agent run: %w", ctx.Err())
		}
		return RunResult{}, fmt.Errorf("agent run: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	line, err := json.Marshal(req)
	if err != nil {
		return RunResult{}, fmt.Errorf("agent run: encoding request: %w", err)
	}
	line = append(line, '\n')
	if _, err := conn.Write(line); err != nil {
		return RunResult{}, runErr(ctx, fmt.Errorf("sending request: %w", err))
	}

	var wmu sync.Mutex // one answer line at a time on conn
	var answer func(context.Context, []byte) []byte
	if onCall != nil {
		answer = func(ctx context.Context, line []byte) []byte { return onCall(ctx, line) }
	}
	calls := pyrunner.NewCallServer(ctx, answer, func(line []byte) {
		// A failed write is the connection's end, which the event loop sees.
		wmu.Lock()
		defer wmu.Unlock()
		conn.SetWriteDeadline(time.Now().Add(answerWriteTimeout))
		conn.Write(append(line[:len(line):len(line)], '\n'))
	})
	defer calls.Stop()
	br := bufio.NewReaderSize(conn, 64<<10)
	for {
		line, err := ReadLine(br, MaxEventLine)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return RunResult{}, runErr(ctx, fmt.Errorf("reading events (connection closed before the exit event?): %w", err))
		}
		var ev Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return RunResult{}, runErr(ctx, fmt.Errorf("bad event from the agent: %w", err))
		}
		switch ev.Type {
		case "stdout", "stderr":
			if onEvent != nil {
				onEvent(ev)
			}
		case "call":
			calls.Serve(ev.Call)
		case "exit":
			if ev.Result == nil {
				return RunResult{}, errors.New("agent run: exit event without a result")
			}
			return *ev.Result, nil
		}
		// Unknown event types are skipped, for compatibility with newer agents.
	}
}

// answerWriteTimeout bounds the write of one answer (the agent reads the host's lines all the time).
const answerWriteTimeout = 30 * time.Second

// runErr prefers ctx's error: a closed connection is the expected effect of cancellation.
func runErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("agent run: %w", ctx.Err())
	}
	return fmt.Errorf("agent run: %w", err)
}

// WaitReady returns nil once the agent at socketPath answers a Ping, polling about every
// millisecond; when ctx ends first it returns an error wrapping ctx.Err() (and the last error).
// The socket accepts connections as soon as Listen has bound it, before the agent runs: a
// connection only proves anything once the agent answers on it. A ping starts no run and leaves
// nothing behind; since the agent serves connections in order, one made during a run is answered
// after that run.
func WaitReady(ctx context.Context, socketPath string) error {
	return WaitReadyDial(ctx, socketPath, UnixDial(socketPath))
}

// WaitReadyDial is WaitReady on connections dial makes; name names the agent in errors.
func WaitReadyDial(ctx context.Context, name string, dial Dial) error {
	t := time.NewTimer(0)
	defer t.Stop()
	var lastErr error
	for {
		if lastErr = ping(ctx, dial); lastErr == nil {
			return nil
		}
		t.Reset(time.Millisecond)
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent at %s not ready: %w (last error: %v)", name, ctx.Err(), lastErr)
		case <-t.C:
		}
	}
}

// ping sends Ping and reads the "ready" answer.
func ping(ctx context.Context, dial Dial) error {
	conn, err := dial(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if _, err := conn.Write([]byte(Ping + "\n")); err != nil {
		return err
	}
	line, err := ReadLine(bufio.NewReader(conn), 1<<10)
	if err != nil {
		return fmt.Errorf("no answer to a ping: %w", err)
	}
	var ev Event
	if err := json.Unmarshal(line, &ev); err != nil || ev.Type != "ready" {
		return fmt.Errorf("unexpected answer to a ping: %q", line)
	}
	return nil
}

// Listen creates a unix stream socket bound at path (which must not exist; its directory should
// be one only the host can write), listening, and returns it as a file to hand to the agent as
// descriptor ListenFD. The caller closes its copy once the agent has it; the path then reaches the
// agent for as long as the agent lives.
func Listen(path string) (*os.File, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File() // a dup, in blocking mode
	ln.Close()
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	return f, nil
}

// ReadLine reads one '\n'-terminated line (without the '\n') of at most max bytes: the framing of
// the protocol in both directions. At EOF a non-empty unterminated line is returned with
// io.ErrUnexpectedEOF.
func ReadLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line)+len(chunk) > max+1 {
			return line, fmt.Errorf("line longer than %d bytes", max)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return bytes.TrimSuffix(line, []byte{'\n'}), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, io.ErrUnexpectedEOF
		default:
			return line, err
		}
	}
}
