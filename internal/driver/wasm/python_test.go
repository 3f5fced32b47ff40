package wasm

// Tests on the real python.wasm ($SANDBOXD_PYTHON_WASM).

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
)

// TestPythonSemantics: what the conformance suite does not ask of every image — the standard
// library's modules python.wasm has (sqlite3 with files in /tmp) — nor of every driver: the
// runner's directory holds nothing a run can see.
func TestPythonSemantics(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	for _, tc := range []struct{ name, code, stdout string }{
		{"runner dir is empty", "import os\nprint(os.listdir('/.sandbox'))", "[]\n"},
		{"stdlib: json sqlite3 zlib", `
import json, sqlite3, zlib, hashlib, datetime, decimal, csv, io
db = sqlite3.connect(":memory:")
db.execute("create table t (a int, b text)")
db.executemany("insert into t values (?, ?)", [(i, str(i)) for i in range(100)])
n, = db.execute("select count(*) from t where a % 2 = 0").fetchone()
z = zlib.compress(b"hello" * 1000)
assert zlib.decompress(z) == b"hello" * 1000
print(json.dumps({"even": n, "small": len(z) < 100, "sha": hashlib.sha256(b"x").hexdigest()[:8], "json": json.loads('{"k": [1]}')}))
`, `{"even": 50, "small": true, "sha": "2d711642", "json": {"k": [1]}}` + "\n"},
		{"sqlite3 file in /tmp", `
import sqlite3
db = sqlite3.connect("/tmp/t.db")
db.execute("create table if not exists t (a)")
db.execute("insert into t values (1)")
db.commit()
print(db.execute("select count(*) from t").fetchone()[0] >= 1)
`, "True\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := drivertest.MustExec(t, d, id, tc.code); got != tc.stdout {
				t.Errorf("stdout %q, want %q", got, tc.stdout)
			}
		})
	}
}

