package pyrunner

import (
	"regexp"
	"strconv"
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

// TestRunnerLimits: the limits runner.py enforces on its own side of the channel (the request it
// sends, the answer line it reads) are this package's MaxAgentRequest and MaxAgentAnswerLine.
// runner.py writes them as Python literals: sums of integers and shifts.
func TestRunnerLimits(t *testing.T) {
	m := regexp.MustCompile(`(?m)^\s*max_request, max_answer = ([^,\n]+), ([^#\n]+?)\s*(?:#|$)`).FindStringSubmatch(Source)
	if m == nil {
		t.Fatal("runner.py: no line `max_request, max_answer = …  # …`")
	}
	for _, c := range []struct {
		name, expr string
		want       int
	}{{"max_request", m[1], MaxAgentRequest}, {"max_answer", m[2], MaxAgentAnswerLine}} {
		got, err := pyIntSum(c.expr)
		if err != nil || got != c.want {
			t.Errorf("runner.py's %s = %s = %d (%v); want %d", c.name, c.expr, got, err, c.want)
		}
	}
}

// pyIntSum evaluates a Python expression of the form "a << b + (c << d) + e".
func pyIntSum(expr string) (int, error) {
	sum := 0
	for term := range strings.SplitSeq(expr, "+") {
		term = strings.Trim(strings.TrimSpace(term), "()")
		v, shift, _ := strings.Cut(term, "<<")
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			return 0, err
		}
		if shift != "" {
			k, err := strconv.Atoi(strings.TrimSpace(shift))
			if err != nil {
				return 0, err
			}
			n <<= k
		}
		sum += n
	}
	return sum, nil
}
