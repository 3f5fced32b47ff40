package pyrunner_test

import (
	"context"
	"testing"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// TestCallServer: a call is answered in a goroutine of its own; a second one while the first is
// answered is refused at once (429); a run without calls served gets each refused; Stop cancels
// the call being answered and waits for it.
func TestCallServer(t *testing.T) {
	sent := make(chan string, 4)
	send := func(line []byte) { sent <- string(line) }

	pyrunner.NewCallServer(context.Background(), nil, send).Serve([]byte(`{}`))
	if got, want := <-sent, string(pyrunner.AgentRefusal(pyrunner.AgentCallError, 0, "agent calls are not served to this run")); got != want {
		t.Errorf("no calls served: %s, want %s", got, want)
	}

	entered, release := make(chan string), make(chan struct{})
	stopped := make(chan error, 1)
	c := pyrunner.NewCallServer(context.Background(), func(ctx context.Context, line []byte) []byte {
		entered <- string(line)
		select {
		case <-release:
			return []byte("answer to " + string(line))
		case <-ctx.Done():
			stopped <- ctx.Err()
			return nil
		}
	}, send)
	c.Serve([]byte("one"))
	if got := <-entered; got != "one" {
		t.Fatalf("answering %q", got)
	}
	c.Serve([]byte("two")) // while one is answered
	if got, want := <-sent, string(pyrunner.AgentRefusal(pyrunner.AgentCallError, 429, "one agent call at a time")); got != want {
		t.Errorf("a second call at once: %s, want %s", got, want)
	}
	release <- struct{}{}
	if got := <-sent; got != "answer to one" {
		t.Errorf("the answer: %s", got)
	}
	c.Serve([]byte("three")) // answered: the next is served
	if got := <-entered; got != "three" {
		t.Fatalf("answering %q", got)
	}
	c.Stop()
	if err := <-stopped; err != context.Canceled {
		t.Errorf("the call's ctx at Stop: %v", err)
	}
}
