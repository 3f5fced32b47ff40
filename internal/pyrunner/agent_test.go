package pyrunner

import (
	"strings"
	"testing"
)

// TestParseAgentCall: what a run's code may send as a request, and what is refused with why.
func TestParseAgentCall(t *testing.T) {
	for _, tc := range []struct {
		line, method, name, args, err string
	}{
		{line: `{"method": "run", "task": "analyze sales data", "args": {"k": [1]}}`, method: "run", name: "analyze sales data", args: `{"k": [1]}`},
		{line: `{"method": "call", "tool": "db.query/v2:x-y_z"}`, method: "call", name: "db.query/v2:x-y_z", args: `{}`},
		{line: `{"method": "run", "task": "line\nbreak \u00e9"}`, method: "run", name: "line\nbreak é", args: `{}`},
		{line: `not json`, err: "not a JSON object"},
		{line: `[1, 2]`, err: "not a JSON object"},
		{line: `{"method": "delete", "task": "x"}`, err: `"method" must be "run" or "call"`},
		{line: `{"method": "run"}`, err: `"task" must be a non-empty string`},
		{line: `{"method": "run", "task": 3}`, err: `"task" must be a non-empty string`},
		{line: `{"method": "call", "tool": ""}`, err: `"tool" must be a non-empty string`},
		{line: `{"method": "call", "tool": "two words"}`, err: "tool name"},
		{line: `{"method": "call", "tool": "` + strings.Repeat("t", MaxToolName+1) + `"}`, err: "tool name"},
		{line: `{"method": "call", "tool": "t", "args": [1]}`, err: `"args" must be a JSON object`},
		{line: `{"method": "call", "tool": "t", "args": null}`, err: `"args" must be a JSON object`},
		{line: `{"method": "call", "tool": "t", "task": "x"}`, err: `unknown field "task"`},
		{line: `{"method": "run", "task": "` + strings.Repeat("x", MaxAgentRequest) + `"}`, err: "over the 1048576-byte limit"},
	} {
		c, err := ParseAgentCall([]byte(tc.line))
		name := tc.line
		if len(name) > 60 {
			name = name[:60]
		}
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: err %v, want one with %q", name, err, tc.err)
			}
		case err != nil:
			t.Errorf("%s: %v", name, err)
		case c.Method != tc.method || c.Name != tc.name || string(c.Args) != tc.args || c.Bytes != len(tc.line):
			t.Errorf("%s: %+v", name, c)
		}
	}
}

// TestAgentLocalAnswer: the in-sandbox side's own answers, shared by both drivers.
func TestAgentLocalAnswer(t *testing.T) {
	tests := []struct {
		n       int
		line    string
		forward bool
		status  string
	}{
		{1, `{"method": "run", "task": "x"}`, true, ""},
		{MaxAgentForwards, `{}`, true, ""}, // the host validates and refuses
		{1, `not json`, false, `"status":400`},
		{1, ``, false, `"status":400`},
		{MaxAgentForwards + 1, `{"method": "run", "task": "x"}`, false, `"status":429`},
		{MaxAgentForwards + 1, `not json`, false, `"status":429`},
	}
	for _, tt := range tests {
		ans, forward := AgentLocalAnswer(tt.n, []byte(tt.line))
		if forward != tt.forward || !strings.Contains(string(ans), tt.status) || (forward && ans != nil) {
			t.Errorf("request %d %q: answer %s, forward %v", tt.n, tt.line, ans, forward)
		}
	}
	for _, ans := range [][]byte{AgentTooLong(), AgentOutOfTurn()} {
		if !strings.Contains(string(ans), "the agent channel is closed") {
			t.Errorf("%s: does not say the channel is closed", ans)
		}
	}
}
