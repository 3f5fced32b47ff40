package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/sandboxd/sandboxd/internal/pyrunner"
	"github.com/sandboxd/sandboxd/internal/store"
)

// OutputsPath is where the files API serves runs' rich outputs: OutputsPath/<run id>/<n>.<ext>,
// read-only. No filesystem rule may name it (a reserved path).
const OutputsPath = "/.outputs"

// outputsDir is the host directory of a sandbox's run outputs: beside its disk, in the sandbox's
// own directory of the service (DataDir/sandboxes/<id>/outputs), which no sandbox mounts or
// writes — what the code wrote reaches it only as validated bytes (pyrunner.DecodeRich) under
// names the service makes. It goes with the sandbox (dropHost).
func (s *Service) outputsDir(sandboxID string) string {
	return filepath.Join(s.sandboxesDir(), sandboxID, "outputs")
}

// A sandbox keeps the outputs of its latest runs, at most MaxKeptOutputRuns runs and
// MaxKeptOutputBytes in all: the host's disk holds them, not the sandbox's, so the sandbox's own
// size does not bound them. Older runs' files are removed (their records still list them: the
// files API then answers not_found).
const (
	MaxKeptOutputRuns  = 256
	MaxKeptOutputBytes = 64 << 20
)

// outputsKept is what a sandbox keeps of its runs' outputs, oldest first.
type outputsKept struct {
	mu    sync.Mutex
	runs  []keptRun
	bytes int64
}

type keptRun struct {
	id    string
	bytes int64
}

// keepRunOutputs stores run r's outputs (keepOutputs) in its record; one that could not be
// stored marks them truncated, as one the limits left out does.
func (s *Service) keepRunOutputs(r *store.Run, outs []pyrunner.Output) {
	r.Outputs = s.keepOutputs(r.SandboxID, r.ID, outs)
	if len(r.Outputs) < len(outs) {
		r.OutputsTruncated = true
	}
}

// keepOutputs stores a finished run's outputs as files, <n>.<ext> in its own directory of the
// sandbox's outputs, and returns their records; then it removes the oldest runs' files past the
// limits. An output that cannot be stored is left out (logged).
func (s *Service) keepOutputs(sandboxID, runID string, outs []pyrunner.Output) []store.RunOutput {
	h := s.hostOf(sandboxID)
	if len(outs) == 0 || h == nil {
		return nil
	}
	h.outputs.mu.Lock()
	defer h.outputs.mu.Unlock()
	root := s.outputsDir(sandboxID) // made in this process: sandboxes do not outlive it (reconcile)
	dir := filepath.Join(root, runID)
	if err := os.Mkdir(dir, 0o700); err != nil { // not MkdirAll: root is gone once the sandbox is
		s.log.Error("keep run outputs", "sandbox", sandboxID, "run", runID, "err", err)
		return nil
	}
	var recs []store.RunOutput
	for i, o := range outs {
		name := fmt.Sprintf("%d.%s", i, pyrunner.OutputTypes[o.Type].Ext) // a known type: DecodeRich made it
		if err := os.WriteFile(filepath.Join(dir, name), o.Data, 0o600); err != nil {
			s.log.Error("keep run output", "sandbox", sandboxID, "run", runID, "err", err)
			continue
		}
		recs = append(recs, store.RunOutput{Type: o.Type, Kind: o.Kind, Path: OutputsPath + "/" + runID + "/" + name, Size: int64(len(o.Data))})
	}
	k := &h.outputs
	var n int64
	for _, r := range recs {
		n += r.Size
	}
	k.runs, k.bytes = append(k.runs, keptRun{runID, n}), k.bytes+n
	for len(k.runs) > 1 && (len(k.runs) > MaxKeptOutputRuns || k.bytes > MaxKeptOutputBytes) {
		old := k.runs[0]
		if err := os.RemoveAll(filepath.Join(root, old.id)); err != nil {
			s.log.Error("remove old run outputs", "sandbox", sandboxID, "run", old.id, "err", err)
		}
		k.runs, k.bytes = k.runs[1:], k.bytes-old.bytes
	}
	return recs
}
