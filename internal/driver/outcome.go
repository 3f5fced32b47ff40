package driver

import "syscall"

// Outcome is what a driver saw of a run's end, before it is classified (Classify). Drivers fill
// in what they observed and leave the precedence to Classify, so every driver turns the same facts
// into the same status.
type Outcome struct {
	// Exited: the run's program ended and its exit status is known (ExitCode, and Signal when a
	// signal killed it: then ExitCode is 128+Signal). False when the driver killed the run, or
	// lost it, before it ended by itself.
	Exited   bool
	ExitCode int
	Signal   int
	// TimedOut: the run reached its timeout and was killed (by the driver, or by whatever ran it
	// on the driver's behalf, which then reports the kill's exit status: Exited).
	TimedOut bool
	// Cancelled: the caller's ctx ended, or the sandbox was destroyed, and the run was killed.
	Cancelled bool
	// OOMKill: the sandbox's memory limit killed a process during the run (its cgroup's OOM-kill
	// count went up).
	OOMKill bool
	// OutOfMemory: the program itself failed for want of memory (wasm: an uncaught MemoryError, or
	// a trap after its linear memory was refused growth past the sandbox's cap).
	OutOfMemory bool
}

// killExit is the exit code of a process killed with SIGKILL: what a run the driver killed gets.
const killExit = 128 + int(syscall.SIGKILL)

// Classify sets res's Status, ExitCode and Signal from o. It returns false, leaving res alone,
// when o explains nothing: the run neither exited nor was killed for a known reason (the driver
// lost it; that is the driver's error to return, not a result).
//
// A run that did not exit (the driver killed it) gets ExitCode 128+SIGKILL and Signal 0, and its
// status is, the first that holds:
//
//	cancelled  Cancelled (what the run would have become no longer matters to anyone)
//	oom        OOMKill (the limit killed it, or it thrashed at the limit until the timeout)
//	timeout    TimedOut
//
// A run that exited keeps its ExitCode; its status is, the first that holds:
//
//	timeout    TimedOut (Signal 0: the kill was the timeout's, not the program's)
//	oom        ExitCode ≠ 0, and OutOfMemory or (OOMKill and the program died of SIGKILL)
//	           (Signal 0: the kill was the limit's)
//	completed  ExitCode 0
//	failed     anything else (Signal kept)
//
// Cancelled does not change the status of a run that exited: it ended before the kill.
func Classify(o Outcome, res *ExecResult) bool {
	if !o.Exited {
		switch {
		case o.Cancelled:
			res.Status = StatusCancelled
		case o.OOMKill:
			res.Status = StatusOOM
		case o.TimedOut:
			res.Status = StatusTimeout
		default:
			return false
		}
		res.ExitCode, res.Signal = killExit, 0
		return true
	}
	res.ExitCode, res.Signal = o.ExitCode, o.Signal
	killed := o.Signal == int(syscall.SIGKILL) || o.ExitCode == killExit
	switch {
	case o.TimedOut:
		res.Status, res.Signal = StatusTimeout, 0
	case o.ExitCode != 0 && (o.OutOfMemory || o.OOMKill && killed):
		res.Status, res.Signal = StatusOOM, 0
	case o.ExitCode == 0:
		res.Status = StatusCompleted
	default:
		res.Status = StatusFailed
	}
	return true
}
