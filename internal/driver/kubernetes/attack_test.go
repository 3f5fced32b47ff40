package kubernetes

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
)

// What hostile code in a pod tries. Each probe's result is {name: "ok …" | errno name | "…"}.

// probe runs drivertest.PathProbe plus code in sandbox id and returns its result.
func probe(t *testing.T, d driver.Driver, id, code string) map[string]string {
	t.Helper()
	res := drivertest.Exec(t, d, id, drivertest.PathProbe+code, time.Minute)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("probe: %s: %s %+v", res.Status, res.Stderr, res.Error)
	}
	var got map[string]string
	if err := json.Unmarshal(res.Result, &got); err != nil {
		t.Fatalf("probe result %s: %v", res.Result, err)
	}
	return got
}

func sandbox(t *testing.T, d driver.Driver, spec driver.Spec) string {
	t.Helper()
	return harness.Sandbox(t, d, spec)
}

// TestPodConfinement: no service-account token, a read-only root, no capabilities, no new
// privileges, seccomp, the run uid, blocked paths hide what the image has under them, read_write
// paths are writable.
func TestPodConfinement(t *testing.T) {
	d := shared(t)
	spec := testSpec()
	spec.Blocked = []string{"/usr/share/common-licenses", "/usr/lib/os-release"}
	spec.Mounts = []driver.Mount{{Path: "/workspace/output"}}
	id := sandbox(t, d, spec)
	got := probe(t, d, id, `
import os
def status(key):
    return [l.split(":", 1)[1].strip() for l in open("/proc/self/status") if l.startswith(key + ":")][0]
attempt("token", lambda: os.listdir("/var/run/secrets/kubernetes.io/serviceaccount"))
attempt("any token", lambda: [f for d in ("/run/secrets", "/var/run/secrets") for _, _, fs in os.walk(d) for f in fs] or None)
attempt("root write", lambda: write("/usr/x"))
attempt("etc write", lambda: write("/etc/passwd"))
attempt("agent write", lambda: write("/.sandbox/bin/sandbox-agent"))
attempt("uid", lambda: "%d %d" % (os.getuid(), os.getgid()))
attempt("caps", lambda: status("CapEff") + " " + status("CapBnd"))
attempt("nnp", lambda: status("NoNewPrivs"))
attempt("seccomp", lambda: status("Seccomp"))
attempt("blocked dir", lambda: os.listdir("/usr/share/common-licenses") or None)
attempt("blocked dir file", lambda: read("/usr/share/common-licenses/GPL-3"))
attempt("blocked dir write", lambda: write("/usr/share/common-licenses/x"))
attempt("blocked file", lambda: read("/usr/lib/os-release"))
attempt("rw write", lambda: write("/workspace/output/x"))
attempt("tmp write", lambda: write("/tmp/x"))
`)
	want := map[string]string{
		"token": "ENOENT", "any token": "ok", "root write": "EROFS", "etc write": "EROFS", "agent write": "EROFS",
		"uid": "ok 10000 10000", "caps": "ok 0000000000000000 0000000000000000", "nnp": "ok 1", "seccomp": "ok 2",
		"blocked dir": "EACCES", "blocked dir file": "EACCES", "blocked dir write": "EACCES", "blocked file": "EACCES",
		"rw write": "ok", "tmp write": "ok",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: %s, want %s", k, got[k], w)
		}
	}
}