// TestPythonFilesystem: the filesystem rules seen from Python, including directory descriptors
// (which reach nested mounts and blocked paths through an enclosing mount).
func TestPythonFilesystem(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	root := t.TempDir()
	for rel, content := range map[string]string{
		"outside/secret.txt": "host-secret",
		"ws/file.txt":        "ws-file",
		"ws/secret/s.txt":    "blocked",
		"ro/r.txt":           "ro-file",
	} {
		p := filepath.Join(root, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Symlink("../outside/secret.txt", filepath.Join(root, "ws/link-rel"))
	os.Symlink(filepath.Join(root, "outside"), filepath.Join(root, "ws/link-abs"))
	os.Mkdir(filepath.Join(root, "ws/ro"), 0o755) // the mount point
	spec := baseSpec(t, pyImage)
	spec.Mounts = []driver.Mount{
		{Path: "/workspace", HostDir: filepath.Join(root, "ws")},
		{Path: "/workspace/ro", HostDir: filepath.Join(root, "ro"), ReadOnly: true},
	}
	spec.Blocked = []string{"/workspace/secret", "/etc"}
	id := harness.Sandbox(t, d, spec)
	res := drivertest.Exec(t, d, id, drivertest.PathProbe+`
attempt("read ws", lambda: read("/workspace/file.txt"))
attempt("write ws", lambda: write("/workspace/new.txt"))
attempt("read ro", lambda: read("/workspace/ro/r.txt"))
attempt("write ro", lambda: write("/workspace/ro/new.txt"))
attempt("truncate ro", lambda: os.truncate("/workspace/ro/r.txt", 0))
attempt("utime ro", lambda: os.utime("/workspace/ro/r.txt", (0, 0)))
attempt("write stdlib", lambda: write("/usr/local/lib/python3.11/os.py"))
attempt("read blocked", lambda: read("/workspace/secret/s.txt"))
attempt("stat blocked", lambda: os.stat("/workspace/secret"))
attempt("mkdir blocked", lambda: os.mkdir("/workspace/secret"))
attempt("list ws", lambda: ",".join(sorted(os.listdir("/workspace"))))
attempt("read etc", lambda: read("/etc/passwd"))
attempt("list root", lambda: os.listdir("/"))
attempt("dotdot", lambda: read("/workspace/../outside/secret.txt"))
attempt("dotdot tmp", lambda: read("/tmp/../../outside/secret.txt"))
attempt("symlink rel", lambda: read("/workspace/link-rel"))
attempt("symlink abs", lambda: os.listdir("/workspace/link-abs"))
attempt("make symlink", lambda: os.symlink("../outside", "/workspace/evil"))
attempt("make symlink tmp", lambda: os.symlink("/", "/tmp/evil"))
attempt("make hardlink", lambda: os.link("/workspace/file.txt", "/workspace/hard"))
ws = os.open("/workspace", os.O_RDONLY | os.O_DIRECTORY)
attempt("dirfd read", lambda: read("file.txt", dir_fd=ws))
attempt("dirfd blocked", lambda: read("secret/s.txt", dir_fd=ws))
attempt("dirfd stat blocked", lambda: os.stat("secret", dir_fd=ws))
attempt("dirfd nested read", lambda: read("ro/r.txt", dir_fd=ws))
attempt("dirfd nested write", lambda: write("ro/new.txt", dir_fd=ws))
attempt("dirfd dotdot", lambda: read("../outside/secret.txt", dir_fd=ws))
attempt("rename guard", lambda: os.rename("/workspace/secret", "/workspace/x"))
attempt("rename across", lambda: os.rename("/workspace/file.txt", "/workspace/ro/file.txt"))
attempt("tmp", lambda: (write("/tmp/t"), read("/tmp/t"))[1])
`, 30*time.Second)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("status %s: %s", res.Status, res.Stderr)
	}
	var got map[string]string
	if err := json.Unmarshal(res.Result, &got); err != nil {
		t.Fatalf("result %s: %v", res.Result, err)
	}
	refused := func(v string) bool { return !strings.HasPrefix(v, "ok") }
	for name, want := range map[string]string{
		"read ws": "ok ws-file", "write ws": "ok", "read ro": "ok ro-file", "write ro": "EROFS",
		"truncate ro": "EROFS", "utime ro": "EROFS", "write stdlib": "EROFS",
		"read blocked": "ENOENT", "stat blocked": "ENOENT", "mkdir blocked": "EACCES",
		"list ws":  "ok file.txt,link-abs,link-rel,new.txt,ro",
		"read etc": "refused", "list root": "refused", "dotdot": "refused", "dotdot tmp": "refused",
		"symlink rel": "refused", "symlink abs": "refused",
		"make symlink": "EPERM", "make symlink tmp": "EPERM", "make hardlink": "EPERM",
		"dirfd read": "ok ws-file", "dirfd blocked": "ENOENT", "dirfd stat blocked": "ENOENT",
		"dirfd nested read": "ok ro-file", "dirfd nested write": "EROFS", "dirfd dotdot": "refused",
		"rename guard": "refused", "rename across": "refused", "tmp": "ok x",
	} {
		g, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: not reported", name)
		case want == "refused":
			if !refused(g) {
				t.Errorf("%s: %s, want a refusal", name, g)
			}
		case g != want:
			t.Errorf("%s: %s, want %s", name, g, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(root, "ws/evil")); err == nil {
		t.Error("the guest made a symlink on the host")
	}
	if b, _ := os.ReadFile(filepath.Join(root, "outside/secret.txt")); string(b) != "host-secret" {
		t.Errorf("a host file outside the mounts changed: %q", b)
	}
}

// TestPythonMemory: a memory hog ends as "oom" (MemoryError), the worker's RSS stays below
// 1.5 × the cap (package worker's trap 4), and the sandbox keeps working.
func TestPythonMemory(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	spec := baseSpec(t, pyImage)
	spec.MemoryBytes = 256 << 20
	id := harness.Sandbox(t, d, spec)
	b, _ := d.lookup(id)
	for _, tc := range []struct{ name, code string }{
		{"one big bytes", "b = b'x' * (1 << 30)"},
		{"list append", "l = []\nwhile True:\n    l.append(' ' * 10000)"},
		{"bytearray growth", "b = bytearray()\nwhile True:\n    b += b'y' * (1 << 20)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			drivertest.MustExec(t, d, id, "pass") // make sure the sandbox has a live worker
			pid := workerPid(t, b)
			resetPeakRSS(t, pid)
			res := drivertest.Exec(t, d, id, tc.code, 60*time.Second)
			if res.Status != driver.StatusOOM {
				t.Fatalf("status %s exit %d, want oom; stderr %s", res.Status, res.ExitCode, res.Stderr)
			}
			if res.MemoryPeak > spec.MemoryBytes {
				t.Errorf("memory peak %d MiB over the cap", res.MemoryPeak>>20)
			}
			peak := peakRSSOf(t, pid)
			if peak >= spec.MemoryBytes*3/2 {
				t.Errorf("worker RSS peaked at %d MiB, want below 1.5 × %d MiB", peak>>20, spec.MemoryBytes>>20)
			}
			t.Logf("%s: exit %d, error %s, linear memory peak %d MiB, worker RSS peak %d MiB", tc.name, res.ExitCode, errType(res), res.MemoryPeak>>20, peak>>20)
			if got := drivertest.MustExec(t, d, id, "print(sum(range(10)))"); got != "45\n" {
				t.Errorf("next run: %q", got)
			}
		})
	}
}

func errType(res driver.ExecResult) string {
	if res.Error == nil {
		return "none"
	}
	return res.Error.Type
}

// TestPythonUnsupported: what WASI lacks fails cleanly, as an exception, never a hang or a crash.
func TestPythonUnsupported(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	for _, tc := range []struct{ name, code string }{
		{"socket", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('1.1.1.1', 80))"},
		{"socket create_connection", "import socket\nsocket.create_connection(('example.com', 80), timeout=2)"},
		{"urllib", "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"},
		{"subprocess", "import subprocess\nsubprocess.run(['ls'])"},
		{"os.system", "import os\nr = os.system('ls')\nassert r == 0, r"},
		{"fork", "import os\nos.fork()"},
		{"thread", "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()"},
		{"multiprocessing", "import multiprocessing\nmultiprocessing.Pool(2)"},
		{"ctypes", "import ctypes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := drivertest.Exec(t, d, id, tc.code, 20*time.Second) // a run that hangs ends "timeout"
			if res.Status != driver.StatusFailed || res.Error == nil {
				t.Errorf("status %s error %+v, want failed with an exception; stderr %s", res.Status, res.Error, res.Stderr)
			}
			t.Logf("%s: %s: %s", tc.name, errType(res), firstLine(res.Error))
		})
	}
}

