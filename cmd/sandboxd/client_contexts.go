package main

import (
	"fmt"
	"text/tabwriter"
)

// contextCmd: sandboxd context create ID | ls ID | rm ID CTX... — a sandbox's code contexts
// (long-lived interpreters that `sandboxd run --context CTX` runs in).
func (c *cli) contextCmd(args []string) error {
	pos, err := c.parse(args, 2, -1)
	if err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	switch action, id := pos[0], pos[1]; {
	case action == "create" && len(pos) == 2:
		cx, err := c.c.CreateContext(ctx, id)
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(cx)
		}
		fmt.Fprintln(c.stdout, cx.ContextID)
		return nil
	case action == "ls" && len(pos) == 2:
		l, err := c.c.ListContexts(ctx, id)
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(l)
		}
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CONTEXT\tSTATUS\tRUNS\tCREATED\tREASON")
		for _, x := range l.Contexts {
			reason := ""
			if x.ResetReason != nil {
				reason = *x.ResetReason
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", x.ContextID, x.Status, x.Runs, x.CreatedAt.Format("2006-01-02 15:04:05"), reason)
		}
		return tw.Flush()
	case action == "rm" && len(pos) >= 3:
		for _, cx := range pos[2:] {
			if err := c.c.DeleteContext(ctx, id, cx); err != nil {
				return err
			}
			if !c.json {
				fmt.Fprintln(c.stdout, cx)
			}
		}
		return nil
	}
	return cliUsagef("want: %s", clientUsage["context"])
}
