package sandbox

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
	"github.com/sandboxd/sandboxd/internal/store"
)

// TestKeepOutputsBounded: a sandbox keeps the outputs of its latest runs only, by count and bytes.
func TestKeepOutputsBounded(t *testing.T) {
	for _, tc := range []struct {
		name      string
		runs      int
		size      int
		keptFirst int // the oldest run whose files are still there
	}{
		{"by runs", MaxKeptOutputRuns + 10, 1, 10},
		{"by bytes", 10, pyrunner.MaxOutputBytes, 10 - MaxKeptOutputBytes/pyrunner.MaxOutputBytes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Service{cfg: Config{DataDir: t.TempDir()}, hosts: map[string]*host{"sbx_t": {}}, log: slog.New(slog.DiscardHandler)}
			if err := os.MkdirAll(s.outputsDir("sbx_t"), 0o700); err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte("x"), tc.size)
			ids := make([]string, tc.runs)
			for i := range ids {
				ids[i] = newID("run_")
				recs := s.keepOutputs("sbx_t", ids[i], []pyrunner.Output{{Type: "text/plain", Kind: "display", Data: data}})
				if len(recs) != 1 || recs[0].Path != OutputsPath+"/"+ids[i]+"/0.txt" || recs[0].Size != int64(tc.size) {
					t.Fatalf("run %d: %+v", i, recs)
				}
			}
			for i, id := range ids {
				_, err := os.Stat(filepath.Join(s.outputsDir("sbx_t"), id, "0.txt"))
				if kept := i >= tc.keptFirst; kept != (err == nil) {
					t.Errorf("run %d of %d: kept %v, stat %v", i, tc.runs, kept, err)
				}
			}
		})
	}
	// A sandbox gone: nothing is written.
	s := &Service{cfg: Config{DataDir: t.TempDir()}, hosts: map[string]*host{}, log: slog.New(slog.DiscardHandler)}
	if recs := s.keepOutputs("sbx_gone", "run_x", []pyrunner.Output{{Type: "text/plain", Data: []byte("x")}}); recs != nil {
		t.Errorf("gone sandbox: %+v", recs)
	}
}

// TestKeepRunOutputsLost: outputs that could not be stored mark the run's outputs truncated.
func TestKeepRunOutputsLost(t *testing.T) {
	outs := []pyrunner.Output{{Type: "text/plain", Kind: "display", Data: []byte("x")}}
	for _, tc := range []struct {
		name      string
		hosts     map[string]*host
		makeRoot  bool
		truncated bool
	}{
		{"stored", map[string]*host{"sbx_t": {}}, true, false},
		{"no outputs directory", map[string]*host{"sbx_t": {}}, false, true},
		{"sandbox gone", map[string]*host{}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Service{cfg: Config{DataDir: t.TempDir()}, hosts: tc.hosts, log: slog.New(slog.DiscardHandler)}
			if tc.makeRoot {
				if err := os.MkdirAll(s.outputsDir("sbx_t"), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			r := store.Run{ID: newID("run_"), SandboxID: "sbx_t"}
			s.keepRunOutputs(&r, outs)
			if r.OutputsTruncated != tc.truncated || (len(r.Outputs) == 1) == tc.truncated {
				t.Errorf("outputs %+v truncated %v, want truncated %v", r.Outputs, r.OutputsTruncated, tc.truncated)
			}
		})
	}
}
