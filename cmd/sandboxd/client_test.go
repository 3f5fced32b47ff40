package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client/clienttest"
)

// cliFakeAPI mimics the parts of the API the CLI uses. A run's code "status:S exit:N" decides how
// it ends; its output is "out\n" on stdout and "err\n" on stderr.
type cliFakeAPI struct {
	mu      sync.Mutex
	creates []json.RawMessage
	runs    map[string]api.RunRequest
	files   map[string][]byte
	corrupt bool
}

func newCLIFakeAPI(t *testing.T) (*cliFakeAPI, string) {
	f := &cliFakeAPI{runs: map[string]api.RunRequest{}, files: map[string][]byte{}}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func (f *cliFakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fail := func(status int, code, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(api.Error{Error: code, Message: msg, Code: status})
	}
	if r.Header.Get("X-AgentCop-Key") != "k" {
		fail(401, "unauthorized", "missing or unknown API key")
		return
	}
	reply := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	created := time.Now().Add(-90 * time.Second).UTC()
	sb := api.Sandbox{SandboxID: "sbx_1", AgentID: "cli", Status: "ready", Mode: "container", CreatedAt: created,
		ExpiresAt: created.Add(30 * time.Minute), Config: json.RawMessage(`{"image":"img","filesystem":{"read_only":["/d"],"read_write":[],"blocked":[]}}`)}
	path := r.URL.Query().Get("path")
	switch p := r.URL.Path; {
	case r.Method == "POST" && p == "/api/sandbox/create":
		b, _ := io.ReadAll(r.Body)
		f.creates = append(f.creates, b)
		reply(201, api.CreateSandboxResponse{SandboxID: "sbx_1", Status: "ready", Mode: "container"})
	case r.Method == "GET" && p == "/api/sandbox":
		other := sb
		other.SandboxID, other.AgentID, other.Status = "sbx_2", "agent-with-a-long-name", "destroyed"
		reply(200, api.SandboxList{Sandboxes: []api.Sandbox{sb, other}, Total: 2, Page: 1})
	case r.Method == "GET" && p == "/api/sandbox/sbx_1":
		reply(200, sb)
	case r.Method == "DELETE" && p == "/api/sandbox/sbx_1":
		w.WriteHeader(204)
	case r.Method == "POST" && p == "/api/sandbox/sbx_1/run":
		var req api.RunRequest
		json.NewDecoder(r.Body).Decode(&req)
		id := fmt.Sprintf("run_%d", len(f.runs)+1)
		f.runs[id] = req
		reply(202, api.RunAccepted{RunID: id, SandboxID: "sbx_1", Status: "queued"})
	case r.Method == "GET" && strings.HasPrefix(p, "/api/sandbox/sbx_1/runs/") && strings.HasSuffix(p, "/events"):
		id := strings.TrimSuffix(strings.TrimPrefix(p, "/api/sandbox/sbx_1/runs/"), "/events")
		req, ok := f.runs[id]
		if !ok {
			fail(404, "not_found", "no run "+id)
			return
		}
		run := api.Run{RunID: id, SandboxID: "sbx_1", Status: "completed", ExitCode: new(int), Stdout: "out\n", Stderr: "err\n", Result: json.RawMessage("null")}
		for _, f := range strings.Fields(*req.Code) {
			k, v, _ := strings.Cut(f, ":")
			switch k {
			case "status":
				run.Status = v
			case "exit":
				n := 0
				fmt.Sscan(v, &n)
				run.ExitCode = &n
			case "result":
				run.Result = json.RawMessage(v)
			}
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "event: stdout\nid: 4.0\ndata: {\"data\":\"out\\n\"}\n\nevent: stderr\nid: 4.4\ndata: {\"data\":\"err\\n\"}\n\n")
		b, _ := json.Marshal(run)
		fmt.Fprintf(w, "event: end\ndata: %s\n\n", b)
	case p == "/api/sandbox/sbx_1/files" && !strings.HasPrefix(path, "/d/"):
		fail(403, "path_not_allowed", "path "+path+" is outside the sandbox's read_only and read_write paths")
	case r.Method == "PUT" && p == "/api/sandbox/sbx_1/files":
		b, _ := io.ReadAll(r.Body)
		f.files[path] = b
		sum := sha256.Sum256(b)
		reply(201, api.FileWritten{Path: path, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:])})
	case r.Method == "GET" && p == "/api/sandbox/sbx_1/files" && strings.HasSuffix(path, "/"):
		var l api.FileList
		l.Path = path
		for name, b := range f.files {
			l.Entries = append(l.Entries, api.FileEntry{Name: strings.TrimPrefix(name, path), Size: int64(len(b)), Type: "file", ModifiedAt: created})
		}
		reply(200, l)
	case r.Method == "GET" && p == "/api/sandbox/sbx_1/files":
		b, ok := f.files[path]
		if !ok {
			fail(404, "not_found", "no file "+path)
			return
		}
		sum := sha256.Sum256(b)
		w.Header().Set("ETag", `"`+hex.EncodeToString(sum[:])+`"`)
		w.Header().Set("Content-Type", "application/octet-stream")
		if f.corrupt {
			b = append([]byte("X"), b[1:]...)
		}
		w.Write(b)
	case r.Method == "DELETE" && p == "/api/sandbox/sbx_1/files":
		delete(f.files, path)
		w.WriteHeader(204)
	default:
		fail(404, "not_found", "no sandbox "+strings.TrimPrefix(p, "/api/sandbox/"))
	}
}

