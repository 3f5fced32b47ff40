package driver

import "testing"

// TestClassify holds Classify's precedence: every way a run can end, and the combinations where
// more than one reason holds.
func TestClassify(t *testing.T) {
	const kill = 137
	for _, tc := range []struct {
		name   string
		o      Outcome
		ok     bool
		status Status
		exit   int
		signal int
	}{
		// The driver killed the run (it did not exit).
		{"cancelled", Outcome{Cancelled: true}, true, StatusCancelled, kill, 0},
		{"timeout", Outcome{TimedOut: true}, true, StatusTimeout, kill, 0},
		{"oom kill", Outcome{OOMKill: true}, true, StatusOOM, kill, 0},
		{"cancelled beats oom and timeout", Outcome{Cancelled: true, OOMKill: true, TimedOut: true}, true, StatusCancelled, kill, 0},
		{"oom beats timeout (thrashing at the limit)", Outcome{OOMKill: true, TimedOut: true}, true, StatusOOM, kill, 0},
		{"out of memory alone explains no kill", Outcome{OutOfMemory: true}, false, "", 0, 0},
		{"lost: nothing explains it", Outcome{}, false, "", 0, 0},

		// The program exited.
		{"completed", Outcome{Exited: true}, true, StatusCompleted, 0, 0},
		{"failed", Outcome{Exited: true, ExitCode: 1}, true, StatusFailed, 1, 0},
		{"killed by a signal", Outcome{Exited: true, ExitCode: 139, Signal: 11}, true, StatusFailed, 139, 11},
		{"killed at the timeout by the agent", Outcome{Exited: true, ExitCode: kill, Signal: 9, TimedOut: true}, true, StatusTimeout, kill, 0},
		{"timeout beats oom", Outcome{Exited: true, ExitCode: kill, Signal: 9, TimedOut: true, OOMKill: true}, true, StatusTimeout, kill, 0},
		{"oom killed", Outcome{Exited: true, ExitCode: kill, Signal: 9, OOMKill: true}, true, StatusOOM, kill, 0},
		{"oom killed, exit code only", Outcome{Exited: true, ExitCode: kill, OOMKill: true}, true, StatusOOM, kill, 0},
		{"oom kill of another process, the program failed", Outcome{Exited: true, ExitCode: 1, OOMKill: true}, true, StatusFailed, 1, 0},
		{"oom kill of another process, the program completed", Outcome{Exited: true, OOMKill: true}, true, StatusCompleted, 0, 0},
		{"MemoryError", Outcome{Exited: true, ExitCode: 1, OutOfMemory: true}, true, StatusOOM, 1, 0},
		{"trap after a refused grow", Outcome{Exited: true, ExitCode: 134, OutOfMemory: true}, true, StatusOOM, 134, 0},
		{"MemoryError caught, exit 0", Outcome{Exited: true, OutOfMemory: true}, true, StatusCompleted, 0, 0},
		{"cancelled after it exited", Outcome{Exited: true, ExitCode: 1, Cancelled: true}, true, StatusFailed, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := ExecResult{Status: "untouched", ExitCode: -1, Signal: -1}
			ok := Classify(tc.o, &res)
			if ok != tc.ok {
				t.Fatalf("Classify(%+v) = %v, want %v", tc.o, ok, tc.ok)
			}
			if !ok {
				if res.Status != "untouched" || res.ExitCode != -1 || res.Signal != -1 {
					t.Errorf("Classify changed the result it could not classify: %+v", res)
				}
				return
			}
			if res.Status != tc.status || res.ExitCode != tc.exit || res.Signal != tc.signal {
				t.Errorf("Classify(%+v): status %s exit %d signal %d, want %s exit %d signal %d",
					tc.o, res.Status, res.ExitCode, res.Signal, tc.status, tc.exit, tc.signal)
			}
		})
	}
}