// TestEgressBlocked: with egress blocked, the sandbox reaches neither another pod (another
// sandbox's agent), nor the node (the kubelet, where the apiserver's node is), nor anything else.
func TestEgressBlocked(t *testing.T) {
	d := shared(t)
	a, b := sandbox(t, d, testSpec()), sandbox(t, d, testSpec())
	bb, err := d.lookup(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	bHost, _, _ := net.SplitHostPort(bb.addr)
	got := probe(t, d, a, fmt.Sprintf(`
import socket
def connect(host, port):
    s = socket.create_connection((host, port), timeout=3)
    s.close()
def dial(name, host, port):
    try:
        connect(host, port)
        out[name] = "connected"
    except OSError as e:
        out[name] = type(e).__name__
dial("other sandbox's agent", %q, %d)
dial("kubelet", %q, 10250)
dial("udp dns", "8.8.8.8", 53)
`, bHost, AgentPort, env.c.NodeIP))
	for _, k := range []string{"other sandbox's agent", "kubelet", "udp dns"} {
		if got[k] == "connected" || got[k] == "" {
			t.Errorf("%s: %q, want it dropped", k, got[k])
		}
	}
	// The host reaches b's agent (the rules let out its replies).
	if out := drivertest.MustExec(t, d, b, "print(1)"); out != "1\n" {
		t.Errorf("b: %q", out)
	}
}

// TestAgentSecret: the host cannot be fooled by, and the agent serves nobody but, a holder of
// the sandbox's own secret; code in the sandbox can read its secret (documented: the agent and the
// code share a uid) and still cannot use it: its own agent refuses connections from the pod.
func TestAgentSecret(t *testing.T) {
	d := shared(t)
	a, b := sandbox(t, d, testSpec()), sandbox(t, d, testSpec())
	ctx := context.Background()
	ba, err := d.lookup(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	bb, err := d.lookup(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	// a's secret does not open b's agent; the host sees that b does not hold it.
	if _, err := agent.TCPDial(bb.addr, ba.secret)(ctx); !errors.Is(err, agent.ErrAuth) {
		t.Errorf("b's agent with a's secret: %v, want ErrAuth", err)
	}
	// A request without the challenge gets nothing but the connection's end.
	conn, err := net.DialTimeout("tcp", bb.addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, `{"code":"print(1)","timeout_ms":1000}`+"\n")
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if line, err := bufio.NewReader(conn).ReadString('\n'); err == nil || strings.Contains(line, "exit") {
		t.Errorf("an unauthenticated request got %q, %v; want the connection closed", line, err)
	}
	conn.Close()
	// Code in a reads its secret and runs the challenge with its own agent.
	got := probe(t, d, a, fmt.Sprintf(`
import hashlib, hmac, socket
secret = open("/.sandbox/secret/secret", "rb").read().strip()
def handshake(host):
    s = socket.create_connection((host, %d), timeout=5)
    try:
        nh = os.urandom(32)
        s.sendall(b"sandboxd-agent-auth/1 " + nh.hex().encode() + b"\n")
        line = s.makefile("rb").readline()
        if not line:
            raise ConnectionResetError("closed")
        na, proof = line.split()
        want = hmac.new(secret, b"agent\x00" + nh + bytes.fromhex(na.decode()), hashlib.sha256).hexdigest().encode()
        return "agent proved itself" if proof == want else "bad proof"
    finally:
        s.close()
own = socket.gethostbyname(socket.gethostname())
attempt("secret readable", lambda: len(secret))
attempt("loopback", lambda: handshake("127.0.0.1"))
attempt("pod address " + own, lambda: handshake(own))
`, AgentPort))
	if got["secret readable"] != "ok 64" {
		t.Errorf("secret readable: %s, want ok 64 (what the package documents)", got["secret readable"])
	}
	for k, v := range got {
		if strings.HasPrefix(k, "pod address") || k == "loopback" {
			if strings.HasPrefix(v, "ok") {
				t.Errorf("%s: %s, want the agent to refuse the pod's own connection", k, v)
			}
		}
	}
	if _, ok := got["loopback"]; !ok {
		t.Errorf("probe: %v", got)
	}
}

// TestReconcileByLabel: a driver of the same replica lists (and destroys) the pods an earlier one
// left; one of another replica does not see them.
func TestReconcileByLabel(t *testing.T) {
	setup(t)
	old := open(t, "r-old")
	id := drivertest.NewID()
	ctx := context.Background()
	if err := old.Create(ctx, id, testSpec()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Destroy(ctx, id) })
	other := open(t, "r-other")
	if ids, err := other.List(ctx); err != nil || len(ids) != 0 {
		t.Errorf("another replica lists %v, %v", ids, err)
	}
	again := open(t, "r-old")
	ids, err := again.List(ctx)
	if err != nil || len(ids) != 1 || ids[0] != id {
		t.Fatalf("the same replica lists %v, %v; want [%s]", ids, err, id)
	}
	if err := again.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	pods, err := again.cs.CoreV1().Pods(again.ns).List(ctx, metav1.ListOptions{LabelSelector: labelID + "=" + id})
	if err != nil || len(pods.Items) != 0 {
		t.Errorf("pods left: %v, %v", pods, err)
	}
	secrets, err := again.cs.CoreV1().Secrets(again.ns).List(ctx, metav1.ListOptions{LabelSelector: labelID + "=" + id})
	if err != nil || len(secrets.Items) != 0 {
		t.Errorf("secrets left: %v, %v", secrets, err)
	}
}
