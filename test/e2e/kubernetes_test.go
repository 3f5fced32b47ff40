package e2e

// The suite against a cluster: with SANDBOXD_E2E_DRIVER=kubernetes (make test runs the package a
// second time so), every server a test starts is two `sandboxd serve` replicas on one new
// PostgreSQL database (package pgtest), with --driver kubernetes on the test process's
// single-node cluster (package k8stest), and the test's requests alternate between them (server.do):
// what a client of a replicated service sees. The tests are the same; a test about the host's
// own machinery (its processes, cgroups, mounts, systemd, the WASM worker) says so with hostOnly
// and runs in the first pass only.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/k8stest"
	"github.com/sandboxd/sandboxd/internal/store/postgres/pgtest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// onKubernetes: this pass runs against the kubernetes driver.
var onKubernetes = os.Getenv("SANDBOXD_E2E_DRIVER") == "kubernetes"

// e2eNamespace is the namespace of the sandboxes' pods.
const e2eNamespace = "sandboxd-e2e"

// kubeEnv is the cluster every server of the pass uses.
type kubeEnv struct {
	cluster *k8stest.Cluster
	cs      kubernetes.Interface
	pg      *pgtest.Server
	tmp     string // the agent image's layout; removed at the end
	// kubeconfig has a token of deploy/kubernetes/rbac.yaml's service account: what the servers use.
	kubeconfig string
	agentRef   string // the cluster image (sandboxd cluster-image: the agent and sandboxd), pinned
	imageRef   string // the default image (SANDBOXD_ROOTFS), pinned
}

var (
	kubeLaunches atomic.Uint32 // servers launched in the pass (kubeArgs: their id ranges)
	kube         *kubeEnv
	kubeErr      error
	kubeOnce     sync.Once
)

// kubeSetup starts the cluster and PostgreSQL and imports the images, once per process.
func kubeSetup(t *testing.T) *kubeEnv {
	t.Helper()
	c := k8stest.Start(t)
	pg := pgtest.Shared(t)
	kubeOnce.Do(func() { kube, kubeErr = newKubeEnv(t, c, pg) })
	if kubeErr != nil {
		t.Fatalf("kubernetes setup: %v", kubeErr)
	}
	return kube
}

func newKubeEnv(t *testing.T, c *k8stest.Cluster, pg *pgtest.Server) (*kubeEnv, error) {
	tmp, err := os.MkdirTemp("", "sandboxd-e2e-k8s-")
	if err != nil {
		return nil, err
	}
	layout := filepath.Join(tmp, "cluster-image") // as an operator makes it, to push
	if out, err := exec.Command(filepath.Join(binDir, "sandboxd"), "cluster-image", "--out", layout).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("sandboxd cluster-image: %v: %s", err, out)
	}
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return nil, err
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: e2eNamespace}}
	if _, err := cs.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("namespace: %w", err)
	}
	kubeconfig, err := serviceAccountKubeconfig(t, c, cs, tmp)
	if err != nil {
		return nil, err
	}
	return &kubeEnv{cluster: c, cs: cs, pg: pg, tmp: tmp, kubeconfig: kubeconfig,
		agentRef: c.ImportImage(t, layout, "sandboxd.invalid/sandboxd:e2e"),
		imageRef: c.ImportImage(t, rootfs, "sandboxd.invalid/agent-sandbox:e2e")}, nil
}

// serviceAccountKubeconfig applies deploy/kubernetes/rbac.yaml as it is (its namespace made the
// pass's) and writes, in dir, a kubeconfig with a token of its service account: the servers of the
// pass have what an operator gives sandboxd, not the cluster's admin.
func serviceAccountKubeconfig(t *testing.T, c *k8stest.Cluster, cs kubernetes.Interface, dir string) (string, error) {
	ctx := context.Background()
	applyManifest(t, c, "rbac.yaml", "namespace: sandboxes", "namespace: "+e2eNamespace)
	hours := int64(6 * 3600)
	tok, err := cs.CoreV1().ServiceAccounts(e2eNamespace).CreateToken(ctx, "sandboxd",
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &hours}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("service account token: %w", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: c.Config.Host, CertificateAuthorityData: c.Config.CAData}
	cfg.AuthInfos["sandboxd"] = &clientcmdapi.AuthInfo{Token: tok.Status.Token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "sandboxd", Namespace: e2eNamespace}
	cfg.CurrentContext = "e2e"
	file := filepath.Join(dir, "sandboxd.kubeconfig")
	return file, clientcmd.WriteToFile(*cfg, file)
}