func firstLine(e *driver.PyError) string {
	if e == nil {
		return ""
	}
	l, _, _ := strings.Cut(e.Message, "\n")
	return l
}

// TestPythonCrash: a guest that crashes the interpreter (a wasm trap) or a worker killed from
// outside never takes the driver down; the sandbox's next run works.
func TestPythonCrash(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	b, _ := d.lookup(id)

	// A use-after-free in CPython 3.11.2's itertools.pairwise (gh-109786, fixed in 3.11.6; the
	// test_pairwise_reenter2 of 3.11.7's test suite): natively a SIGSEGV, here usually a trap
	// ("invalid table access": a freed object's type slot read as a function index). Whatever it
	// does, it is not a stack overflow, and the sandbox goes on.
	res := drivertest.Exec(t, d, id, pairwiseReenter, 60*time.Second)
	t.Logf("pairwise re-entered: %s exit %d, error %s, stderr %q", res.Status, res.ExitCode, errType(res), tail(res.Stderr, 200))
	if res.ExitCode == protocol.TrapExitCode && !strings.Contains(string(res.Stderr), "sandbox: the interpreter crashed (wasm error: ") {
		t.Errorf("trap without its line on stderr: %q", tail(res.Stderr, 300))
	}
	if errType(res) == "StackOverflow" {
		t.Errorf("a use-after-free reported as a stack overflow: %q", tail(res.Stderr, 300))
	}
	if got := drivertest.MustExec(t, d, id, "print(3)"); got != "3\n" {
		t.Errorf("after the crash: %q", got)
	}

	// The worker killed during a run.
	pid := workerPid(t, b)
	time.AfterFunc(time.Second, func() { syscall.Kill(pid, syscall.SIGKILL) })
	_, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "import time\ntime.sleep(30)", Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "wasm worker died") {
		t.Errorf("run whose worker was killed: %v, want a driver error", err)
	}
	if got := drivertest.MustExec(t, d, id, "print(4)"); got != "4\n" {
		t.Errorf("after the worker was killed: %q", got)
	}
}

