package main

import (
	"os"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/worker"
)

// wasmWorker runs the hidden `sandboxd wasm-worker` subcommand: one worker process of the wasm
// driver, started by the driver itself (see package wasm/worker). It never returns.
func wasmWorker(args []string) {
	os.Exit(worker.Main(args))
}