// stopKube stops what kubeSetup started (TestMain).
func stopKube() {
	k8stest.Stop()
	if kube != nil {
		os.RemoveAll(kube.tmp)
	}
}

// hostOnly skips t in the kubernetes pass: it tests the host's own machinery, which a cluster's
// node does not share with the service (why says what).
func hostOnly(t *testing.T, why string) {
	t.Helper()
	if onKubernetes {
		t.Skipf("host only (the first pass runs it): %s", why)
	}
}

// kubeArgs are serve's extra arguments args turned to the kubernetes driver: its flags, and the
// config file (the test's own, if it has one) with the default image's cluster reference added,
// written beside dataDir.
func kubeArgs(dataDir string, args []string) ([]string, error) {
	cfg := map[string]any{}
	if i := slices.Index(args, "--config"); i >= 0 && i+1 < len(args) {
		b, err := os.ReadFile(args[i+1])
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(b, &cfg); err != nil {
			return nil, fmt.Errorf("%s: %w", args[i+1], err)
		}
		args = slices.Delete(slices.Clone(args), i, i+2)
	}
	cfg["cluster_images"] = map[string]any{"agentcop/agent-sandbox:latest": map[string]any{"ref": kube.imageRef}}
	cfg["kubelet"] = map[string]any{"pod_pids_limit": k8stest.PodPidsLimit, "single_process_oom_kill": true} // k8stest's kubelet
	// Replicas on one cluster need disjoint id ranges (a pod's uid is its sandbox's): each server
	// of the pass gets its own.
	slot := uint32(kubeLaunches.Add(1) % 8)
	cfg["ids"] = map[string]any{"first": 1<<30 + slot*512*driver.IDsPerSandbox, "sandboxes": 512}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	file := filepath.Clean(dataDir) + "-kube.json"
	if err := os.WriteFile(file, b, 0o600); err != nil {
		return nil, err
	}
	// The test node has two cores: pods request a fiftieth of their CPU limit, so that the warm
	// pools of both replicas and the tests' sandboxes fit at once.
	return append(args, "--config", file, "--cpu-request", "0.02", "--driver", "kubernetes", "--kubeconfig", kube.kubeconfig,
		"--namespace", e2eNamespace, "--agent-image", kube.agentRef), nil
}

// launchReplicas is launch for the kubernetes pass: two replicas on a new database (unless extra
// names a store: the test makes its own replicas); the second one's data directory is dataDir's
// sibling.
func launchReplicas(t *testing.T, addr, dataDir string, extra ...string) (*server, error) {
	kubeSetup(t)
	if slices.Contains(extra, "--store") {
		return launchKube(addr, dataDir, extra...)
	}
	store := kube.pg.NewDatabase(t)
	extra = append(slices.Clone(extra), "--store", store)
	a, err := launchKube(addr, dataDir, extra...)
	if err != nil {
		return nil, err
	}
	b, err := launchKube(freeAddr(t), filepath.Clean(dataDir)+"-b", extra...)
	if err != nil {
		a.stop()
		return nil, err
	}
	a.store, a.peer = store, b
	return a, nil
}

// launchKube is launch with the kubernetes driver (kubeSetup first).
func launchKube(addr, dataDir string, extra ...string) (*server, error) {
	extra, err := kubeArgs(dataDir, extra)
	if err != nil {
		return nil, err
	}
	return launch(addr, dataDir, extra...)
}

// sandboxPods counts the pods of sandbox id in the cluster (the kubernetes pass's leak check).
func sandboxPods(t *testing.T, id string) int {
	t.Helper()
	pods, err := kube.cs.CoreV1().Pods(e2eNamespace).List(context.Background(),
		metav1.ListOptions{LabelSelector: "sandboxd/id=" + id})
	if err != nil {
		t.Fatalf("list pods: %v", err)
	}
	return len(pods.Items)
}

