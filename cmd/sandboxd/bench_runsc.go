package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/container"
	"github.com/sandboxd/sandboxd/internal/egress"
)

// benchRuntimes measures gVisor's runsc beside crun (or the detected runtime) at the container
// driver, with a sandbox spec like the service's (1 CPU, 256 MiB, 64 processes, egress blocked):
// create -> ready and warm (Warm: crun's zygote; runsc has none), and the first print(1) run of the
// sandbox, n samples each, interleaved between the
// two runtimes so that both see the same machine. The figures leave out the HTTP API, the same for
// both.
func benchRuntimes(ctx context.Context, rep *report, tmp, rootfs, agentBin, runscBin string, n int, log *slog.Logger) error {
	type rt struct {
		d       *container.Driver
		create  []time.Duration
		run     []time.Duration
		workDir string
	}
	var rts []*rt
	for _, name := range []string{"", "runsc"} {
		dir := filepath.Join(tmp, "rt"+name)
		dd, err := driver.Open(container.Name, driver.Options{StateDir: dir, AgentBin: agentBin, Runtime: name, RunscBin: runscBin,
			Logger: log.With("driver", "container")})
		if err != nil {
			return fmt.Errorf("bench runsc: %w", err)
		}
		d := dd.(*container.Driver)
		defer d.Close()
		rts = append(rts, &rt{d: d, workDir: dir})
	}
	// Host ids from the top of the sandbox range, away from the server's allocator (which starts
	// at the bottom); one sandbox per runtime at a time.
	for i := range n {
		for k, r := range rts {
			ids := driver.HelperIDs - uint32(k+1)*driver.IDsPerSandbox
			base := filepath.Join(r.workDir, fmt.Sprintf("s%d", i))
			spec := driver.Spec{RootFS: rootfs, CPU: 1, MemoryBytes: 256 << 20, PidsLimit: 64, HostIDs: ids,
				TmpDir: filepath.Join(base, "tmp"), WorkDir: filepath.Join(base, "work"), Network: egress.Policy{BlockOutbound: true}}
			for _, p := range []string{spec.TmpDir, spec.WorkDir} {
				if err := os.MkdirAll(p, 0o711); err != nil {
					return err
				}
			}
			if err := os.Chmod(base, 0o711); err != nil {
				return err
			}
			id := fmt.Sprintf("bench-%s-%d", r.d.Runtime(), i)
			t0 := time.Now()
			err := r.d.Create(ctx, id, spec)
			if err == nil {
				err = r.d.Warm(ctx, id)
			}
			var el time.Duration
			if err == nil {
				r.create = append(r.create, time.Since(t0))
				t0 = time.Now()
				var res driver.ExecResult
				res, err = r.d.Exec(ctx, id, driver.ExecRequest{Code: "print(1)", Timeout: 30 * time.Second, MaxOutput: 1 << 10})
				el = time.Since(t0)
				if err == nil && string(res.Stdout) != "1\n" {
					err = fmt.Errorf("print(1) printed %q (%s)", res.Stdout, res.Status)
				}
			}
			// Destroyed whatever failed, a Warm or Exec cut by Ctrl-C (ctx) too: the sandbox's
			// runtime root is in tmp, where no later start looks for leftovers.
			if derr := r.d.Destroy(context.WithoutCancel(ctx), id); err == nil {
				err = derr
			}
			if err != nil {
				return fmt.Errorf("bench %s: %w", r.d.Runtime(), err)
			}
			r.run = append(r.run, el)
			for end := time.Now().Add(10 * time.Second); time.Now().Before(end) && !r.d.Released(id); {
				time.Sleep(time.Millisecond)
			}
			os.RemoveAll(base)
		}
	}
	crun, runsc := rts[0], rts[1]
	baseCreate := figure{Name: fmt.Sprintf("driver create -> ready+warm (%s)", crun.d.Runtime()), Samples: crun.create}
	baseRun := figure{Name: fmt.Sprintf("driver first run print(1) (%s)", crun.d.Runtime()), Samples: crun.run}
	rep.add(baseCreate, nil, "")
	rep.add(figure{Name: "driver create -> ready+warm (runsc, gVisor)", Samples: runsc.create}, &baseCreate, "")
	rep.add(baseRun, nil, "")
	rep.add(figure{Name: "driver first run print(1) (runsc, gVisor)", Samples: runsc.run}, &baseRun, "")
	return nil
}
