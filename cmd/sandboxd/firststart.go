package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/sandboxd/sandboxd/internal/config"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/imagebuild"
	"github.com/sandboxd/sandboxd/internal/sandbox"
)

// builds are the image builds serve runs in the background (--wasm-build): one per image, each
// with its log in <data-dir>/logs. close stops and waits for them (and their watchers).
type builds struct {
	list    []*imagebuild.Build
	started time.Time
	cancel  context.CancelFunc // ends the watchers' preparing
	wg      sync.WaitGroup
}

// startBuilds starts the build of every image of cfg.Builds and returns cfg.Images with each
// such image given its build. A build succeeds once its directory is a WASM image: the image is
// approved at once (a cached build succeeds in a few milliseconds), then its worker pool is
// prepared on wasm (the driver opened for it) in the background, as serve does for --wasm-image.
func startBuilds(cfg config.Config, wasm driver.Driver, log *slog.Logger) ([]sandbox.Image, *builds) {
	images := append([]sandbox.Image(nil), cfg.Images...)
	ctx, cancel := context.WithCancel(context.Background())
	bs := &builds{cancel: cancel, started: time.Now()}
	for i, b := range cfg.Builds {
		stem := "wasm-build"
		if i > 0 {
			stem += "-" + regexp.MustCompile(`[^A-Za-z0-9._-]+`).ReplaceAllString(b.Image, "_")
		}
		ib := imagebuild.Start(imagebuild.Config{
			Name: b.Image, Command: b.Command, Log: filepath.Join(cfg.DataDir, "logs", stem+".log"),
			Accept: func(_ context.Context, dir string) (string, error) { return config.WasmImage(dir) },
		})
		st := ib.Status()
		log.Info("building wasm image in the background", "image", b.Image, "command", b.Command,
			"log", st.Log, "estimate", ib.Estimate().Round(time.Second).String())
		for j := range images {
			if images[j].Name == b.Image {
				images[j].Build = ib
			}
		}
		bs.list = append(bs.list, ib)
		bs.wg.Add(1)
		go func() { // says how the build ended and prepares the image; ends with close
			defer bs.wg.Done()
			select {
			case <-ib.Done():
			case <-ctx.Done():
				return
			}
			st := ib.Status()
			if st.State != imagebuild.Ready {
				log.Error("wasm image build failed: wasm creates get 503 image_not_ready", "image", b.Image,
					"reason", st.Reason, "log", st.Log)
				return
			}
			log.Info("wasm image ready", "image", b.Image, "dir", st.Dir, "took", st.Took.Round(100*time.Millisecond).String())
			// Compile python.wasm and fill the worker pool now, not at the first create.
			if p, ok := wasm.(interface {
				Prepare(context.Context, string) error
			}); ok {
				if err := p.Prepare(ctx, st.Dir); err != nil && ctx.Err() == nil {
					log.Error("prepare wasm image", "image", b.Image, "err", err)
				}
			}
		}()
	}
	return images, bs
}

// cachedWait is how long after their start settle waits for builds: a cached build prints its
// directory in 0.1 s (a second on a loaded machine).
const cachedWait = time.Second

// settle waits until the builds have ended or cachedWait has passed since they started, so that
// a cached image is ready before the first request (and make run says so), not a moment after
// it. serve calls it just before it listens: the rest of its start runs meanwhile.
func (bs *builds) settle() {
	if bs == nil {
		return
	}
	timeout := time.After(time.Until(bs.started.Add(cachedWait)))
	for _, b := range bs.list {
		select {
		case <-b.Done():
		case <-timeout:
			return
		}
	}
}

// close stops the builds still running (their process groups are killed) and waits for them.
func (bs *builds) close() {
	if bs == nil {
		return
	}
	bs.cancel()
	for _, b := range bs.list {
		b.Close()
	}
	bs.wg.Wait()
}

// processStart is when sandboxd started (near enough: when its package variables were set).
var processStart = time.Now()

// startEnv names the variable that holds when the user's command started (scripts/run.sh sets it
// at the start of make run), as Unix seconds with a fraction (date +%s.%N).
const startEnv = "SANDBOXD_START_TIME"

// logFirstRequest wraps h to log, once, how long after the start the first request was answered:
// after $SANDBOXD_START_TIME when it is set, else after sandboxd's own start.
func logFirstRequest(h http.Handler, log *slog.Logger) http.Handler {
	start, since := processStart, "sandboxd started"
	if v, err := strconv.ParseFloat(os.Getenv(startEnv), 64); err == nil && v > 0 {
		start, since = time.Unix(0, int64(v*1e9)), startEnv
	}
	var once sync.Once
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
		once.Do(func() {
			log.Info("first request served", "after", fmt.Sprintf("%.2fs", time.Since(start).Seconds()),
				"since", since, "request", r.Method+" "+r.URL.Path)
		})
	})
}