// removeKubeFiles removes what the kubernetes pass wrote beside s's data directory: the second
// replica's data directory and both config files (a no-op in the first pass).
func (s *server) removeKubeFiles() {
	for _, r := range []*server{s, s.peer} {
		if r != nil && onKubernetes {
			os.Remove(filepath.Clean(r.dataDir) + "-kube.json")
		}
	}
	if s.peer != nil {
		os.RemoveAll(s.peer.dataDir)
	}
}

// expiredPod is TestExpiry's check in the kubernetes pass: sandbox id (2 s) is recorded destroyed
// "expired", not before its expires_at, and its pod is gone.
func expiredPod(t *testing.T, s *server, id string) {
	t.Helper()
	if n := sandboxPods(t, id); n != 1 {
		t.Fatalf("sandbox %s has %d pods, want one", id, n)
	}
	var m map[string]any
	waitfor.True(t, 30*time.Second, func() bool {
		_, m = s.do("GET", "/api/sandbox/"+id, s.key, nil)
		return m["status"] == "destroyed"
	})
	exp, _ := time.Parse(time.RFC3339, m["expires_at"].(string))
	des, _ := time.Parse(time.RFC3339, m["destroyed_at"].(string))
	if m["destroy_reason"] != "expired" || des.Before(exp) {
		t.Fatalf("expired: %v", m)
	}
	if n := sandboxPods(t, id); n != 0 {
		t.Fatalf("%d pods of the expired sandbox remain", n)
	}
}

// TestMeasureCluster (SANDBOXD_MEASURE=1; make bench runs it): what a client sees of a sandbox on
// the cluster against one on this host, measured in the same run: create -> ready (no warm pool)
// and a print(1) run in a sandbox of each, p50 of n, over HTTP; the cluster's servers are two
// replicas on PostgreSQL (requests alternate between them), the host's one on SQLite.
func TestMeasureCluster(t *testing.T) {
	if os.Getenv("SANDBOXD_MEASURE") == "" {
		t.Skip("set SANDBOXD_MEASURE=1 to measure")
	}
	requireEnv(t)
	const n = 10
	local := startServerWith(t, t.TempDir(), "--warm-pool", "0")
	localCreate, localRun := measureServer(t, local, n)
	cluster, err := launchReplicas(t, freeAddr(t), t.TempDir(), "--warm-pool", "0")
	if err != nil {
		t.Fatal(err)
	}
	cluster.t = t
	t.Cleanup(func() { cluster.stop(); cluster.removeKubeFiles() })
	clusterCreate, clusterRun := measureServer(t, cluster, n)
	ratio := func(a, b time.Duration) float64 { return float64(a) / float64(b) }
	t.Logf("bench[cluster]: create -> ready p50 %v, local driver %v (%.1fx); print(1) run p50 %v, local driver %v (%.1fx) (n=%d, over HTTP)",
		clusterCreate.Round(time.Millisecond), localCreate.Round(time.Millisecond), ratio(clusterCreate, localCreate),
		clusterRun.Round(100*time.Microsecond), localRun.Round(100*time.Microsecond), ratio(clusterRun, localRun), n)
}

// measureServer returns the p50 of n creates (to ready; each deleted) and of n print(1) runs in
// one sandbox of s (after a first run).
func measureServer(t *testing.T, s *server, n int) (create, run time.Duration) {
	t.Helper()
	key := s.key
	var creates, runs []time.Duration
	for range n {
		t0 := time.Now()
		id := s.createReady(key, map[string]any{"agent_id": "bench"})
		creates = append(creates, time.Since(t0))
		if status, m := s.do("DELETE", "/api/sandbox/"+id, key, nil); status != 204 {
			t.Fatalf("delete: %d %v", status, m)
		}
	}
	id := s.create(key, nil)
	s.run(key, id, "print(1)", 30)
	for range n {
		t0 := time.Now()
		if r := s.run(key, id, "print(1)", 30); r["status"] != "completed" {
			t.Fatalf("run: %v", r)
		}
		runs = append(runs, time.Since(t0))
	}
	p50 := func(d []time.Duration) time.Duration { slices.Sort(d); return d[len(d)/2] }
	return p50(creates), p50(runs)
}
