// Package clienttest starts a real sandboxd for the tests of its clients (the Go client, the
// sandboxd CLI, the Python SDK), the way test/e2e does: the built binary (SANDBOXD_BIN, a
// directory holding sandboxd and sandbox-agent) serving the image SANDBOXD_ROOTFS, as root, on a
// free loopback port and a temporary data directory. `make test` provides all of it.
//
// Without root or those variables the tests skip with the reason, except when CI is set: then
// they fail, because CI must run them.
package clienttest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Env names.
const (
	EnvBin    = "SANDBOXD_BIN"
	EnvRootFS = "SANDBOXD_ROOTFS"
)

// Image is the approved image name the server is started with.
const Image = "agentcop/agent-sandbox:latest"

// Require skips t (fails it when CI is set) unless a real sandboxd can be started, and returns
// the binary directory and the image's root filesystem.
func Require(t testing.TB) (binDir, rootfs string) {
	t.Helper()
	binDir, rootfs = os.Getenv(EnvBin), os.Getenv(EnvRootFS)
	var why string
	switch {
	case os.Geteuid() != 0:
		why = "needs root (sandboxd creates containers)"
	case binDir == "" || rootfs == "":
		why = "needs " + EnvBin + " and " + EnvRootFS + " (run make test)"
	}
	if why == "" {
		if _, err := os.Stat(filepath.Join(binDir, "sandboxd")); err != nil {
			why = "no sandboxd binary in " + EnvBin + ": " + err.Error()
		}
	}
	if why != "" {
		Unavailable(t, why)
	}
	return binDir, rootfs
}

// Unavailable skips t with why, or fails it when CI is set.
func Unavailable(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set but this test cannot run: %s", why)
	}
	t.Skip(why)
}

// Server is a running sandboxd.
type Server struct {
	URL     string // http://127.0.0.1:PORT
	Key     string // the API key of the account "default" (plan free) printed on first start
	DataDir string
	Bin     string // path of the sandboxd binary

	cmd  *exec.Cmd
	mu   sync.Mutex
	logs bytes.Buffer
}

// Options tune Start.
type Options struct {
	// Config is written to a file passed as --config (e.g. {"max_upload_bytes": 1048576}).
	Config map[string]any
	// Pool is the egress address pool (a /16 of 10.0.0.0/8); each test package should use its
	// own so that servers of packages tested in parallel never hand out the same addresses.
	Pool string
}

// Start launches sandboxd and waits until it is healthy; t's cleanup stops it (SIGTERM, which
// destroys its sandboxes) and prints its logs when t failed.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	binDir, rootfs := Require(t)
	dir := t.TempDir()
	s := &Server{DataDir: filepath.Join(dir, "data"), Bin: filepath.Join(binDir, "sandboxd")}
	addr := freeAddr(t)
	s.URL = "http://" + addr
	args := []string{"serve", "--listen", addr, "--data-dir", s.DataDir, "--image", Image + "=" + rootfs}
	cfg := map[string]any{}
	for k, v := range opts.Config {
		cfg[k] = v
	}
	if opts.Pool != "" {
		eg, _ := cfg["egress"].(map[string]any)
		if eg == nil {
			eg = map[string]any{}
		}
		eg["pool"] = opts.Pool
		cfg["egress"] = eg
	}
	if len(cfg) > 0 {
		b, _ := json.Marshal(cfg)
		f := filepath.Join(dir, "config.json")
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--config", f)
	}
	s.cmd = exec.Command(s.Bin, args...)
	s.cmd.Stderr = writerFunc(func(p []byte) (int, error) {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.logs.Write(p)
	})
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			t.Logf("sandboxd logs:\n%s", s.Logs())
		}
	})
	keyc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case keyc <- strings.TrimSpace(sc.Text()):
			default:
			}
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandboxd did not become healthy: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case s.Key = <-keyc:
	case <-time.After(2 * time.Second):
		t.Fatal("sandboxd printed no API key on its first start")
	}
	return s
}

// Stop ends the server with SIGTERM and waits for it. It is idempotent.
func (s *Server) Stop() {
	if s.cmd.ProcessState == nil {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		_ = s.cmd.Wait()
	}
}

// Logs returns what the server wrote to stderr so far.
func (s *Server) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logs.String()
}

// NewKey creates an API key with `sandboxd keys create` (the account is created when missing).
func (s *Server) NewKey(t testing.TB, account, plan string) string {
	t.Helper()
	out, err := exec.Command(s.Bin, "keys", "create", "--data-dir", s.DataDir, "--account", account, "--plan", plan).Output()
	if err != nil {
		t.Fatalf("keys create: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

var _ io.Writer = writerFunc(nil)

// String describes the server (for test logs).
func (s *Server) String() string { return fmt.Sprintf("sandboxd at %s (data %s)", s.URL, s.DataDir) }
