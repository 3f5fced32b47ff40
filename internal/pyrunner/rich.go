package pyrunner

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// Rich results (runner.py's _Rich): besides "result" and "error", the runner's report may hold
//
//	"display": the repr() of the code's trailing expression (a JSON string; absent when the code
//	           ends in no expression or its value is None)
//	"outputs": [{"type": MIME type, "kind": "result"|"display"|"figure", "data": text, or base64
//	           for the binary types}, …] — display(obj) calls, the trailing value's rich form
//	           (_repr_html_, _repr_png_, …), matplotlib's open figures
//	"outputs_truncated": true when some were left out (over MaxOutputs or MaxOutputBytes)
//
// The code controls that document: DecodeRich keeps only what these rules allow.

// MaxOutputs is how many outputs a run keeps.
const MaxOutputs = 32

// MaxOutputBytes is how many bytes a run's outputs hold in all (binary data decoded).
const MaxOutputBytes = 8 << 20

// MaxReportExtra is how much longer than its result limit a runner's report may be for its
// display (MaxDisplay bytes of JSON) and outputs (at most 12 MiB of JSON in the runner: base64
// makes binary data 4/3 as long, escapes make text longer; names and punctuation add a little).
const MaxReportExtra = 12<<20 + MaxDisplay + 1<<20

// Output kinds.
const (
	KindResult  = "result"  // the rich form of the trailing expression's value
	KindDisplay = "display" // a display(obj) call
	KindFigure  = "figure"  // a matplotlib figure left open
)

// OutputTypes are the MIME types an output may have, with the file name extension it is stored
// under; binary ones travel in base64.
var OutputTypes = map[string]struct {
	Ext    string
	Binary bool
}{
	"text/plain":       {"txt", false},
	"text/html":        {"html", false},
	"text/markdown":    {"md", false},
	"application/json": {"json", false},
	"image/svg+xml":    {"svg", false},
	"image/png":        {"png", true},
	"image/jpeg":       {"jpg", true},
}

// Output is one rich output of a run, validated.
type Output struct {
	Type string // a key of OutputTypes
	Kind string // KindResult, KindDisplay or KindFigure
	Data []byte // the content (decoded from base64 for binary types)
}

// Report is a runner's report (ParseReport): the JSON of the global `result` (nil: none), the
// uncaught exception (nil: none), and the rich part, not yet validated (DecodeRich).
type Report struct {
	Result json.RawMessage `json:"result"`
	Error  *ReportError    `json:"error"`
	Rich
}

// ReportError is the uncaught exception of a report (the drivers' PyError types convert from it).
type ReportError struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback"`
}

// ParseReport reads the report document a runner wrote (a "result" of JSON null is none).
func ParseReport(doc []byte) (Report, error) {
	var r Report
	if err := json.Unmarshal(doc, &r); err != nil {
		return Report{}, fmt.Errorf("runner's report: %w", err)
	}
	if string(r.Result) == "null" {
		r.Result = nil
	}
	return r, nil
}

// Rich is the part of a runner's report that DecodeRich reads (as it came: not yet validated).
type Rich struct {
	Display   json.RawMessage `json:"display,omitempty"`
	Outputs   json.RawMessage `json:"outputs,omitempty"`
	Truncated bool            `json:"outputs_truncated,omitempty"`
}

// MaxDisplay is the longest display (bytes) a run keeps.
const MaxDisplay = 1 << 20

// DecodeRich validates r: display must be a JSON string (else it is dropped), cut to MaxDisplay
// bytes (at a character boundary); outputs an array of objects whose type is in OutputTypes and
// whose data is a string (base64 for binary types), at most MaxOutputs of them and MaxOutputBytes
// in all. An item that breaks a rule is left out and sets truncated, as do the ones past a limit.
func DecodeRich(r Rich) (display *string, outs []Output, truncated bool) {
	truncated = r.Truncated
	var s string
	if len(r.Display) > 0 && json.Unmarshal(r.Display, &s) == nil {
		if len(s) > MaxDisplay {
			cut := MaxDisplay
			for cut > 0 && !utf8.RuneStart(s[cut]) {
				cut--
			}
			s = s[:cut]
		}
		display = &s
	}
	if len(r.Outputs) == 0 {
		return display, nil, truncated
	}
	var items []json.RawMessage
	if json.Unmarshal(r.Outputs, &items) != nil {
		return display, nil, true
	}
	total := 0
	for _, raw := range items {
		var it struct {
			Type string `json:"type"`
			Kind string `json:"kind"`
			Data string `json:"data"`
		}
		if len(outs) >= MaxOutputs || json.Unmarshal(raw, &it) != nil {
			truncated = true
			continue
		}
		t, ok := OutputTypes[it.Type]
		if !ok {
			truncated = true
			continue
		}
		data := []byte(it.Data)
		if t.Binary {
			var err error
			if data, err = base64.StdEncoding.DecodeString(it.Data); err != nil {
				truncated = true
				continue
			}
		}
		if total+len(data) > MaxOutputBytes {
			truncated = true
			continue
		}
		switch it.Kind {
		case KindResult, KindFigure:
		default:
			it.Kind = KindDisplay
		}
		total += len(data)
		outs = append(outs, Output{Type: it.Type, Kind: it.Kind, Data: data})
	}
	return display, outs, truncated
}
