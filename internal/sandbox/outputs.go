package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

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

// keepOutputs stores a finished run's outputs as files, <n>.<ext> in its own directory of the
// sandbox's outputs, and returns their records. An output that cannot be stored is left out
// (logged).
func (s *Service) keepOutputs(sandboxID, runID string, outs []pyrunner.Output) []store.RunOutput {
	if len(outs) == 0 {
		return nil
	}
	dir := filepath.Join(s.outputsDir(sandboxID), runID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		s.log.Error("keep run outputs", "sandbox", sandboxID, "run", runID, "err", err)
		return nil
	}
	var recs []store.RunOutput
	for i, o := range outs {
		t, ok := pyrunner.OutputTypes[o.Type]
		if !ok {
			continue
		}
		name := fmt.Sprintf("%d.%s", i, t.Ext)
		if err := os.WriteFile(filepath.Join(dir, name), o.Data, 0o600); err != nil {
			s.log.Error("keep run output", "sandbox", sandboxID, "run", runID, "err", err)
			continue
		}
		recs = append(recs, store.RunOutput{Type: o.Type, Kind: o.Kind, Path: OutputsPath + "/" + runID + "/" + name, Size: int64(len(o.Data))})
	}
	return recs
}

// isOutputsPath reports whether p (clean, absolute) is OutputsPath or below it.
func isOutputsPath(p string) bool {
	return p == OutputsPath || strings.HasPrefix(p, OutputsPath+"/")
}
