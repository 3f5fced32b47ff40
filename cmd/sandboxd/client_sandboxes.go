package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
)

// create: sandboxd create [flags] → prints the new sandbox's ID once it is ready.
func (c *cli) create(args []string) error {
	fs := c.fs
	agentID := fs.String("agent-id", "", "the agent the sandbox is for (default: the config file's, else \"cli\")")
	mode := fs.String("mode", "", "container (default) or wasm")
	image := fs.String("image", "", "approved image (default: the server's default for the mode)")
	var ro, rw, blocked, allow cliStrings
	fs.Var(&ro, "ro", "path mounted read-only (repeatable)")
	fs.Var(&rw, "rw", "path mounted read-write (repeatable)")
	fs.Var(&blocked, "blocked", "path made inaccessible (repeatable)")
	fs.Var(&allow, "allow", "host the sandbox may reach: name, *.wildcard, IP or CIDR, optionally :port (repeatable)")
	blockOutbound := fs.Bool("block-outbound", true, "deny all egress but --allow (false: unrestricted but for the always-denied set)")
	cpu := fs.String("cpu", "", `CPU cores, e.g. "0.5" (default 1)`)
	memory := fs.String("memory", "", "memory limit, e.g. 512m, 1g (default 512m)")
	timeout := fs.Int("timeout", 0, "seconds until the sandbox is destroyed, 1-3600 (default 1800)")
	allowSpawn := fs.Bool("allow-spawn", false, "let run code start subprocesses")
	configFile := fs.String("config", "", "JSON file: a create request ({agent_id, mode, config}) or just its config; flags override it")
	noWait := fs.Bool("no-wait", false, "print the ID at once, even while the sandbox is still provisioning")
	if _, err := c.parse(args, 0, 0); err != nil {
		return err
	}
	req := api.CreateSandboxRequest{}
	if *configFile != "" {
		var err error
		if req, err = cliReadCreateFile(*configFile); err != nil {
			return err
		}
	}
	if req.Config == nil {
		req.Config = &api.Config{}
	}
	cfg := req.Config
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["agent-id"] || req.AgentID == "" {
		req.AgentID = *agentID
		if req.AgentID == "" {
			req.AgentID = "cli"
		}
	}
	if set["mode"] {
		req.Mode = *mode
	}
	if set["image"] {
		cfg.Image = *image
	}
	if set["ro"] || set["rw"] || set["blocked"] {
		if cfg.Filesystem == nil {
			cfg.Filesystem = &api.Filesystem{}
		}
		if set["ro"] {
			cfg.Filesystem.ReadOnly = ro
		}
		if set["rw"] {
			cfg.Filesystem.ReadWrite = rw
		}
		if set["blocked"] {
			cfg.Filesystem.Blocked = blocked
		}
	}
	if set["allow"] || set["block-outbound"] {
		if cfg.Network == nil {
			cfg.Network = &api.Network{}
		}
		if set["allow"] {
			cfg.Network.Allow = allow
		}
		if set["block-outbound"] {
			cfg.Network.BlockOutbound = client.Bool(*blockOutbound)
		}
	}
	if set["cpu"] || set["memory"] || set["timeout"] {
		if cfg.Resources == nil {
			cfg.Resources = &api.Resources{}
		}
		if set["cpu"] {
			cfg.Resources.CPU = *cpu
		}
		if set["memory"] {
			cfg.Resources.Memory = *memory
		}
		if set["timeout"] {
			cfg.Resources.Timeout = client.Int(*timeout)
		}
	}
	if set["allow-spawn"] {
		cfg.Process = &api.Process{AllowSpawn: client.Bool(*allowSpawn)}
	}
	if *cfg == (api.Config{}) {
		req.Config = nil
	}
	ctx, cancel := c.ctx()
	defer cancel()
	resp, err := c.c.Create(ctx, req)
	if err != nil {
		return err
	}
	if resp.Status == "provisioning" && !*noWait {
		sb, err := c.c.WaitReady(ctx, resp.SandboxID)
		if err != nil {
			return fmt.Errorf("sandbox %s: %w", resp.SandboxID, err)
		}
		resp.Status = sb.Status
	}
	if c.json {
		return c.printJSON(resp)
	}
	fmt.Fprintln(c.stdout, resp.SandboxID)
	return nil
}

