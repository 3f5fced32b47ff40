package main

import (
	"context"
	"os"
	"os/signal"
	"slices"
	"syscall"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/doctor"
)

// errNotReady makes sandboxd exit with status 1 without another message: the report said why.
type errNotReady struct{}

func (errNotReady) Error() string { return "" }

// doctorCmd checks this host for serve with serve's own flags (--data-dir, --config, --runtime,
// --image, …; see config.ParseDoctor), plus --json. It prints one line per requirement and exits
// with status 1 when one is missing.
func doctorCmd(args []string) error {
	asJSON := slices.Contains(args, "--json") || slices.Contains(args, "-json")
	args = slices.DeleteFunc(slices.Clone(args), func(a string) bool { return a == "--json" || a == "-json" })
	cfg, err := config.ParseDoctor(args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep := doctor.Run(ctx, doctor.System(), cfg)
	if err := rep.Print(os.Stdout, asJSON); err != nil {
		return err
	}
	if !rep.OK {
		return errNotReady{}
	}
	return nil
}