// runCLI runs one client command in process.
func runCLI(t *testing.T, stdin string, args ...string) (stdout, stderr string, status int) {
	t.Helper()
	var out, errb bytes.Buffer
	c := &cli{name: args[0], stdin: strings.NewReader(stdin), stdout: &out, stderr: &errb}
	status = c.main(args[1:])
	return out.String(), errb.String(), status
}

func TestCLIWithFakeServer(t *testing.T) {
	f, url := newCLIFakeAPI(t)
	t.Setenv("SANDBOXD_URL", url)
	t.Setenv("SANDBOXD_API_KEY", "k")
	t.Setenv("AGENTCOP_API_KEY", "")
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "cfg.json")
	os.WriteFile(cfgFile, []byte(`{"agent_id": "from-file", "config": {"image": "img", "resources": {"cpu": "0.5", "memory": "256m"}}}`), 0o600)
	onlyConfig := filepath.Join(dir, "only.json")
	os.WriteFile(onlyConfig, []byte(`{"network": {"allow": ["api.company.com"]}}`), 0o600)
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"config": {"imagee": "x"}}`), 0o600)
	code := filepath.Join(dir, "code.py")
	os.WriteFile(code, []byte("status:completed result:{\"rows\":12}"), 0o600)

	tests := []struct {
		name       string
		stdin      string
		args       []string
		status     int
		stdout     string // exact, unless it starts with "~": then contained
		stderr     string // contained
		createBody string // the create request the server got
	}{
		{name: "create flags", args: []string{"create", "--agent-id", "x", "--ro", "/a", "--ro", "/b", "--rw", "/c", "--blocked", "/etc",
			"--allow", "h.com", "--cpu", "0.5", "--memory", "1g", "--timeout", "60", "--allow-spawn"}, stdout: "sbx_1\n",
			createBody: `{"agent_id":"x","config":{"filesystem":{"read_only":["/a","/b"],"read_write":["/c"],"blocked":["/etc"]},"network":{"allow":["h.com"]},"resources":{"cpu":"0.5","memory":"1g","timeout":60},"process":{"allow_spawn":true}}}`},
		{name: "create defaults", args: []string{"create"}, stdout: "sbx_1\n", createBody: `{"agent_id":"cli"}`},
		{name: "create from file, flags win", args: []string{"create", "--config", cfgFile, "--memory", "1g", "--block-outbound=false"}, stdout: "sbx_1\n",
			createBody: `{"agent_id":"from-file","config":{"image":"img","network":{"allow":null,"block_outbound":false},"resources":{"cpu":"0.5","memory":"1g"}}}`},
		{name: "create from a bare config", args: []string{"create", "--config", onlyConfig, "--json"}, stdout: "~\"sandbox_id\": \"sbx_1\"",
			createBody: `{"agent_id":"cli","config":{"network":{"allow":["api.company.com"]}}}`},
		{name: "create bad file", args: []string{"create", "--config", bad}, status: 1, stderr: `unknown field "imagee"`},
		{name: "create bad flag", args: []string{"create", "--nope"}, status: 2, stderr: "usage: sandboxd create"},

		{name: "ls", args: []string{"ls"}, stdout: "~SANDBOX ID  AGENT                   STATUS     MODE       RUNS  CREATED  EXPIRES\n" +
			"sbx_1       cli                     ready      container  0     1m ago   in 28m\nsbx_2       agent-with-a-long-name  destroyed  container  0     1m ago   -\n"},
		{name: "ls json", args: []string{"ls", "--json"}, stdout: `~"total": 2`},
		{name: "get", args: []string{"get", "sbx_1"}, stdout: "~read_only   /d\n"},
		{name: "get json", args: []string{"get", "--json", "sbx_1"}, stdout: `~"sandbox_id": "sbx_1"`},
		{name: "get unknown", args: []string{"get", "sbx_9"}, status: 1, stderr: "sandboxd get: not_found: no sandbox sbx_9\n"},
		{name: "get two ids", args: []string{"get", "sbx_1", "sbx_2"}, status: 2, stderr: `unexpected argument "sbx_2"`},

		{name: "run", args: []string{"run", "sbx_1", "status:completed result:42"}, stdout: "out\n42\n", stderr: "err\n"},
		{name: "run flags after the code", args: []string{"run", "sbx_1", "status:completed", "--timeout", "5", "--env", "A=b=c"}, stdout: "out\n"},
		{name: "run file", args: []string{"run", "--file", code, "sbx_1"}, stdout: "out\n{\"rows\":12}\n"},
		{name: "run stdin", stdin: "status:completed", args: []string{"run", "sbx_1", "-"}, stdout: "out\n"},
		{name: "run failed", args: []string{"run", "sbx_1", "status:failed exit:3"}, status: 3, stdout: "out\n"},
		{name: "run timeout", args: []string{"run", "sbx_1", "status:timeout"}, stdout: "out\n", status: 124, stderr: "timed out"},
		{name: "run oom", args: []string{"run", "sbx_1", "status:oom"}, stdout: "out\n", status: 137, stderr: "out of memory"},
		{name: "run cancelled", args: []string{"run", "sbx_1", "status:cancelled"}, stdout: "out\n", status: 130, stderr: "cancelled"},
		{name: "run error", args: []string{"run", "sbx_1", "status:error"}, stdout: "out\n", status: 1, stderr: "the service failed"},
		{name: "run json", args: []string{"run", "--json", "sbx_1", "status:completed"}, stdout: `~"stdout": "out\n"`},
		{name: "run detach", args: []string{"run", "--detach", "sbx_1", "status:completed"}, stdout: "~run_"},
		{name: "run no code", args: []string{"run", "sbx_1"}, status: 2, stderr: "no code"},
		{name: "run code twice", args: []string{"run", "sbx_1", "x", "--file", code}, status: 2, stderr: "give the code once"},
		{name: "run bad env", args: []string{"run", "sbx_1", "x", "--env", "novalue"}, status: 2, stderr: "want K=V"},
		{name: "run unknown sandbox", args: []string{"run", "sbx_9", "x"}, status: 1, stderr: "not_found"},
		{name: "logs", args: []string{"logs", "sbx_1", "run_1"}, stdout: "~out\n"},
		{name: "logs unknown run", args: []string{"logs", "sbx_1", "run_999"}, status: 1, stderr: "no run run_999"},

		{name: "cp usage", args: []string{"cp", "a", "b"}, status: 2, stderr: "one side must be ID:/PATH"},
		{name: "cp two remotes", args: []string{"cp", "sbx_1:/d/a", "sbx_2:/d/b"}, status: 2, stderr: "two sandboxes"},
		{name: "cp not allowed", args: []string{"cp", code, "sbx_1:/etc/x"}, status: 1, stderr: "path_not_allowed: path /etc/x is outside"},
		{name: "cp missing local", args: []string{"cp", filepath.Join(dir, "nope"), "sbx_1:/d/x"}, status: 1, stderr: "no such file"},
		{name: "rm some fail", args: []string{"rm", "sbx_1", "sbx_9"}, status: 1, stdout: "sbx_1\n", stderr: `sandboxd rm: sbx_9: not_found`},
		{name: "rm bad arg", args: []string{"rm", "a/b"}, status: 2, stderr: "neither a sandbox ID"},
		{name: "help", args: []string{"cp", "--help"}, stdout: "~usage: sandboxd cp LOCAL ID:/PATH"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.mu.Lock()
			f.creates = nil
			f.mu.Unlock()
			stdout, stderr, status := runCLI(t, tt.stdin, tt.args...)
			if status != tt.status {
				t.Fatalf("exit status %d, want %d\nstdout: %s\nstderr: %s", status, tt.status, stdout, stderr)
			}
			if want, ok := strings.CutPrefix(tt.stdout, "~"); ok && !strings.Contains(stdout, want) || !ok && stdout != tt.stdout {
				t.Fatalf("stdout %q, want %q", stdout, tt.stdout)
			}
			if !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("stderr %q, want it to contain %q", stderr, tt.stderr)
			}
			if tt.createBody != "" {
				f.mu.Lock()
				defer f.mu.Unlock()
				if len(f.creates) != 1 || strings.TrimSpace(string(f.creates[0])) != tt.createBody {
					t.Fatalf("create request %s\nwant %s", f.creates, tt.createBody)
				}
			}
		})
	}
}

func TestCLIFiles(t *testing.T) {
	f, url := newCLIFakeAPI(t)
	t.Setenv("SANDBOXD_URL", url)
	t.Setenv("AGENTCOP_API_KEY", "k")
	dir := t.TempDir()
	src := filepath.Join(dir, "in.csv")
	os.WriteFile(src, []byte("a,b\n1,2\n"), 0o600)
	for _, args := range [][]string{
		{"cp", src, "sbx_1:/d/"},                  // into a directory: keeps the name
		{"cp", dir + "/in.csv", "sbx_1:/d/x.csv"}, // named
	} {
		if _, stderr, status := runCLI(t, "", args...); status != 0 {
			t.Fatalf("%v: %d %s", args, status, stderr)
		}
	}
	if _, stderr, status := runCLI(t, "from stdin", "cp", "-", "sbx_1:/d/stdin.txt"); status != 0 {
		t.Fatalf("cp from stdin: %d %s", status, stderr)
	}
	if string(f.files["/d/in.csv"]) != "a,b\n1,2\n" || string(f.files["/d/x.csv"]) != "a,b\n1,2\n" || string(f.files["/d/stdin.txt"]) != "from stdin" {
		t.Fatalf("stored: %q", f.files)
	}
	out, _, status := runCLI(t, "", "ls", "sbx_1:/d")
	if status != 0 || !strings.Contains(out, "TYPE  SIZE  MODIFIED") || !strings.Contains(out, "in.csv") {
		t.Fatalf("ls files: %d %s", status, out)
	}
	out, stderr, status := runCLI(t, "", "cp", "--json", "sbx_1:/d/x.csv", dir+"/")
	got, _ := os.ReadFile(filepath.Join(dir, "x.csv"))
	if status != 0 || string(got) != "a,b\n1,2\n" || !strings.Contains(out, `"sha256"`) {
		t.Fatalf("cp out: %d %s %s %q", status, out, stderr, got)
	}
	if _, stderr, status := runCLI(t, "", "cp", "sbx_1:/d/", dir); status != 1 || !strings.Contains(stderr, "sbx_1:/d/ is a directory: cp copies one file") {
		t.Fatalf("cp of a directory: %d %s", status, stderr)
	}
	out, _, _ = runCLI(t, "", "cp", "sbx_1:/d/x.csv", "-")
	if out != "a,b\n1,2\n" {
		t.Fatalf("cp to stdout: %q", out)
	}
	f.corrupt = true
	_, stderr, status = runCLI(t, "", "cp", "sbx_1:/d/x.csv", filepath.Join(dir, "bad.csv"))
	if status != 1 || !strings.Contains(stderr, "checksum mismatch") {
		t.Fatalf("corrupt download: %d %s", status, stderr)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Name() == "bad.csv" || strings.HasPrefix(e.Name(), ".") {
			t.Fatalf("a corrupt download left %s", e.Name())
		}
	}
	f.corrupt = false
	if _, stderr, status := runCLI(t, "", "rm", "sbx_1:/d/x.csv"); status != 0 || f.files["/d/x.csv"] != nil {
		t.Fatalf("rm file: %d %s", status, stderr)
	}
}

func TestCLIConnectionErrors(t *testing.T) {
	t.Setenv("SANDBOXD_API_KEY", "")
	t.Setenv("AGENTCOP_API_KEY", "")
	t.Setenv("SANDBOXD_URL", "http://127.0.0.1:1")
	if _, stderr, status := runCLI(t, "", "ls"); status != 1 || stderr != "sandboxd ls: no API key: pass --key or set SANDBOXD_API_KEY (make run prints one)\n" {
		t.Fatalf("no key: %d %q", status, stderr)
	}
	_, stderr, status := runCLI(t, "", "ls", "--key", "k")
	if status != 1 || !strings.Contains(stderr, "cannot reach sandboxd at http://127.0.0.1:1") || !strings.Contains(stderr, "make run") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("no server: %d %q", status, stderr)
	}
	_, url := newCLIFakeAPI(t)
	if _, stderr, status := runCLI(t, "", "ls", "--url", url, "--key", "wrong"); status != 1 || !strings.Contains(stderr, "refused the API key") {
		t.Fatalf("bad key: %d %q", status, stderr)
	}
}

// TestCLILive runs the built sandboxd binary as a client of a real server: create, cp in, a
// streamed run, cp out, rm.
func TestCLILive(t *testing.T) {
	srv := clienttest.Start(t, clienttest.Options{Pool: "10.222.0.0/16"})
	env := append(os.Environ(), "SANDBOXD_URL="+srv.URL, "SANDBOXD_API_KEY="+srv.Key, "AGENTCOP_API_KEY=")
	cli := func(stdin string, args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(srv.Bin, args...)
		cmd.Env = env
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if _, ok := err.(*exec.ExitError); err != nil && !ok {
			t.Fatal(err)
		}
		return out.String(), errb.String(), cmd.ProcessState.ExitCode()
	}
	out, stderr, status := cli("", "create", "--agent-id", "cli-live", "--ro", "/workspace/data", "--rw", "/workspace/out", "--timeout", "300")
	id := strings.TrimSpace(out)
	if status != 0 || !strings.HasPrefix(id, "sbx_") {
		t.Fatalf("create: %d %q %s", status, out, stderr)
	}
	defer cli("", "rm", id)

	dir := t.TempDir()
	data := bytes.Repeat([]byte("sandboxd,cli\n"), 200000) // 2.6 MB
	os.WriteFile(filepath.Join(dir, "in.csv"), data, 0o600)
	if _, stderr, status := cli("", "cp", filepath.Join(dir, "in.csv"), id+":/workspace/data/"); status != 0 {
		t.Fatalf("cp in: %d %s", status, stderr)
	}

	// A streamed run: its first line must reach our stdout while the run still sleeps.
	code := "import sys, time\nrows = open('/workspace/data/in.csv').read().count('\\n')\nprint('rows', rows, flush=True)\n" +
		"print('working', file=sys.stderr, flush=True)\ntime.sleep(1)\nopen('/workspace/out/n.txt', 'w').write(str(rows))\nprint('done')\nresult = rows"
	cmd := exec.Command(srv.Bin, "run", id, "-")
	cmd.Env = env
	cmd.Stdin = strings.NewReader(code)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	pipe, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var lines []string
	var firstAt time.Time
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		if firstAt.IsZero() {
			firstAt = time.Now()
		}
		lines = append(lines, sc.Text())
	}
	if err := cmd.Wait(); err != nil || ctx.Err() != nil {
		t.Fatalf("run: %v %s", err, errb.String())
	}
	if ended := time.Now(); ended.Sub(firstAt) < 700*time.Millisecond {
		t.Fatalf("the first line came %v before the end: not streamed", ended.Sub(firstAt))
	}
	if strings.Join(lines, "|") != "rows 200000|done|200000" || errb.String() != "working\n" {
		t.Fatalf("run output %q, stderr %q", lines, errb.String())
	}

	if _, stderr, status := cli("", "cp", id+":/workspace/out/n.txt", filepath.Join(dir, "n.txt")); status != 0 {
		t.Fatalf("cp out: %d %s", status, stderr)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "n.txt")); string(got) != "200000" {
		t.Fatalf("copied out %q", got)
	}
	out, _, status = cli("", "cp", id+":/workspace/data/in.csv", "-")
	if status != 0 || out != string(data) {
		t.Fatalf("cp to stdout: %d, %d bytes", status, len(out))
	}
	if _, stderr, status := cli("", "run", id, "import sys\nsys.exit(7)"); status != 7 {
		t.Fatalf("exit status of a failing run: %d %s", status, stderr)
	}
	if _, stderr, status := cli("", "run", "--timeout", "1", id, "while True: pass"); status != 124 || !strings.Contains(stderr, "timed out") {
		t.Fatalf("timeout: %d %s", status, stderr)
	}
	// A code context: create, two runs sharing state, ls, rm, then a run in it is refused.
	out, stderr, status = cli("", "context", "create", id)
	cx := strings.TrimSpace(out)
	if status != 0 || !strings.HasPrefix(cx, "ctx_") {
		t.Fatalf("context create: %d %q %s", status, out, stderr)
	}
	if _, stderr, status := cli("", "run", "--context", cx, id, "n = 20"); status != 0 {
		t.Fatalf("run in a context: %d %s", status, stderr)
	}
	if out, stderr, status := cli("", "run", id, "--context", cx, "result = n + 1"); status != 0 || out != "21\n" {
		t.Fatalf("second run in the context: %d %q %s", status, out, stderr)
	}
	if out, _, status := cli("", "context", "ls", id); status != 0 || !strings.Contains(out, cx) || !strings.Contains(out, "ready") {
		t.Fatalf("context ls: %d %s", status, out)
	}
	if _, stderr, status := cli("", "context", "rm", id, cx); status != 0 {
		t.Fatalf("context rm: %d %s", status, stderr)
	}
	if _, stderr, status := cli("", "run", "--context", cx, id, "1"); status != 1 || !strings.Contains(stderr, "not_found") {
		t.Fatalf("run in a deleted context: %d %s", status, stderr)
	}
	if _, stderr, status := cli("", "context", "nope", id); status != 2 {
		t.Fatalf("context usage: %d %s", status, stderr)
	}
	if out, _, status := cli("", "ls"); status != 0 || !strings.Contains(out, id) || !strings.Contains(out, "cli-live") {
		t.Fatalf("ls: %d %s", status, out)
	}
	if _, stderr, status := cli("", "rm", id); status != 0 {
		t.Fatalf("rm: %d %s", status, stderr)
	}
	if out, _, _ := cli("", "get", id); !strings.Contains(out, "destroyed") {
		t.Fatalf("after rm: %s", out)
	}
}