// cliReadCreateFile reads --config: a whole create request, or only its "config" object.
func cliReadCreateFile(name string) (api.CreateSandboxRequest, error) {
	var req api.CreateSandboxRequest
	b, err := os.ReadFile(name)
	if err != nil {
		return req, err
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return req, fmt.Errorf("--config %s: not a JSON object: %v", name, err)
	}
	whole := len(top) > 0
	for k := range top {
		whole = whole && (k == "agent_id" || k == "mode" || k == "config")
	}
	var target any = &req
	if !whole {
		req.Config = &api.Config{}
		target = req.Config
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(target); err != nil {
		return req, fmt.Errorf("--config %s: %v (want {agent_id, mode, config} or the config alone: {image, filesystem, network, resources, process})", name, err)
	}
	return req, nil
}

// ls: sandboxd ls → the caller's sandboxes; sandboxd ls ID:/DIR → a directory of a sandbox.
func (c *cli) ls(args []string) error {
	status := c.fs.String("status", "", "only sandboxes with this status (provisioning, ready, running, destroyed, error)")
	agentID := c.fs.String("agent-id", "", "only the sandboxes of this agent")
	limit := c.fs.Int("limit", 50, "sandboxes per page (1-500)")
	all := c.fs.Bool("all", false, "every page, not only the first")
	pos, err := c.parse(args, 0, 1)
	if err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	if len(pos) == 1 {
		id, dir, ok := cliSplitRemote(pos[0])
		if !ok {
			return cliUsagef("%q is not ID:/DIR", pos[0])
		}
		files, err := c.c.ListFiles(ctx, id, dir)
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(files)
		}
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TYPE\tSIZE\tMODIFIED\tNAME")
		for _, e := range files.Entries {
			name := e.Name
			if e.Type == "dir" {
				name += "/"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", e.Type, e.Size, e.ModifiedAt.UTC().Format(time.RFC3339), name)
		}
		return tw.Flush()
	}
	opts := client.ListOptions{Status: *status, AgentID: *agentID, Limit: *limit, Page: 1}
	var out api.SandboxList
	for {
		page, err := c.c.List(ctx, opts)
		if err != nil {
			return err
		}
		out.Sandboxes = append(out.Sandboxes, page.Sandboxes...)
		out.Total, out.Page = page.Total, 1
		if !*all || len(page.Sandboxes) == 0 || len(out.Sandboxes) >= page.Total {
			break
		}
		opts.Page++
	}
	if c.json {
		return c.printJSON(out)
	}
	now := time.Now()
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SANDBOX ID\tAGENT\tSTATUS\tMODE\tRUNS\tCREATED\tEXPIRES")
	for _, sb := range out.Sandboxes {
		expires := "in " + cliAgo(sb.ExpiresAt.Sub(now))
		if sb.Status == "destroyed" || sb.Status == "error" {
			expires = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s ago\t%s\n", sb.SandboxID, sb.AgentID, sb.Status, sb.Mode,
			sb.Runs.Total, cliAgo(now.Sub(sb.CreatedAt)), expires)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(out.Sandboxes) < out.Total {
		fmt.Fprintf(c.stderr, "(%d of %d shown: --all lists every one)\n", len(out.Sandboxes), out.Total)
	}
	return nil
}

// cliAgo formats a duration the way people read it: 45s, 12m, 3h, 2d.
func cliAgo(d time.Duration) string {
	switch {
	case d < 0:
		d = 0
		fallthrough
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// get: sandboxd get ID → the sandbox's record.
func (c *cli) get(args []string) error {
	pos, err := c.parse(args, 1, 1)
	if err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	sb, err := c.c.Get(ctx, pos[0])
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(sb)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	row := func(k, format string, v ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, v...)...) }
	ts := func(t *time.Time) string {
		if t == nil {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	row("sandbox_id", "%s", sb.SandboxID)
	row("agent_id", "%s", sb.AgentID)
	row("status", "%s", sb.Status)
	row("mode", "%s", sb.Mode)
	var cfg api.Config
	if json.Unmarshal(sb.Config, &cfg) == nil {
		row("image", "%s", cfg.Image)
		if fs := cfg.Filesystem; fs != nil {
			row("read_only", "%s", cliList(fs.ReadOnly))
			row("read_write", "%s", cliList(fs.ReadWrite))
			row("blocked", "%s", cliList(fs.Blocked))
		}
		if n := cfg.Network; n != nil {
			bo := "true"
			if n.BlockOutbound != nil && !*n.BlockOutbound {
				bo = "false"
			}
			row("network", "allow %s, block_outbound %s", cliList(n.Allow), bo)
		}
		if r := cfg.Resources; r != nil {
			t := "-"
			if r.Timeout != nil {
				t = fmt.Sprintf("%ds", *r.Timeout)
			}
			row("resources", "cpu %s, memory %s, timeout %s", r.CPU, r.Memory, t)
		}
		if p := cfg.Process; p != nil && p.AllowSpawn != nil {
			row("allow_spawn", "%v", *p.AllowSpawn)
		}
	}
	row("created_at", "%s", ts(&sb.CreatedAt))
	row("ready_at", "%s", ts(sb.ReadyAt))
	row("expires_at", "%s", ts(&sb.ExpiresAt))
	if sb.DestroyedAt != nil {
		reason := ""
		if sb.DestroyReason != nil {
			reason = " (" + *sb.DestroyReason + ")"
		}
		row("destroyed_at", "%s%s", ts(sb.DestroyedAt), reason)
	}
	if len(sb.Error) > 0 && string(sb.Error) != "null" {
		row("error", "%s", sb.Error)
	}
	row("runs", "%d (%d active)", sb.Runs.Total, sb.Runs.Active)
	row("usage", "%.2f cpu-seconds, memory peak %d bytes, %d billed minutes", sb.Usage.CPUSeconds, sb.Usage.MemoryPeakBytes, sb.Usage.BilledMinutes)
	return tw.Flush()
}

func cliList(v []string) string {
	if len(v) == 0 {
		return "-"
	}
	return strings.Join(v, " ")
}

// rm: sandboxd rm ID|ID:/PATH... → destroys sandboxes, deletes files. It goes on after a failure
// and exits 1 if any failed.
func (c *cli) rm(args []string) error {
	pos, err := c.parse(args, 1, -1)
	if err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	for _, p := range pos {
		if _, _, ok := cliSplitRemote(p); !ok && strings.ContainsAny(p, ":/") {
			return cliUsagef("%q is neither a sandbox ID nor ID:/PATH", p)
		}
	}
	failed := false
	for _, p := range pos {
		var err error
		if id, path, ok := cliSplitRemote(p); ok {
			err = c.c.DeleteFile(ctx, id, path)
		} else {
			err = c.c.Delete(ctx, p)
		}
		if err != nil {
			fmt.Fprintf(c.stderr, "sandboxd rm: %s: %s\n", p, cliExplain(err, c.url))
			failed = true
			continue
		}
		if !c.json {
			fmt.Fprintln(c.stdout, p)
		}
	}
	if failed {
		return cliExitStatus(1)
	}
	return nil
}
