package main

import (
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// exitInfo is what wait4 told about a child.
type exitInfo struct {
	status unix.WaitStatus
	rusage unix.Rusage
	at     time.Time
}

// reaper is the only caller of wait4 in the agent. It reaps every child (as PID 1 or subreaper
// that includes orphans of runs) and hands the status of a registered pid to its waiter; other
// statuses are discarded. Children must be started through start, which holds the reaper's lock
// across the fork and the registration, so a child cannot be reaped before it is registered.
type reaper struct {
	mu      sync.Mutex
	waiters map[int]chan exitInfo
}

func startReaper() *reaper {
	r := &reaper{waiters: make(map[int]chan exitInfo)}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGCHLD)
	go func() {
		// SIGCHLD is coalesced, and reap drains everything; the ticker is only a safety net.
		t := time.NewTicker(time.Second)
		for {
			select {
			case <-sigs:
			case <-t.C:
			}
			r.reap()
		}
	}()
	return r
}

func (r *reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		var ru unix.Rusage
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, &ru)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- exitInfo{status: ws, rusage: ru, at: time.Now()}
		}
	}
}

// start runs fork (which returns a new child's pid) and registers the pid; the returned channel
// receives the child's exit status once.
func (r *reaper) start(fork func() (int, error)) (int, <-chan exitInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := fork()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan exitInfo, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}
