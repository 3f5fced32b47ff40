package deathsig

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestChildOutlivesEndedThreads: a child started by Start with Pdeathsig lives on while
// goroutines end their locked threads (the thread that asked for it among them); one started by
// exec.Cmd.Start from a thread that then ends dies, which is what Start is for.
func TestChildOutlivesEndedThreads(t *testing.T) {
	start := func(viaStart bool) *exec.Cmd {
		cmd := exec.Command("sleep", "60")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		done := make(chan error)
		go func() {
			runtime.LockOSThread() // and exit locked: the thread ends
			if viaStart {
				done <- Start(cmd)
			} else {
				done <- cmd.Start()
			}
		}()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	kept, lost := start(true), start(false)
	exited := make(chan struct{})
	go func() { lost.Wait(); close(exited) }()
	select {
	case <-exited: // the plain Start's child died with its thread
	case <-time.After(30 * time.Second):
		t.Fatal("the child of an ended thread still runs: the test proves nothing here")
	}
	time.Sleep(100 * time.Millisecond) // a signal sent with the other's would have landed (a lower bound)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", kept.Process.Pid))
	if err != nil || strings.Contains(string(st[bytes.LastIndexByte(st, ')'):]), ") Z") {
		t.Fatalf("the child started by Start died with the asking thread: %s %v", st, err)
	}
}
