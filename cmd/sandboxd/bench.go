package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/container"
)

// bench measures the API's latencies next to the floor: a plain `crun run` of python3 on the same
// image, measured in the same run, interleaved with the API's calls so that load hits both alike.
func bench(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	n := fs.Int("n", 30, "iterations")
	url := fs.String("url", "", "benchmark a running server at this URL instead of starting one")
	key := fs.String("key", "", "API key for --url (pro or enterprise plan)")
	var serveArgs []string
	fs.Func("image", "approved image NAME=ROOTFS (also the floor's rootfs)", func(v string) error {
		serveArgs = append(serveArgs, "--image", v)
		return nil
	})
	runtimeName := fs.String("runtime", "", "OCI runtime: crun or runc (default: detect)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *runtimeName != "" {
		serveArgs = append(serveArgs, "--runtime", *runtimeName)
	}
	if err := container.EnterMountNamespace(); err != nil { // re-executes: before any side effect
		return err
	}
	tmp, err := os.MkdirTemp("", "sandboxd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	cfg, err := config.ParseServe(append(serveArgs, "--data-dir", tmp, "--listen", "127.0.0.1:0"))
	if err != nil {
		return err
	}
	cfg.RatePerSec, cfg.RateBurst = 1e6, 1e6
	ctx := context.Background()
	drvAny, err := driver.Open("container", driver.Options{StateDir: tmp + "/floor", AgentBin: cfg.AgentBin, Runtime: cfg.Runtime})
	if err != nil {
		return err
	}
	floorDrv, ok := drvAny.(*container.Driver)
	if !ok {
		return errors.New("bench: the container driver has no floor measurement")
	}
	defer floorDrv.Close()
	if *url == "" {
		d, err := start(ctx, cfg, false)
		if err != nil {
			return err
		}
		go d.srv.Serve(d.ln)
		defer d.close(ctx)
		*url = "http://" + d.ln.Addr().String()
		if *key, _, _, err = createKey(ctx, d.st, "bench", "enterprise"); err != nil {
			return err
		}
	}
	c := &benchClient{url: strings.TrimRight(*url, "/"), key: *key}
	rootfs := cfg.Images[0].RootFS

	live, err := c.create()
	if err != nil {
		return err
	}
	defer c.delete(live)
	if _, err := c.run(live); err != nil { // warm-up
		return err
	}
	var floor, netCost, create, run, full []time.Duration
	for i := 0; i < *n; i++ {
		d, err := floorDrv.Floor(ctx, rootfs)
		if err != nil {
			return fmt.Errorf("floor: %w", err)
		}
		floor = append(floor, d)
		if d, err = floorDrv.NetworkCost(ctx); err != nil {
			return err
		}
		netCost = append(netCost, d)

		t0 := time.Now()
		id, err := c.create()
		if err != nil {
			return err
		}
		create = append(create, time.Since(t0))
		if err := c.delete(id); err != nil {
			return err
		}

		if d, err = c.run(live); err != nil {
			return err
		}
		run = append(run, d)

		t0 = time.Now()
		id, err = c.create()
		if err != nil {
			return err
		}
		if _, err := c.run(id); err != nil {
			return err
		}
		if err := c.delete(id); err != nil {
			return err
		}
		full = append(full, time.Since(t0))
	}
	fp50 := pct(floor, 50)
	fmt.Printf("sandboxd bench: %d iterations, runtime %s, image %s\n", *n, floorDrv.Runtime(), rootfs)
	fmt.Printf("%-36s %9s %9s %9s %9s\n", "measure", "p50", "p90", "p99", "p50/floor")
	for _, row := range []struct {
		name string
		d    []time.Duration
	}{
		{"floor: crun run python3 print(1)", floor},
		{"create -> ready", create},
		{"  of which network setup", netCost},
		{"sync run print(1), live sandbox", run},
		{"create + first run + delete", full},
	} {
		fmt.Printf("%-36s %9s %9s %9s %8.2fx\n", row.name, ms(pct(row.d, 50)), ms(pct(row.d, 90)), ms(pct(row.d, 99)),
			float64(pct(row.d, 50))/float64(fp50))
	}
	return nil
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }

type benchClient struct{ url, key string }

func (c *benchClient) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("X-AgentCop-Key", c.key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (c *benchClient) create() (string, error) {
	var r api.CreateSandboxResponse
	err := c.do("POST", "/api/sandbox/create", map[string]any{"agent_id": "bench"}, &r)
	if err == nil && r.Status != "ready" {
		err = fmt.Errorf("create: status %s", r.Status)
	}
	return r.SandboxID, err
}

func (c *benchClient) run(id string) (time.Duration, error) {
	var r api.Run
	t0 := time.Now()
	err := c.do("POST", "/api/sandbox/"+id+"/run", map[string]any{"code": "print(1)"}, &r)
	d := time.Since(t0)
	if err == nil && (r.Status != "completed" || r.Stdout != "1\n") {
		err = fmt.Errorf("run: %s %q %s", r.Status, r.Stdout, r.Stderr)
	}
	return d, err
}

func (c *benchClient) delete(id string) error { return c.do("DELETE", "/api/sandbox/"+id, nil, nil) }