// pairwiseReenter re-enters itertools.pairwise from its own iterator (CPython's
// test_itertools.TestBasicOps.test_pairwise_reenter2, repeated).
const pairwiseReenter = `from itertools import pairwise
def check(maxcount, expected):
    class I:
        count = 0
        def __iter__(self): return self
        def __next__(self):
            if self.count >= maxcount: raise StopIteration
            self.count += 1
            if self.count == 1: return next(it, None)
            return [self.count]
    it = pairwise(I())
    try:
        got = list(it)
    except SystemError:
        got = None
    print(maxcount, got == expected)
for _ in range(20):
    check(1, []); check(2, []); check(3, []); check(4, [(([2], [3]), [4])])
`

// TestPythonStackOverflow: recursion deeper than the interpreter's C stack (the recursion limit
// lifted) ends the run failed with error StackOverflow and says so on stderr, and the sandbox's
// next run completes; recursion within the default limit (1000, as native CPython's) works,
// through C code too, and past it is a RecursionError.
func TestPythonStackOverflow(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	const nest = "def nest(n):\n    x = []\n    for _ in range(n):\n        x = [x]\n    return x\n"
	const lift = "import sys\nsys.setrecursionlimit(10**7)\n"
	for _, tc := range []struct {
		name, code string
		want       string // "completed", or the error type of a failed run
	}{
		// Within the default limit, as deep as native CPython 3.11 goes (the runner's own frames
		// take a few levels; a level through C code counts twice or thrice against the limit).
		{"default limit", "import sys\nassert sys.getrecursionlimit() == 1000, sys.getrecursionlimit()", "completed"},
		{"python function 990", "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nassert f(990) == 990", "completed"},
		{"python through C 950", "def g(n):\n    return 0 if n == 0 else 1 + sum(map(g, [n - 1]))\nassert g(950) == 950", "completed"},
		{"__repr__ through C 300", "class R:\n    def __init__(self, n): self.n = n\n    def __repr__(self): return '.' + (repr(R(self.n - 1)) if self.n else '')\nassert len(repr(R(300))) == 301", "completed"},
		{"json.loads 900", "import json\nx = json.loads('[' * 900 + ']' * 900)\nassert json.dumps(x) == '[' * 900 + ']' * 900", "completed"},
		{"repr 900", nest + "assert len(repr(nest(900))) == 1802", "completed"},
		{"pickle 450", nest + "import pickle\nassert len(repr(pickle.loads(pickle.dumps(nest(450))))) == 902", "completed"},
		{"deep python recursion, limit lifted", lift + "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nassert f(100000) == 100000", "completed"},
		{"C recursion 5000, limit lifted", lift + nest + "import json\nassert len(json.dumps(nest(5000))) == 10002", "completed"},
		// Past the limit: Python's own error.
		{"infinite python recursion", "def f(): return f()\nf()", "RecursionError"},
		{"infinite __repr__ recursion", "class R:\n    def __repr__(self): return repr(self)\nrepr(R())", "RecursionError"},
		{"json.loads 100000", "import json\njson.loads('[' * 100000 + ']' * 100000)", "RecursionError"},
		// Past the stack, the limit lifted.
		{"repr 300000", lift + nest + "repr(nest(300000))", "StackOverflow"},
		{"pickle 300000", lift + nest + "import pickle\npickle.dumps(nest(300000))", "StackOverflow"},
		{"json.dumps 300000", lift + nest + "import json\njson.dumps(nest(300000))", "StackOverflow"},
		{"python through C, unbounded", lift + "def g(n):\n    return sum(map(g, [n + 1]))\ng(0)", "StackOverflow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := drivertest.Exec(t, d, id, tc.code, 60*time.Second)
			switch tc.want {
			case "completed":
				if res.Status != driver.StatusCompleted {
					t.Fatalf("status %s exit %d error %+v, stderr %q; want completed", res.Status, res.ExitCode, res.Error, tail(res.Stderr, 400))
				}
			case "StackOverflow":
				if res.Status != driver.StatusFailed || res.ExitCode != protocol.TrapExitCode || errType(res) != "StackOverflow" ||
					res.Error.Message != protocol.StackOverflowMessage {
					t.Errorf("status %s exit %d error %+v; want failed, exit %d, StackOverflow", res.Status, res.ExitCode, res.Error, protocol.TrapExitCode)
				}
				if !strings.Contains(string(res.Stderr), "sandbox: the interpreter crashed ("+protocol.StackOverflowMessage+"; ") {
					t.Errorf("stderr %q: want the crash line naming the stack overflow", tail(res.Stderr, 400))
				}
			default:
				if res.Status != driver.StatusFailed || errType(res) != tc.want {
					t.Errorf("status %s error %+v; want failed, %s", res.Status, res.Error, tc.want)
				}
			}
			if got := drivertest.MustExec(t, d, id, "print(sum(range(10)))"); got != "45\n" {
				t.Errorf("next run: %q", got)
			}
		})
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// TestPythonDestroy: Destroy during a run ends it as cancelled, removes the worker, the cgroup,
// /tmp and the state dir, and is idempotent.
func TestPythonDestroy(t *testing.T) {
	needPython(t)
	d := openDriver(t, "py")
	id := "t-" + statedir.RandomHex(8)
	if err := d.Create(context.Background(), id, baseSpec(t, pyImage)); err != nil {
		t.Fatal(err)
	}
	group := sandboxGroup(t, d, id)
	drivertest.MustExec(t, d, id, "open('/tmp/x', 'w').write('x')")
	time.AfterFunc(time.Second, func() { d.Destroy(context.Background(), id) })
	res, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "while True: pass", Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != driver.StatusCancelled {
		t.Errorf("run during Destroy: %s, want cancelled", res.Status)
	}
	for i := 0; i < 2; i++ {
		if err := d.Destroy(context.Background(), id); err != nil {
			t.Fatalf("destroy #%d: %v", i+2, err)
		}
	}
	assertGone(t, d, id, group)
	if _, err := d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)"}); err != driver.ErrNotFound {
		t.Errorf("exec after destroy: %v, want ErrNotFound", err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestCheck: a working driver passes its health check; Create refuses what the driver cannot do
// (egress: the conformance suite).
func TestCheck(t *testing.T) {
	d := openDriver(t, "probe")
	if err := d.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	for name, spec := range map[string]driver.Spec{
		"no image":    baseSpec(t, filepath.Join(tmpRoot, "nope")),
		"tiny memory": func() driver.Spec { s := baseSpec(t, probeImage); s.MemoryBytes = 1 << 20; return s }(),
		"relative mount": func() driver.Spec {
			s := baseSpec(t, probeImage)
			s.Mounts = []driver.Mount{{Path: "x", HostDir: "/tmp"}}
			return s
		}(),
	} {
		id := "t-" + statedir.RandomHex(8)
		if err := d.Create(context.Background(), id, spec); err == nil {
			d.Destroy(context.Background(), id)
			t.Errorf("%s: Create succeeded", name)
		}
		assertGone(t, d, id, "")
	}
}

// TestSandboxdBinary: the default worker command, `sandboxd wasm-worker`, works in the real
// binary ($SANDBOXD_BIN/sandboxd, or built from ./cmd/sandboxd).
func TestSandboxdBinary(t *testing.T) {
	needPython(t)
	bin := ""
	if dir := os.Getenv("SANDBOXD_BIN"); dir != "" {
		bin = filepath.Join(dir, "sandboxd")
	} else {
		bin = filepath.Join(t.TempDir(), "sandboxd")
		out, err := exec.Command("go", "build", "-o", bin, "github.com/sandboxd/sandboxd/cmd/sandboxd").CombinedOutput()
		if err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("build sandboxd: %v\n%s", err, out)
			}
			t.Skipf("build sandboxd: %v\n%s", err, out)
		}
	}
	d, err := Open(driver.Options{StateDir: filepath.Join(tmpRoot, "state-binary"), WasmWorker: []string{bin, protocol.WorkerCommand}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() }) // after the sandbox's own cleanup
	id := harness.Sandbox(t, d, baseSpec(t, pyImage))
	if got := drivertest.MustExec(t, d, id, "import sys\nprint(sys.version_info[:2])"); got != "(3, 11)\n" {
		t.Errorf("got %q", got)
	}
}
