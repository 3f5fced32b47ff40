package k8stest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/sandboxd/sandboxd/internal/waitfor"
)

func TestMain(m *testing.M) {
	code := m.Run()
	Stop()
	os.Exit(code)
}

// TestStartReclaimsLeftovers: a test process killed before its Stop leaves its state directory
// (with mounts under it) and, when it was killed before it wrote the lock file — or a later
// holder's teardown of it failed and the next holder wrote its own name there — no record of it.
// Start, under the lock, tears down every cluster state directory it finds. It must run before
// any other test of the package starts the cluster (it is the first in the file).
func TestStartReclaimsLeftovers(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("k8stest: root is needed under CI")
		}
		t.Skip("needs root (a bind mount)")
	}
	mu.Lock()
	started := current != nil || startErr != nil
	mu.Unlock()
	if started {
		t.Fatal("the cluster was started before this test: run it first (-run TestStartReclaimsLeftovers)")
	}
	left, err := os.MkdirTemp("", "sandboxd-k8s-")
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	point := filepath.Join(left, "kubelet", "pods", "uid", "volumes", "v")
	if err := os.MkdirAll(point, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(src, point, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(point, syscall.MNT_DETACH); os.RemoveAll(left) })
	// A killed cluster's kube-proxy left its table; a chain kube-proxy would not delete marks it
	// (the new cluster's kube-proxy makes a table of the same name).
	for _, args := range [][]string{{"add", "table", "ip", "kube-proxy"}, {"add", "chain", "ip", "kube-proxy", leftoverChain}} {
		if out, err := exec.Command("nft", args...).CombinedOutput(); err != nil {
			t.Fatalf("nft %v: %v: %s", args, err, out)
		}
	}
	Start(t)
	if out, err := exec.Command("nft", "list", "chain", "ip", "kube-proxy", leftoverChain).CombinedOutput(); err == nil {
		t.Errorf("the leftover kube-proxy table is still there: %s", out)
	}
	if _, err := os.Lstat(left); !os.IsNotExist(err) {
		t.Errorf("the leftover state dir %s is still there (%v)", left, err)
	}
	for _, m := range mountPoints() {
		if strings.HasPrefix(m, left+"/") {
			t.Errorf("the leftover mount %s is still there", m)
		}
	}
	if _, err := os.Stat(filepath.Join(src, "f")); err != nil {
		t.Errorf("the bind mount's source was touched: %v", err)
	}
}

// leftoverChain marks a kube-proxy table left by a killed cluster (TestStartReclaimsLeftovers).
const leftoverChain = "sandboxd-k8stest-leftover"

// python starts the cluster and imports $SANDBOXD_ROOTFS (python3): a client and the pinned image.
func python(t *testing.T) (*Cluster, *kubernetes.Clientset, string) {
	t.Helper()
	rootfs := os.Getenv("SANDBOXD_ROOTFS")
	if rootfs == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("k8stest: SANDBOXD_ROOTFS must be set under CI")
		}
		t.Skip("SANDBOXD_ROOTFS is not set (SANDBOXD_ROOTFS=$(scripts/build-image.sh))")
	}
	c := Start(t)
	t.Logf("cluster started in %v (node %s at %s, pods in %s)", c.StartDuration.Round(time.Millisecond), c.NodeName, c.NodeIP, c.CNIBridgeCIDR)
	t0 := time.Now()
	img := c.ImportImage(t, rootfs, "sandboxd.invalid/k8stest/python:1")
	t.Logf("ImportImage(%s) = %s in %v", rootfs, img, time.Since(t0).Round(time.Millisecond))
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	return c, cs, img
}

// pod is a pod of ours: one container running cmd, never restarted, no service-account token,
// the image never pulled.
func pod(name, image string, cmd ...string) *corev1.Pod {
	no, zero := false, int64(0)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  &no,
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name: "main", Image: image, ImagePullPolicy: corev1.PullNever, Command: cmd,
			}},
		},
	}
}

// run creates p and waits until it is in a phase of want (or Failed); it returns the pod and
// how long creation to that phase took.
func run(t *testing.T, cs *kubernetes.Clientset, p *corev1.Pod, want ...corev1.PodPhase) (*corev1.Pod, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w, err := cs.CoreV1().Pods("default").Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", p.Name).String()})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	t0 := time.Now()
	if _, err := cs.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().Pods("default").Delete(context.Background(), p.Name, metav1.DeleteOptions{})
	})
	for ev := range w.ResultChan() {
		got, ok := ev.Object.(*corev1.Pod)
		if !ok {
			continue
		}
		for _, ph := range want {
			if got.Status.Phase == ph {
				return got, time.Since(t0)
			}
		}
		if got.Status.Phase == corev1.PodFailed {
			t.Fatalf("pod %s failed: %+v", p.Name, got.Status)
		}
	}
	t.Fatalf("pod %s: not %v within the timeout", p.Name, want)
	return nil, 0
}

