package client_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
)

// A sandbox with a read-only input and a read-write output directory: upload, run with live
// output, download, delete.
func Example() {
	ctx := context.Background()
	c := client.New("", "") // $SANDBOXD_URL, $AGENTCOP_API_KEY or $SANDBOXD_API_KEY
	sb, err := c.Create(ctx, api.CreateSandboxRequest{AgentID: "report-bot", Config: &api.Config{
		Filesystem: &api.Filesystem{ReadOnly: []string{"/workspace/data"}, ReadWrite: []string{"/workspace/out"}},
		Resources:  &api.Resources{Memory: "512m", Timeout: client.Int(300)},
	}})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Delete(ctx, sb.SandboxID)
	if sb.Status != "ready" {
		if _, err := c.WaitReady(ctx, sb.SandboxID); err != nil {
			log.Fatal(err)
		}
	}
	csv := "region,amount\nnorth,120\nsouth,80\n"
	if _, err := c.PutFile(ctx, sb.SandboxID, "/workspace/data/sales.csv", strings.NewReader(csv), int64(len(csv))); err != nil {
		log.Fatal(err)
	}
	acc, err := c.RunAsync(ctx, sb.SandboxID, api.RunRequest{Code: client.Code(
		"rows = open('/workspace/data/sales.csv').read().splitlines()[1:]\n" +
			"print(len(rows), 'rows')\n" +
			"open('/workspace/out/total.txt', 'w').write(str(sum(int(r.split(',')[1]) for r in rows)))")})
	if err != nil {
		log.Fatal(err)
	}
	run, err := c.Follow(ctx, sb.SandboxID, acc.RunID, func(stream, text string) error {
		_, err := fmt.Fprint(os.Stdout, text) // as the code writes it
		return err
	})
	if err != nil || run.Status != "completed" {
		log.Fatal(run.Status, err)
	}
	if _, _, err := c.Download(ctx, sb.SandboxID, "/workspace/out/total.txt", os.Stdout); err != nil {
		log.Fatal(err) // a *client.ChecksumError if the bytes differ from the ETag's SHA-256
	}
	if client.IsCode(err, client.CodeNotFound) {
		log.Fatal("no such sandbox")
	}
}
