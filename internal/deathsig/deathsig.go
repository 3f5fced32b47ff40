// Package deathsig starts child processes that die with this process (Pdeathsig), for real.
//
// Linux sends a child its parent-death signal when the *thread* that forked it ends, not the
// process; and the Go runtime ends a thread whenever a goroutine exits while locked to it
// (runtime.LockOSThread — what code that enters a namespace does to throw a tainted thread
// away). A child started with Pdeathsig from whatever thread a goroutine ran on could so be
// killed at any time while its parent lives (a test cluster's etcd and kubelet, a throwaway
// PostgreSQL, a WASM worker were). Start forks every child from one goroutine locked to its thread
// for the life of the process: that thread ends only with the process.
package deathsig

import (
	"os/exec"
	"runtime"
)

var starts = make(chan func())

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: the thread lives as long as the process
		for f := range starts {
			f()
		}
	}()
}

// Start starts cmd (cmd.Start) from the process's spawning thread; set cmd.SysProcAttr.Pdeathsig
// as usual.
func Start(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	starts <- func() { done <- cmd.Start() }
	return <-done
}
