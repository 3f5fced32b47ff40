// Package pyrunner holds the in-sandbox Python runner (runner.py), the one definition of what a
// run does with the user's code in every driver: the code runs as a fresh __main__ module compiled
// with filename "<run>"; the global `result` is reported as JSON (its repr() as a JSON string when
// it is not JSON-serialisable, a notice when over the size limit); an uncaught exception is
// reported as {type, message, traceback}, printed to stderr, and exits 1; SystemExit exits like
// Python. See the comment at the top of runner.py for how the code comes in and the report goes
// out (descriptors 3 and 4 for sandbox-agent, named files for the wasm driver).
package pyrunner

import (
	_ "embed"
	"fmt"
	"sort"
	"strings"
)

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