func TestPodRunsPython(t *testing.T) {
	_, cs, img := python(t)
	_, took := run(t, cs, pod("print", img, "python3", "-c", "print(1)"), corev1.PodSucceeded)
	t.Logf("create → Succeeded: %v", took.Round(time.Millisecond))
	logs, err := cs.CoreV1().Pods("default").GetLogs("print", &corev1.PodLogOptions{}).DoRaw(context.Background())
	if err != nil {
		t.Fatalf("logs: %v", err)
	}
	if string(logs) != "1\n" {
		t.Fatalf("log %q, want %q", logs, "1\n")
	}
}

func TestHostReachesPod(t *testing.T) {
	_, cs, img := python(t)
	p, took := run(t, cs, pod("http", img, "python3", "-m", "http.server", "8000"), corev1.PodRunning)
	t.Logf("create → Running: %v (pod IP %s)", took.Round(time.Millisecond), p.Status.PodIP)
	var body string
	ok := waitfor.Until(time.Minute, func() bool {
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + p.Status.PodIP + ":8000/")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		body = string(b)
		return resp.StatusCode == http.StatusOK
	})
	if !ok || !strings.Contains(body, "Directory listing") {
		t.Fatalf("GET http://%s:8000/: ok=%v body %.200q", p.Status.PodIP, ok, body)
	}
}

// A pod's code is hostile: from the pods' network it must not reach etcd (loopback only: the
// cluster's whole state) at any of the host's addresses it can route to (the node's, the
// bridge's), nor the kubelet's API without a client certificate of the cluster's CA, nor
// anything through the service range it has a route to (the host's route there is unreachable).
func TestPodCannotReachClusterState(t *testing.T) {
	c, cs, img := python(t)
	gateway, _, _ := strings.Cut(c.CNIBridgeCIDR, "/")
	gateway = strings.TrimSuffix(gateway, "0") + "1" // x.y.z.0/24 → x.y.z.1, the bridge's address
	probe := fmt.Sprintf(`
import socket, ssl, urllib.request, urllib.error
for host in (%[1]q, %[4]q):
    try:
        socket.create_connection((host, %[2]d), timeout=5); print("etcd: connected")
    except OSError as e:
        print("etcd: not connected:", repr(e))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
try:
    urllib.request.urlopen("https://%[1]s:%[3]d/pods", context=ctx, timeout=5); print("kubelet: 200")
except urllib.error.HTTPError as e:
    print("kubelet: %%d" %% e.code)
except Exception as e:
    print("kubelet: not connected:", repr(e))
for name, host, port in (("service", "10.96.0.255", 443), ("service port", %[5]q, 80)):
    try:
        socket.create_connection((host, port), timeout=5); print(name + ": connected")
    except OSError as e:
        print(name + ": not connected:", repr(e))
`, c.NodeIP, c.etcdPort, c.kubeletPort, gateway, kubernetesService)
	run(t, cs, pod("probe", img, "python3", "-c", probe), corev1.PodSucceeded)
	logs, err := cs.CoreV1().Pods("default").GetLogs("probe", &corev1.PodLogOptions{}).DoRaw(context.Background())
	if err != nil {
		t.Fatalf("logs: %v", err)
	}
	t.Logf("the pod's probe:\n%s", logs)
	lines := strings.Split(strings.TrimSpace(string(logs)), "\n")
	// The service range is routed to the host. What kube-proxy does not serve there — an address
	// no Service has (the range's broadcast address is never allocated), a Service's address at
	// a port it does not serve — meets the host's unreachable route for the range
	// (EHOSTUNREACH): nothing is forwarded beyond the host.
	if len(lines) != 5 || !strings.HasPrefix(lines[0], "etcd: not connected") || !strings.HasPrefix(lines[1], "etcd: not connected") ||
		!(lines[2] == "kubelet: 401" || strings.HasPrefix(lines[2], "kubelet: not connected")) ||
		!strings.HasPrefix(lines[3], "service: not connected: OSError(113") ||
		!strings.HasPrefix(lines[4], "service port: not connected: OSError(113") {
		t.Fatalf("probe said %q, want etcd not connected, the kubelet refusing (401) or not connected, "+
			"an unallocated service IP and a service's unserved port unreachable at the host", logs)
	}
}

