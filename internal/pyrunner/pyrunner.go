// Package pyrunner holds the in-sandbox Python runner (runner.py), the one definition of what a
// run does with the user's code in every driver: the code runs as a fresh __main__ module compiled
// with filename "<run>"; the global `result` is reported as JSON (its repr() as a JSON string when
// it is not JSON-serialisable, a notice when over the size limit); an uncaught exception is
// reported as {type, message, traceback}, printed to stderr, and exits 1; SystemExit exits like
// Python. See the comment at the top of runner.py for how the code comes in and the report goes
// out (descriptors 3 and 4 for sandbox-agent, named files for the wasm driver). Every run's globals
// also hold `agent`, whose calls go over the run's agent channel (agent.go: descriptor 6, or the
// file AgentFile).
package pyrunner

import (
	_ "embed"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// WorkDir is the working directory of every run, in every driver: a directory of the sandbox's
// disk, empty when a run starts (the driver empties it after each run: EmptyDir) and on no
// import path (the runner puts no "" in sys.path), so nothing a run leaves behind changes what
// a later one finds there or imports. What persists between runs: /tmp and the read_write paths.
const WorkDir = "/.sandbox/work"

// EmptyDir removes everything in directory dir, resolving every name beneath it without
// following links (os.Root): safe on a directory that sandbox code writes.
func EmptyDir(dir string) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	f, err := root.Open(".")
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	var errs []error
	for _, n := range names {
		errs = append(errs, root.RemoveAll(n))
	}
	return errors.Join(append(errs, err)...)
}

// ContextDirName is the name, in /tmp, of WASM code context name's working directory (kept over
// restarts of its interpreter, removed when the context is deleted).
func ContextDirName(name string) string { return ".context-" + name }

// RemoveContextDir removes code context name's working directory from tmp, the sandbox's /tmp: a
// directory sandbox code writes, so the name is resolved beneath it with os.Root (no link
// followed). The WASM worker removes it, or the host when the sandbox has no worker.
func RemoveContextDir(tmp, name string) error {
	root, err := os.OpenRoot(tmp)
	if err != nil {
		return err
	}
	defer root.Close()
	return root.RemoveAll(ContextDirName(name))
}

// Source is the text of runner.py.
//
//go:embed runner.py
var Source string

// BaseEnv is the environment every run starts from, in every driver.
var BaseEnv = map[string]string{
	"PATH":                    "/usr/local/bin:/usr/bin:/bin",
	"HOME":                    "/tmp",
	"LANG":                    "C.UTF-8",
	"PYTHONDONTWRITEBYTECODE": "1",
	"PYTHONUNBUFFERED":        "1",
}

// Env returns BaseEnv with more and then extra laid over it, as sorted "K=V" strings. A name that
// is empty or holds "=" or NUL, or a value with NUL, is an error.
func Env(more, extra map[string]string) ([]string, error) {
	m := make(map[string]string, len(BaseEnv)+len(more)+len(extra))
	for _, layer := range []map[string]string{BaseEnv, more, extra} {
		for k, v := range layer {
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
				return nil, fmt.Errorf("invalid environment variable %q", k)
			}
			m[k] = v
		}
	}
	env := make([]string, 0, len(m))
	for k, v := range m {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env, nil
}
