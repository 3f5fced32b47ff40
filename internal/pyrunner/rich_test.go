package pyrunner

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// TestDecodeRich: what a hostile runner report can put in display and outputs is validated.
func TestDecodeRich(t *testing.T) {
	b64 := base64.StdEncoding.EncodeToString
	item := func(typ, kind, data string) string {
		b, _ := json.Marshal(map[string]string{"type": typ, "kind": kind, "data": data})
		return string(b)
	}
	many := make([]string, 1000)
	for i := range many {
		many[i] = item("text/plain", "display", fmt.Sprint(i))
	}
	big := strings.Repeat("x", MaxOutputBytes-10)
	for _, tc := range []struct {
		name      string
		report    string
		display   string // "-": none
		outs      []string
		truncated bool
	}{
		{name: "empty", report: `{}`, display: "-"},
		{name: "display", report: `{"display": "2"}`, display: "2"},
		{name: "display not a string", report: `{"display": {"a": 1}}`, display: "-"},
		{name: "display cut", report: `{"display": "` + strings.Repeat("é", MaxDisplay) + `"}`, display: strings.Repeat("é", MaxDisplay/2)},
		{name: "typed outputs", report: `{"outputs": [` + item("image/png", "figure", b64([]byte("\x89PNG"))) + `,` + item("text/html", "result", "<b>") + `]}`,
			display: "-", outs: []string{"image/png figure \x89PNG", "text/html result <b>"}},
		{name: "type not allowed", report: `{"outputs": [` + item("application/x-sh", "display", "rm -rf") + `,` + item("../../etc/passwd", "display", "x") + `,` + item("text/plain", "display", "ok") + `]}`,
			display: "-", outs: []string{"text/plain display ok"}, truncated: true},
		{name: "unknown kind is display", report: `{"outputs": [` + item("text/plain", "../x", "a") + `]}`, display: "-", outs: []string{"text/plain display a"}},
		{name: "bad base64", report: `{"outputs": [` + item("image/png", "figure", "!!!") + `]}`, display: "-", truncated: true},
		{name: "not an array", report: `{"outputs": {"type": "text/plain"}}`, display: "-", truncated: true},
		{name: "item not an object", report: `{"outputs": [1, "a", null]}`, display: "-", truncated: true},
		{name: "data not a string", report: `{"outputs": [{"type": "text/plain", "data": 5}]}`, display: "-", truncated: true},
		{name: "1000 items", report: `{"outputs": [` + strings.Join(many, ",") + `]}`, display: "-", outs: firstTexts(MaxOutputs), truncated: true},
		{name: "over the bytes", report: `{"outputs": [` + item("text/plain", "display", big) + `,` + item("text/plain", "display", "0123456789ab") + `,` + item("text/plain", "display", "z") + `]}`,
			display: "-", outs: []string{"text/plain display " + big, "text/plain display z"}, truncated: true},
		{name: "the runner's own flag", report: `{"outputs_truncated": true}`, display: "-", truncated: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r Rich
			if err := json.Unmarshal([]byte(tc.report), &r); err != nil {
				t.Fatal(err)
			}
			d, outs, trunc := DecodeRich(r)
			got := "-"
			if d != nil {
				got = *d
			}
			if got != tc.display {
				t.Errorf("display %.40q (%d bytes), want %.40q (%d)", got, len(got), tc.display, len(tc.display))
			}
			var gotOuts []string
			for _, o := range outs {
				gotOuts = append(gotOuts, o.Type+" "+o.Kind+" "+string(o.Data))
			}
			if strings.Join(gotOuts, "\n") != strings.Join(tc.outs, "\n") {
				t.Errorf("outputs %.200q, want %.200q", gotOuts, tc.outs)
			}
			if trunc != tc.truncated {
				t.Errorf("truncated %v, want %v", trunc, tc.truncated)
			}
		})
	}
}

func firstTexts(n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("text/plain display %d", i))
	}
	return out
}

// TestParseReport: a runner's report read once for every driver: a null result is none.
func TestParseReport(t *testing.T) {
	for _, tc := range []struct {
		doc, result, errType, display string
		bad                           bool
	}{
		{doc: `{}`},
		{doc: `{"result":null}`},
		{doc: `{"result":[1,2],"display":"'<b>'"}`, result: `[1,2]`, display: `"'<b>'"`},
		{doc: `{"error":{"type":"ZeroDivisionError","message":"division by zero","traceback":"…"}}`, errType: "ZeroDivisionError"},
		{doc: `{"result":`, bad: true},
	} {
		r, err := ParseReport([]byte(tc.doc))
		errType := ""
		if r.Error != nil {
			errType = r.Error.Type
		}
		if (err != nil) != tc.bad || string(r.Result) != tc.result || errType != tc.errType || string(r.Display) != tc.display {
			t.Errorf("%s: result %s error %q display %s err %v", tc.doc, r.Result, errType, r.Display, err)
		}
	}
}
