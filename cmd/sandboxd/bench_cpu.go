package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"syscall"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

// forkFloorCode measures, inside a sandbox that may fork, what one fork + print + exit of an
// already-started Python costs in CPU (the parent's fork and wait, the child's whole life): the
// floor of any design that forks a process per run. Its result is the samples, in µs.
const forkFloorCode = `import os, resource
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
out = []
for _ in range(%d):
    s, c = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        print(1)
        os._exit(0)
    os.waitpid(pid, 0)
    out.append(int(((cpu(resource.RUSAGE_SELF) - s) + (cpu(resource.RUSAGE_CHILDREN) - c)) * 1e6))
result = out
`

// benchRunCPU measures fresh print(1) runs made the way an agent makes them — back to back, in a
// sandbox just created:
//   - their latency over HTTP, the first ten runs of a new sandbox against the same sandbox's runs
//     once it has idled 2 s;
//   - the machine's CPU time per run, every process's share: this process (the server, and the
//     client's side of HTTP, which is a fraction of a millisecond) plus the sandbox's cgroup
//     (the agent, the zygote, the run) — against the fork floor (forkFloorCode), measured in a
//     sandbox of the same image in the same bench;
//   - the same CPU for print(1) runs in one code context of a sandbox (no fork per run: the
//     path that can go below the floor), back to back after its first run;
//   - the runs per second one client gets back to back, fresh and in a context (figures with no
//     baseline of their own: their inverse is the latency row).
//
// cpuOf returns a sandbox's CPU time so far (its cgroup's).
func benchRunCPU(c *benchClient, rep *report, cpuOf func(id string) (time.Duration, error), n int, settle func()) error {
	// The fork floor, in a sandbox allowed to fork.
	settle()
	spawn := maps.Clone(benchConfig)
	spawn["process"] = map[string]any{"allow_spawn": true}
	id, err := c.create(spawn)
	if err != nil {
		return err
	}
	var us []int64
	if _, err := c.runCode(id, "print(1)", "1\n"); err == nil { // its warm-up
		err = c.runResult(id, fmt.Sprintf(forkFloorCode, max(n, 20)), &us)
	}
	if derr := c.delete(id); err == nil {
		err = derr
	}
	if err != nil {
		return fmt.Errorf("fork floor: %w", err)
	}
	floor := figure{Name: "baseline: fork+print+exit of a Python (CPU)"}
	for _, v := range us {
		floor.Samples = append(floor.Samples, time.Duration(v)*time.Microsecond)
	}

	// Fresh sandboxes, ten runs each at once, then runs after 2 s of idling.
	var first, idle, cpu, idleCPU, srv, idleSrv []time.Duration
	var busy time.Duration // wall time of the back-to-back runs
	for len(first) < min(max(n, 10), 50) {
		settle()
		id, err := c.create(benchConfig)
		if err != nil {
			return err
		}
		for i := 0; i < 10 && err == nil; i++ {
			var d, used, server time.Duration
			if used, server, d, err = runCPU(c, id, "", cpuOf); err == nil {
				first, cpu, srv, busy = append(first, d), append(cpu, used), append(srv, server), busy+d
			}
		}
		for i := 0; i < 2 && err == nil; i++ {
			settle()                    // the warm pool's refill, which waits for the sandbox to go quiet
			time.Sleep(2 * time.Second) // what is measured: a sandbox that has idled
			var d, used, server time.Duration
			if used, server, d, err = runCPU(c, id, "", cpuOf); err == nil {
				idle, idleCPU, idleSrv = append(idle, d), append(idleCPU, used), append(idleSrv, server)
			}
		}
		if derr := c.delete(id); err == nil {
			err = derr
		}
		if err != nil {
			return err
		}
	}
	// One code context, n runs back to back after its first.
	settle()
	id, err = c.create(benchConfig)
	if err != nil {
		return err
	}
	var ctxCPU, ctxSrv []time.Duration
	var ctxBusy time.Duration
	cc, err := c.createContext(id)
	if err == nil {
		_, err = c.runIn(id, cc) // its first run
	}
	for i := 0; i < max(n, 20) && err == nil; i++ {
		var d, used, server time.Duration
		if used, server, d, err = runCPU(c, id, cc, cpuOf); err == nil {
			ctxCPU, ctxSrv, ctxBusy = append(ctxCPU, used), append(ctxSrv, server), ctxBusy+d
		}
	}
	if derr := c.delete(id); err == nil {
		err = derr
	}
	if err != nil {
		return fmt.Errorf("context runs: %w", err)
	}

	rep.add(floor, nil, "")
	rep.add(figure{Name: "fresh run print(1): machine CPU per run", Samples: cpu}, &floor, "p50 ≤ 1.3x")
	rep.add(figure{Name: "  of which sandboxd's", Samples: srv}, &floor, "")
	rep.add(figure{Name: "  the same after 2 s idle", Samples: idleCPU}, &floor, "")
	rep.add(figure{Name: "  of which sandboxd's", Samples: idleSrv}, &floor, "")
	rep.add(figure{Name: "context run print(1): machine CPU per run", Samples: ctxCPU}, &floor, "p50 ≤ 0.1x")
	rep.add(figure{Name: "  of which sandboxd's", Samples: ctxSrv}, &floor, "")
	idleFig := figure{Name: "baseline: run print(1) after 2 s idle", Samples: idle}
	rep.add(idleFig, nil, "")
	rep.add(figure{Name: "run print(1), first 10 of a new sandbox", Samples: first}, &idleFig, "p50 ≤ 1.1x")
	rep.Values = append(rep.Values,
		value{Name: "fresh runs/s back to back, 1 client", Value: float64(len(first)) / busy.Seconds(), Unit: "runs/s"},
		value{Name: "context runs/s back to back, 1 client", Value: float64(len(ctxCPU)) / ctxBusy.Seconds(), Unit: "runs/s"})
	return nil
}

// runCPU runs print(1) in sandbox id (in its code context cc, or fresh if "") and returns the CPU
// time it cost this process and the sandbox, this process's share of it (sandboxd's, with the
// client's side of HTTP), and the request's latency.
func runCPU(c *benchClient, id, cc string, cpuOf func(string) (time.Duration, error)) (used, server, d time.Duration, err error) {
	s0, err := cpuOf(id)
	if err != nil {
		return 0, 0, 0, err
	}
	p0 := selfCPU()
	if d, err = c.runIn(id, cc); err != nil {
		return 0, 0, 0, err
	}
	p1 := selfCPU()
	s1, err := cpuOf(id)
	if err != nil {
		return 0, 0, 0, err
	}
	return (p1 - p0) + (s1 - s0), p1 - p0, d, nil
}

// selfCPU is this process's CPU time so far (user + system, every thread).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runResult runs code synchronously in sandbox id; the run must complete, and its result is
// decoded into out.
func (c *benchClient) runResult(id, code string, out any) error {
	timeout := 120
	r, err := c.cl.Run(context.Background(), id, api.RunRequest{Code: &code, Timeout: &timeout})
	if err != nil {
		return err
	}
	if r.Status != "completed" {
		return fmt.Errorf("run: %s %s", r.Status, r.Stderr)
	}
	if len(r.Result) == 0 {
		return errors.New("run: no result")
	}
	return json.Unmarshal(r.Result, out)
}