// TestPodReachesService: a pod reaches another pod's server through its ClusterIP Service
// (kube-proxy's DNAT and masquerade on the host; both pods on the bridge).
func TestPodReachesService(t *testing.T) {
	c := Start(t)
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	server := pod("web", PauseImage, "/busybox", "sh", "-c",
		"/busybox mkdir -p /www && echo hello-from-web >/www/index.html && exec /busybox httpd -f -p 8080 -h /www")
	server.Labels = map[string]string{"app": "web"}
	run(t, cs, server, corev1.PodRunning)
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().Services("default").Delete(context.Background(), "web", metav1.DeleteOptions{})
	})
	t0 := time.Now()
	if !waitfor.Until(time.Minute, func() bool { return c.ServiceProgrammed(svc.Spec.ClusterIP, "tcp", 80) }) {
		t.Fatalf("kube-proxy did not program %s:80 within a minute", svc.Spec.ClusterIP)
	}
	t.Logf("Service %s:80 created → programmed: %v", svc.Spec.ClusterIP, time.Since(t0).Round(time.Millisecond))
	// busybox's wget needs files the image lacks (it crashes): a request through nc.
	run(t, cs, pod("fetch", PauseImage, "/busybox", "sh", "-c",
		`printf 'GET / HTTP/1.0\r\n\r\n' | /busybox nc -w 10 `+svc.Spec.ClusterIP+` 80`), corev1.PodSucceeded)
	logs, err := cs.CoreV1().Pods("default").GetLogs("fetch", &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		t.Fatalf("logs: %v", err)
	}
	// The container's log is lines: the response's CRLFs read as LFs.
	if !strings.HasPrefix(string(logs), "HTTP/1.1 200 OK\n") || !strings.HasSuffix(string(logs), "\n\nhello-from-web\n") {
		t.Fatalf("GET http://%s/ from a pod: %q, want 200 and hello-from-web", svc.Spec.ClusterIP, logs)
	}
}

// TestPodReachesAPIServer: a pod reaches the apiserver as rest.InClusterConfig does — at
// $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (the kubernetes Service), verifying its
// certificate with the service account's ca.crt — and is refused without a token (anonymous
// auth is off), known with its service account's token.
func TestPodReachesAPIServer(t *testing.T) {
	_, cs, img := python(t)
	probe := `
import json, os, ssl, urllib.request, urllib.error
d = "/var/run/secrets/kubernetes.io/serviceaccount/"
ctx = ssl.create_default_context(cafile=d + "ca.crt")
token = open(d + "token").read().strip()
base = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
def get(path, token=None):
    req = urllib.request.Request(base + path)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return [r.status, json.load(r)]
    except urllib.error.HTTPError as e:
        return [e.code, None]
print(json.dumps({"base": base, "anonymous": get("/version")[0], "version": get("/version", token),
                  "pods": get("/api/v1/namespaces/kube-system/pods", token)[0]}))
`
	p := pod("incluster", img, "python3", "-c", probe)
	yes := true
	p.Spec.AutomountServiceAccountToken = &yes
	run(t, cs, p, corev1.PodSucceeded)
	logs, err := cs.CoreV1().Pods("default").GetLogs("incluster", &corev1.PodLogOptions{}).DoRaw(context.Background())
	if err != nil {
		t.Fatalf("logs: %v", err)
	}
	t.Logf("the pod's probe: %s", logs)
	var got struct {
		Base      string
		Anonymous int
		Version   []json.RawMessage
		Pods      int
	}
	if err := json.Unmarshal(logs, &got); err != nil {
		t.Fatalf("probe said %q: %v", logs, err)
	}
	var version struct{ GitVersion string }
	if len(got.Version) == 2 {
		_ = json.Unmarshal(got.Version[1], &version)
	}
	// 403: the token names the default service account, which may not list kube-system's pods.
	if got.Base != "https://"+kubernetesService+":443" || got.Anonymous != http.StatusUnauthorized ||
		len(got.Version) != 2 || string(got.Version[0]) != "200" || version.GitVersion == "" || got.Pods != http.StatusForbidden {
		t.Fatalf("probe said %s; want base https://%s:443, anonymous 401, /version 200 with a gitVersion, pods 403", logs, kubernetesService)
	}
}

