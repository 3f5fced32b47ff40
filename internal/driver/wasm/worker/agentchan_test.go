package worker

import (
	"strings"
	"testing"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// drain reads what the guest would find on channel c now.
func drain(c *agentChan) string {
	var b []byte
	buf := make([]byte, 4096)
	for n := c.read(buf); n > 0; n = c.read(buf) {
		b = append(b, buf[:n]...)
	}
	return string(b)
}

// TestAgentChan: the WASM agent channel serves one request at a time, whatever the guest writes;
// what waits to be read stays one answer and a refusal.
func TestAgentChan(t *testing.T) {
	info := pyrunner.AgentInfo{AgentID: "a", SandboxID: "s", RunID: "r"}
	line := func(b []byte) string { return string(b) + "\n" }
	flood := strings.Repeat("\n", 1<<20)
	tests := []struct {
		name      string
		keepHello bool     // the guest does not read the hello first
		writes    []string // each in one write; the guest reads what is there after each
		noRead    bool     // ... except that it reads nothing until all are written
		want      string   // what the guest read, in all
		suffix    bool     // ... ends with
		closed    bool     // the channel has ended: a write fails with EIO
		forwarded int
	}{
		{name: "requests and answers in turn", writes: []string{`{"a":1}` + "\n", `{"a":`, "2}\n"},
			want: line(pyrunner.AgentAnswer([]byte(`{"a":1}`))) + line(pyrunner.AgentAnswer([]byte(`{"a":2}`))), forwarded: 2},
		{name: "not JSON is answered without the host", writes: []string{"nope\n", "{}\n"},
			want: line(pyrunner.AgentRefusal(pyrunner.AgentCallError, 400, "the request is not JSON")) + line(pyrunner.AgentAnswer([]byte(`{}`))), forwarded: 1},
		{name: "two lines in one write", writes: []string{"{}\n{}\n"},
			want: line(pyrunner.AgentAnswer([]byte(`{}`))) + line(pyrunner.AgentAnswer([]byte(`{}`))), forwarded: 2},
		{name: "a request before the hello is read", keepHello: true, writes: []string{"{}\n"},
			want: string(pyrunner.AgentHello(info)) + line(pyrunner.AgentAnswer([]byte(`{}`))), forwarded: 1},
		{name: "a flood of lines without reading", noRead: true, writes: []string{flood, flood, flood, flood},
			want: line(pyrunner.AgentOutOfTurn()), suffix: true, closed: true},
		{name: "a line over the limit", writes: []string{strings.Repeat("x", pyrunner.MaxAgentRequest+1)},
			want: line(pyrunner.AgentTooLong()), closed: true},
		{name: "a long line ending over the limit", writes: []string{strings.Repeat("x", pyrunner.MaxAgentRequest), "x\n"},
			want: line(pyrunner.AgentTooLong()), closed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forwarded := 0
			c := newAgentChan(info, func(l []byte) []byte { forwarded++; return pyrunner.AgentAnswer(l) })
			if !tt.keepHello {
				if got := drain(c); got != string(pyrunner.AgentHello(info)) {
					t.Fatalf("hello %q", got)
				}
			}
			var got strings.Builder
			for i, w := range tt.writes {
				n, errno := c.write([]byte(w))
				if errno != 0 && !(tt.closed && i > 0) {
					t.Fatalf("write %d: %v", i, errno)
				}
				if errno == 0 && n != len(w) {
					t.Fatalf("write %d: %d of %d bytes", i, n, len(w))
				}
				if !tt.noRead {
					got.WriteString(drain(c))
				}
			}
			if tt.noRead {
				if len(c.out) > maxUnread+1024 {
					t.Fatalf("%d bytes of answers wait to be read", len(c.out))
				}
				got.WriteString(drain(c))
			}
			if g := got.String(); g != tt.want && !(tt.suffix && strings.HasSuffix(g, tt.want)) {
				t.Errorf("read %q (%d bytes), want %q", g[max(0, len(g)-200):], len(g), tt.want)
			}
			if forwarded != tt.forwarded {
				t.Errorf("%d requests forwarded, want %d", forwarded, tt.forwarded)
			}
			if _, errno := c.write([]byte("{}\n")); (errno == experimentalsys.EIO) != tt.closed {
				t.Errorf("a write after: %v, want EIO: %v", errno, tt.closed)
			}
		})
	}
}

// TestAgentChanCap: requests past pyrunner.MaxAgentForwards are refused without the host.
func TestAgentChanCap(t *testing.T) {
	forwarded := 0
	c := newAgentChan(pyrunner.AgentInfo{}, func(l []byte) []byte { forwarded++; return pyrunner.AgentAnswer(l) })
	drain(c)
	for range pyrunner.MaxAgentForwards + 5 {
		if _, errno := c.write([]byte("{}\n")); errno != 0 {
			t.Fatal(errno)
		}
		drain(c)
	}
	if forwarded != pyrunner.MaxAgentForwards {
		t.Errorf("%d forwarded, want %d", forwarded, pyrunner.MaxAgentForwards)
	}
}

// TestAgentChanRunEnd: a run's channel ends with its run (writes fail with EIO), and one whose
// run is not the running one is not forwarded to the host (which would take it as the running
// run's call).
func TestAgentChanRunEnd(t *testing.T) {
	w := &worker{} // no host: a forward would fail on its nil writer
	first := w.runAgentChan(pyrunner.AgentInfo{RunID: "1"})
	drain(first)
	w.endAgentChan(first)
	if _, errno := first.write([]byte("{}\n")); errno != experimentalsys.EIO {
		t.Errorf("a write after the run's end: %v, want EIO", errno)
	}
	second := w.runAgentChan(pyrunner.AgentInfo{RunID: "2"})
	defer w.endAgentChan(second)
	if got := string(first.forward([]byte("{}"))); !strings.Contains(got, "the run of this agent channel is over") {
		t.Errorf("the ended run's forward: %s", got)
	}
	w.endAgentChan(first) // ending it again leaves the running run's channel
	if w.serving.Load() != second {
		t.Error("the running run's channel was dropped")
	}
}
