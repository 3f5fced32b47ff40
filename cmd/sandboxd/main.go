// Command sandboxd serves the Sandbox API and runs the sandboxes.
//
//	sandboxd serve --listen 127.0.0.1:8080 --data-dir data --image NAME=ROOTFS
//	sandboxd keys create --data-dir data --account NAME --plan free|pro|enterprise
//	sandboxd images import|pull|ls|rm …   the approved OCI images (images.go)
//	sandboxd bench [-n N] [--image NAME=ROOTFS] [--wasm-image NAME=DIR] [--runtime R] …
//	sandboxd doctor [--json] [serve flags]   checks this host for serve
//	sandboxd cluster-image --out DIR   the image of the API replicas and the sandbox pods' agent, an OCI layout to push
//	sandboxd create|ls|get|run|logs|cp|rm|mcp …   (clients of a running server: see client.go)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/driver/kubernetes"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
)

const usage = `usage:
  sandboxd serve [--listen ADDR] [--data-dir DIR] [--store postgres://…] [--advertise URL] --image NAME=ROOTFS [--runtime crun|runc|runsc] [--runsc PATH] [--config FILE]
                 [--agent-bin PATH] [--warm-pool N] [--stop-grace DURATION] [--wasm-image NAME=DIR]
                 [--wasm-build NAME=COMMAND] [--driver container|kubernetes] [--kubeconfig PATH] [--namespace NS]
                 [--agent-image REF] [--cpu-request SHARE] [--ids-slot K/N]   (sandboxd serve -h says what each does)
  sandboxd keys create [--data-dir DIR] [--store postgres://…] --account NAME [--plan free|pro|enterprise]
  sandboxd images import FILE|DIR --name NAME [--runtime crun|runc|runsc] [--data-dir DIR]   a 'docker save' archive or an OCI layout
  sandboxd images pull REF [--name NAME] [--runtime crun|runc|runsc] [--data-dir DIR] · images ls [--json] · images rm NAME
  sandboxd bench [-n N] [--idle N] [--throughput-for DURATION] [--json] [--cpu-only] [--image NAME=ROOTFS]
                 [--wasm-image NAME=DIR] [--runtime crun|runc] [--runsc PATH] [--runsc-n N]   starts its own server; prints figures
  sandboxd cluster-image --out DIR [--agent-bin PATH] [--server-bin PATH]   writes the cluster image: sandboxd and the pods' agent (an OCI layout to push); prints its digest
  sandboxd doctor [--json] [--data-dir DIR] [--config FILE] [serve flags]   checks this host: ok / missing (exit 1) / warn, with fixes
client commands (a running server: --url or SANDBOXD_URL, --key or SANDBOXD_API_KEY; --json for the API's JSON):
  sandboxd create [--agent-id ID --mode M --image I --ro PATH --rw PATH --blocked PATH --allow HOST
                   --cpu N --memory SIZE --timeout S --allow-spawn | --config FILE.json]   prints the ID
  sandboxd ls [ID:/DIR] · sandboxd get ID · sandboxd rm ID|ID:/PATH...
  sandboxd run ID [CODE | --file F | -] [--timeout S] [--env K=V] [--context CTX] [--detach] · sandboxd logs ID RUN_ID
  sandboxd context create ID · sandboxd context ls ID · sandboxd context rm ID CTX...   code contexts (state across runs)
  sandboxd cp LOCAL ID:/PATH · sandboxd cp ID:/PATH LOCAL
  sandboxd mcp   an MCP server on stdin/stdout (tools: create_sandbox, run_code, read_file, write_file, …) for an MCP client
`

var version = "dev"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	log := newLogger() // the one logger of serve and bench: the service's, the drivers', the API's
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:], log)
	case "keys":
		err = keys(os.Args[2:])
	case "images":
		err = images(os.Args[2:], os.Stdout)
	case "bench":
		err = bench(os.Args[2:], log)
	case "doctor":
		err = doctorCmd(os.Args[2:])
	case "cluster-image":
		err = clusterImage(os.Args[2:], os.Stdout)
	case protocol.WorkerCommand: // hidden: a worker process of the wasm driver (see wasmworker.go)
		wasmWorker(os.Args[2:])
	case "create", "ls", "get", "run", "logs", "cp", "rm", "context", "mcp":
		os.Exit(clientMain(os.Args[1], os.Args[2:]))
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if errors.As(err, new(errNotReady)) {
		os.Exit(1)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandboxd: %v\n", err)
		os.Exit(1)
	}
}

func keys(args []string) error {
	if len(args) < 1 || args[0] != "create" {
		return fmt.Errorf("keys: want 'keys create --account NAME --plan PLAN'\n%s", usage)
	}
	fs := flag.NewFlagSet("keys create", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "data", "the server's data directory")
	storeURL := fs.String("store", "", config.StoreUsage)
	account := fs.String("account", "", "account name (created if missing)")
	plan := fs.String("plan", "free", "plan of a new account: free, pro or enterprise")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *account == "" {
		return errors.New("keys create: --account is required")
	}
	ctx := context.Background()
	st, err := openStore(ctx, *dataDir, *storeURL)
	if err != nil {
		return err
	}
	defer st.Close()
	key, acct, created, err := createKey(ctx, st, *account, *plan)
	if err != nil {
		return err
	}
	switch {
	case created:
		fmt.Fprintf(os.Stderr, "created account %s on plan %s\n", acct.Name, acct.Plan)
	case acct.Plan != *plan:
		fmt.Fprintf(os.Stderr, "account %s exists and stays on plan %s\n", acct.Name, acct.Plan)
	}
	fmt.Println(key)
	return nil
}

// newLogger returns the logger main hands down: text records on stderr, level info.
func newLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// clusterImage is "sandboxd cluster-image": it writes the cluster image (kubernetes.WriteImage:
// the static sandbox-agent and this sandboxd, its entrypoint) as an OCI layout in --out, and
// prints its digest: push the layout to the cluster's registry and pass REPO@DIGEST as
// --agent-image, and as the image of deploy/kubernetes/sandboxd.yaml.
func clusterImage(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("cluster-image", flag.ContinueOnError)
	dir := fs.String("out", "", "directory to write the OCI layout in (created; must not exist or be empty)")
	agentBin := fs.String("agent-bin", "", "path of the sandbox-agent binary (default: next to sandboxd)")
	serverBin := fs.String("server-bin", "", "path of the sandboxd binary (default: this one)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() > 0 {
		return errors.New("cluster-image: want 'cluster-image --out DIR [--agent-bin PATH] [--server-bin PATH]'")
	}
	if ents, err := os.ReadDir(*dir); err == nil && len(ents) > 0 {
		return fmt.Errorf("cluster-image: %s is not empty: name a new directory", *dir)
	}
	server := *serverBin
	if server == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("cluster-image: %w", err)
		}
		server = exe
	}
	bin := *agentBin
	if bin == "" {
		bin = filepath.Join(filepath.Dir(server), "sandbox-agent")
	}
	if err := config.CheckAgentBin(bin); err != nil {
		return fmt.Errorf("cluster-image: %w (--agent-bin names it)", err)
	}
	if _, err := os.Stat(server); err != nil {
		return fmt.Errorf("cluster-image: sandboxd binary: %w (--server-bin names it)", err)
	}
	h, err := kubernetes.WriteImage(*dir, bin, server)
	if err != nil {
		return fmt.Errorf("cluster-image: %w", err)
	}
	fmt.Fprintln(out, h.String())
	return nil
}