// Stop leaves nothing: run last (it stops the process's cluster, with a pod still running).
func TestStopLeavesNothing(t *testing.T) {
	c := Start(t)
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	run(t, cs, pod("sleeper", PauseImage, "/busybox", "sleep", "1000"), corev1.PodRunning)
	dir := c.dir
	pids := pidsNaming(dir)
	for _, p := range c.procs {
		pids = append(pids, p.cmd.Process.Pid)
	}
	veths, _ := os.ReadDir("/sys/class/net/" + BridgeName + "/brif")
	if len(veths) == 0 {
		t.Fatalf("no veth on %s with a pod running", BridgeName)
	}
	before := c.before
	// Stop, but keep the host-wide lock until checked: another test process may start its
	// cluster (the same bridge, cgroup root, …) as soon as it is released.
	mu.Lock()
	defer mu.Unlock()
	current = nil
	defer c.unlock()
	if err := c.shutdown(); err != nil {
		t.Errorf("stop: %v", err)
	}

	var left []string
	// A killed shim is reparented to init (or a subreaper), which reaps it when it gets to it:
	// an exited process not yet reaped (a zombie) has left, whoever reaps it.
	waitfor.Until(10*time.Second, func() bool {
		for _, pid := range pids {
			if _, ok := running(pid); ok {
				return false
			}
		}
		return true
	})
	for _, pid := range pids {
		if stat, ok := running(pid); ok {
			left = append(left, fmt.Sprintf("process %d: %s", pid, stat))
		}
	}
	for _, pid := range pidsNaming(dir) {
		left = append(left, fmt.Sprintf("process %d naming %s", pid, dir))
	}
	for _, m := range mountPoints() {
		if strings.HasPrefix(m, dir) {
			left = append(left, "mount "+m)
		}
	}
	if _, err := os.Lstat(dir); err == nil {
		left = append(left, "state directory "+dir)
	}
	if ents, err := os.ReadDir(cniResults); err == nil {
		for _, e := range ents {
			left = append(left, "CNI result "+e.Name())
		}
	}
	if _, err := os.Lstat("/sys/class/net/" + BridgeName); err == nil {
		left = append(left, "bridge "+BridgeName)
	}
	if out, _ := exec.Command("ip", "route", "show", "exact", serviceCIDR, "proto", serviceRouteProto).Output(); len(strings.TrimSpace(string(out))) > 0 {
		left = append(left, "route "+strings.TrimSpace(string(out)))
	}
	for _, v := range veths {
		if _, err := os.Lstat("/sys/class/net/" + v.Name()); err == nil {
			left = append(left, "veth "+v.Name())
		}
	}
	for _, m := range cgroupMounts() {
		if _, err := os.Lstat(filepath.Join(m, CgroupRoot)); err == nil {
			left = append(left, "cgroup "+filepath.Join(m, CgroupRoot))
		}
	}
	after := snapshotHost()
	for k, v := range before.Sysctls {
		if after.Sysctls[k] != v {
			left = append(left, fmt.Sprintf("sysctl %s=%s (was %s)", k, after.Sysctls[k], v))
		}
	}
	for _, d := range before.Missing {
		if _, err := os.Lstat(d); err == nil {
			left = append(left, "directory "+d)
		}
	}
	if tables, err := leftProxyTables(); err != nil || len(tables) > 0 {
		left = append(left, fmt.Sprintf("kube-proxy's nftables tables %v (%v)", tables, err))
	}
	for _, cmd := range [][]string{{"iptables-save"}, {"nft", "list", "ruleset"}} {
		out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
		if err != nil {
			continue // no such tool: no such rules
		}
		for _, l := range strings.Split(string(out), "\n") {
			for _, s := range []string{BridgeName, c.CNIBridgeCIDR, "KUBE-", "CNI-", "kube-proxy", serviceCIDR} {
				if strings.Contains(l, s) {
					left = append(left, fmt.Sprintf("%s: %s", cmd[0], l))
				}
			}
		}
	}
	if len(left) > 0 {
		t.Fatalf("left after Stop:\n%s", strings.Join(left, "\n"))
	}
}

// running reports whether process pid exists and has not exited (a zombie has), with its
// /proc/<pid>/stat line to name it.
func running(pid int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", false
	}
	stat := strings.TrimSpace(string(b))
	// The state follows the command's name, which ends at the last ')'.
	if i := strings.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 && strings.ContainsRune("ZXx", rune(stat[i+2])) {
		return stat, false
	}
	return stat, true
}
