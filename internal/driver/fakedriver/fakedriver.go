// Package fakedriver is an in-memory driver.Driver for testing the layers above the drivers (the
// sandbox service, the HTTP API) without a container runtime. It runs no code: Exec interprets a
// few directives so tests can script outcomes.
//
//	"block"        waits until the run is cancelled or times out
//	"sleep:MS"     waits MS milliseconds, then completes
//	"stubborn"     a driver slow to stop: ignores cancellation and the timeout, waits until
//	               the test calls ReleaseStubborn, then completes
//	"fail"         exits 1 with a Python-style error
//	"crash"        in a context: its interpreter exits 1 (the context is lost)
//	"agent:N:LINE" makes N agent calls, one after the other, each with the request LINE as a
//	               run's code would write it on its agent channel (answered as the real
//	               drivers do, driver.AnswerAgentCall); result: the array of the answers
//	"rich:JSON"    completes with the display and outputs of JSON, a runner's report (read as the
//	               real drivers do, pyrunner.DecodeRich)
//	anything else  completes at once, echoing the code to stdout, result 42 — in a code context
//	               (driver.Contexter), the number of runs its interpreter has run, this one included
//
// Its sandboxes are in memory, on a "host" that the drivers of Reopen share: a driver reopened
// after a restart finds them. It passes the lifecycle part of the conformance suite (package
// drivertest).
package fakedriver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Driver is the fake. The zero value is not usable: use New.
type Driver struct {
	*host
	CreateHook func(ctx context.Context, id string) error // optional: runs inside Create
	// SetNetworkErr, when set, is what SetNetwork returns (a sandbox that cannot take a policy).
	SetNetworkErr error
	Destroyed     []string
	killed        []string
	running       int           // runs inside Exec
	ended         int           // runs that Exec has returned
	stubborn      chan struct{} // closed by ReleaseStubborn
}

// host is where a fake's sandboxes are: the drivers of one host share it (Reopen).
type host struct {
	mu        sync.Mutex // guards the host and the fields of every Driver on it
	sandboxes map[string]driver.Spec
	contexts  map[string]*fakeContext // by sandbox id + "/" + name
	lost      map[string]string       // sandboxes that ended by themselves (Lose): why
}

// Lose makes sandbox id end by itself, as an evicted pod does: Exec in it says
// *driver.GoneError with reason; it is listed until destroyed.
func (d *Driver) Lose(id, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lost == nil {
		d.lost = map[string]string{}
	}
	d.lost[id] = reason
}

// fakeContext is a code context's interpreter: how many runs it ran (-1: it ended).
type fakeContext struct{ runs int }

// CreateContext starts a context's interpreter (driver.Contexter).
func (d *Driver) CreateContext(ctx context.Context, id, name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.sandboxes[id]; !ok {
		return driver.ErrNotFound
	}
	if d.contexts == nil {
		d.contexts = map[string]*fakeContext{}
	}
	if c := d.contexts[id+"/"+name]; c == nil || c.runs < 0 {
		d.contexts[id+"/"+name] = &fakeContext{}
	}
	return nil
}

// DeleteContext ends a context's interpreter (driver.Contexter).
func (d *Driver) DeleteContext(ctx context.Context, id, name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.sandboxes[id]; !ok {
		return driver.ErrNotFound
	}
	delete(d.contexts, id+"/"+name)
	return nil
}

// contextRun counts a run in context name of sandbox id and returns its number, and why the
// interpreter had to be started afresh ("": it had not).
func (d *Driver) contextRun(id, name string, crash bool) (int, string, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.contexts == nil {
		d.contexts = map[string]*fakeContext{}
	}
	c := d.contexts[id+"/"+name]
	restarted := ""
	if c == nil || c.runs < 0 {
		restarted = "the interpreter had ended"
		c = &fakeContext{}
		d.contexts[id+"/"+name] = c
	}
	c.runs++
	n := c.runs
	if crash {
		c.runs = -1
		return n, restarted, "the interpreter exited with status 1"
	}
	return n, restarted, ""
}

// Kill records that id was killed (driver.Killer); the sandbox stays until Destroy.
func (d *Driver) Kill(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.killed = append(d.killed, id)
	return nil
}

// Killed returns the ids Kill was called with.
func (d *Driver) Killed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.killed...)
}

// New returns an empty fake driver, on a host of its own.
func New() *Driver {
	return &Driver{host: &host{sandboxes: map[string]driver.Spec{}}, stubborn: make(chan struct{})}
}

// Reopen returns a new fake driver on d's host, as a new process of the service on the same
// machine: it has d's sandboxes, none of d's hooks or records.
func (d *Driver) Reopen() *Driver { return &Driver{host: d.host, stubborn: make(chan struct{})} }

// ReleaseStubborn lets every "stubborn" run of d complete, those waiting and those to come.
// Idempotent.
func (d *Driver) ReleaseStubborn() {
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.stubborn:
	default:
		close(d.stubborn)
	}
}

// Ended returns how many runs Exec has answered.
func (d *Driver) Ended() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ended
}

// Running returns how many runs are inside Exec now: a test waits for it to know that the
// service has handed a run to the driver.
func (d *Driver) Running() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.running
}

func (d *Driver) Name() string                    { return "fake" }
func (d *Driver) Check(ctx context.Context) error { return nil }

func (d *Driver) Create(ctx context.Context, id string, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d.CreateHook != nil {
		if err := d.CreateHook(ctx, id); err != nil {
			return err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sandboxes[id] = spec
	return nil
}

func (d *Driver) Exec(ctx context.Context, id string, req driver.ExecRequest) (driver.ExecResult, error) {
	d.mu.Lock()
	_, ok := d.sandboxes[id]
	reason, lost := d.lost[id]
	if ok && !lost {
		d.running++
	}
	d.mu.Unlock()
	if ok && lost {
		return driver.ExecResult{}, &driver.GoneError{ID: id, Reason: reason}
	}
	if !ok {
		return driver.ExecResult{}, driver.ErrNotFound
	}
	defer func() {
		d.mu.Lock()
		d.running--
		d.ended++
		d.mu.Unlock()
	}()
	start := time.Now()
	res := driver.ExecResult{Started: start}
	// wait waits dur for the run to end by itself (an exit 0), or for the timeout or ctx to kill it.
	wait := func(dur time.Duration) driver.Outcome {
		t := time.NewTimer(dur)
		defer t.Stop()
		tc := time.NewTimer(req.Timeout)
		defer tc.Stop()
		select {
		case <-t.C:
			return driver.Outcome{Exited: true}
		case <-tc.C:
			return driver.Outcome{TimedOut: true}
		case <-ctx.Done():
			return driver.Outcome{Cancelled: true}
		}
	}
	end := driver.Outcome{Exited: true}
	switch {
	case req.Code == "block":
		end = wait(24 * time.Hour)
	case strings.HasPrefix(req.Code, "sleep:"):
		ms, _ := strconv.Atoi(strings.TrimPrefix(req.Code, "sleep:"))
		end = wait(time.Duration(ms) * time.Millisecond)
	case req.Code == "stubborn": // a driver slow to stop: ignores ctx and the timeout
		<-d.stubborn
	case strings.HasPrefix(req.Code, "agent:"):
		n, line, _ := strings.Cut(strings.TrimPrefix(req.Code, "agent:"), ":")
		count, _ := strconv.Atoi(n)
		answers := []json.RawMessage{}
		for range count {
			answers = append(answers, driver.AnswerAgentCall(ctx, req, []byte(line)))
		}
		res.Result, _ = json.Marshal(answers)
	case req.Context != "":
		n, restarted, lost := d.contextRun(id, req.Context, req.Code == "crash")
		res.ContextRestarted, res.ContextLost = restarted, lost
		res.Result = json.RawMessage(strconv.Itoa(n))
		if lost != "" {
			end.ExitCode = 1
		}
	case strings.HasPrefix(req.Code, "rich:"): // the rest: a runner's report, its rich part read
		var r pyrunner.Rich
		if err := json.Unmarshal([]byte(strings.TrimPrefix(req.Code, "rich:")), &r); err != nil {
			return driver.ExecResult{}, fmt.Errorf("fake rich report: %w", err)
		}
		res.SetRich(r)
	case req.Code == "fail":
		end.ExitCode = 1
		res.Error = &driver.PyError{Type: "ZeroDivisionError", Message: "division by zero", Traceback: "Traceback ..."}
	default:
		res.Stdout = []byte(req.Code)
		res.Result = json.RawMessage("42")
		if req.OnOutput != nil {
			req.OnOutput(driver.Stdout, res.Stdout)
		}
	}
	driver.Classify(end, &res)
	res.Duration = time.Since(start)
	res.CPU = time.Millisecond
	res.MemoryPeak = 1 << 20
	return res, nil
}

func (d *Driver) Destroy(ctx context.Context, id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.sandboxes[id]; ok {
		d.Destroyed = append(d.Destroyed, id)
	}
	delete(d.sandboxes, id)
	delete(d.lost, id)
	return nil
}

func (d *Driver) List(ctx context.Context) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ids []string
	for id := range d.sandboxes {
		ids = append(ids, id)
	}
	return ids, nil
}

// SetNetwork replaces the policy of sandbox id (driver.NetworkSetter), as Spec reports it.
func (d *Driver) SetNetwork(ctx context.Context, id string, p egress.Policy) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	sp, ok := d.sandboxes[id]
	if !ok {
		return driver.ErrNotFound
	}
	if d.SetNetworkErr != nil {
		return d.SetNetworkErr
	}
	sp.Network = p
	d.sandboxes[id] = sp
	return nil
}

// Spec returns the spec sandbox id was created with (its policy as SetNetwork left it).
func (d *Driver) Spec(id string) (driver.Spec, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	sp, ok := d.sandboxes[id]
	return sp, ok
}

// Live reports whether the fake holds sandbox id.
func (d *Driver) Live(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.sandboxes[id]
	return ok
}

// ErrInjected is what a CreateHook may return to simulate a provisioning failure.
var ErrInjected = errors.New("injected failure")
