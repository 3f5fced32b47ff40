package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/k8stest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// applyManifest applies every document of the manifest deploy/kubernetes/NAME, its text changed
// only by the old/new pairs of replace (each old one must be there), with server-side apply (what `kubectl apply
// --server-side` does); it returns the objects applied, to delete.
func applyManifest(t *testing.T, c *k8stest.Cluster, name string, replace ...string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile("../../deploy/kubernetes/" + name)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	for i := 0; i+1 < len(replace); i += 2 {
		if !strings.Contains(text, replace[i]) {
			t.Fatalf("%s has no %q to replace", name, replace[i])
		}
	}
	text = strings.NewReplacer(replace...).Replace(text)
	dc, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc))
	var out []*unstructured.Unstructured
	for _, doc := range strings.Split(text, "\n---\n") {
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(js); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %s: %v", name, gvk, err)
		}
		ri := dc.Resource(m.Resource)
		applied, err := ri.Namespace(obj.GetNamespace()).Apply(context.Background(), obj.GetName(), obj, metav1.ApplyOptions{FieldManager: "sandboxd-e2e", Force: true})
		if err != nil {
			t.Fatalf("%s: apply %s %s: %v", name, gvk.Kind, obj.GetName(), err)
		}
		out = append(out, applied)
		t.Logf("applied %s: %s %s/%s", name, gvk.Kind, obj.GetNamespace(), obj.GetName())
	}
	return out
}

// TestDeployManifests: sandboxd deployed into the cluster as deploy/kubernetes says — PostgreSQL
// (postgres.yaml), the replicas' identity (rbac.yaml, applied by kubeSetup) and the StatefulSet of
// two API replicas (sandboxd.yaml) running the cluster image (sandboxd cluster-image), the
// manifests as they are but for their placeholders — serves the API end to end from inside the
// cluster: the seed's example created through one replica and run through the other, a sandbox
// with open egress that reaches neither the replicas nor their Services (nor PostgreSQL's), the Free
// plan's quota atomic across them under parallel creates, and a replica killed mid-run (its
// process SIGKILLed, its pod force-deleted) loses no record: its run ends as an error naming
// the lost replica, its sandbox's pod is destroyed, the StatefulSet replaces it and the new
// replica serves.
func TestDeployManifests(t *testing.T) {
	kubeOnly(t, "sandboxd deployed into the test cluster by its manifests")
	k := kubeSetup(t)
	ctx := context.Background()
	ns := e2eNamespace
	pgHostURL, pgServiceURL := deployPostgres(t, k.cluster, k.cs, ns)

	// The operator's part: the config (images by cluster reference, what the kubelet sets, a host-id
	// range of its own — the pass's other servers use the eight parts below it), the store's URL.
	conf, err := json.Marshal(map[string]any{
		"images":         []any{map[string]any{"name": "agentcop/agent-sandbox:latest", "default": true}},
		"cluster_images": map[string]any{"agentcop/agent-sandbox:latest": map[string]any{"ref": k.imageRef}},
		"kubelet":        map[string]any{"pod_pids_limit": k8stest.PodPidsLimit, "single_process_oom_kill": true},
		"ids":            map[string]any{"first": 1<<30 + 8*512*driver.IDsPerSandbox, "sandboxes": 512},
		"warm_pool":      0,
		// The pods' egress gateways resolve from static records (the test cluster has no kube-dns).
		"egress": map[string]any{"static_hosts": map[string]any{"example.test": []string{"203.0.113.250"}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "sandboxd-config", Namespace: ns}, Data: map[string]string{"config.json": string(conf)}}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sandboxd-store", Namespace: ns}, StringData: map[string]string{"url": pgServiceURL}}
	if _, err := k.cs.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.cs.CoreV1().Secrets(ns).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var ids sync.Map // the test's sandboxes: their pods are deleted at the end, whatever happened
	t.Cleanup(func() {
		prop := metav1.DeletePropagationForeground
		del := metav1.DeleteOptions{PropagationPolicy: &prop}
		k.cs.AppsV1().StatefulSets(ns).Delete(ctx, "sandboxd", del)
		k.cs.CoreV1().Services(ns).Delete(ctx, "sandboxd", del)
		k.cs.PolicyV1().PodDisruptionBudgets(ns).Delete(ctx, "sandboxd", del)
		k.cs.CoreV1().ConfigMaps(ns).Delete(ctx, "sandboxd-config", del)
		k.cs.CoreV1().Secrets(ns).Delete(ctx, "sandboxd-store", del)
		waitfor.True(t, 2*time.Minute, func() bool {
			pods, err := k.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sandboxd"})
			return err == nil && len(pods.Items) == 0
		})
		ids.Range(func(id, _ any) bool {
			sel := metav1.ListOptions{LabelSelector: "sandboxd/id=" + id.(string)}
			k.cs.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, sel)
			k.cs.CoreV1().Secrets(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, sel)
			return true
		})
	})
	// Pods reach the apiserver and PostgreSQL by their Services once kube-proxy serves them.
	for _, svc := range []struct{ ns, name string }{{"default", "kubernetes"}, {ns, "postgres"}} {
		s, err := k.cs.CoreV1().Services(svc.ns).Get(ctx, svc.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		waitfor.True(t, time.Minute, func() bool { return k.cluster.ServiceProgrammed(s.Spec.ClusterIP, "tcp", int(s.Spec.Ports[0].Port)) })
	}

	started := time.Now()
	applyManifest(t, k.cluster, "sandboxd.yaml", "sandboxd-image", k.agentRef, "namespace: sandboxes", "namespace: "+ns)
	awaitReplicas(t, k, ns, 2)
	t.Logf("two replicas ready %v after the StatefulSet was applied", time.Since(started).Round(100*time.Millisecond))

	// The replicas, at their pod IPs (the host reaches pods, not Services).
	replica := func(i int) *server {
		p, err := k.cs.CoreV1().Pods(ns).Get(ctx, "sandboxd-"+strconv.Itoa(i), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return &server{t: t, url: "http://" + p.Status.PodIP + ":8080"}
	}
	a, b := replica(0), replica(1)
	for _, s := range []*server{a, b} {
		if st, m := s.do("GET", "/health", "", nil); st != 200 {
			t.Fatalf("health of %s: %d %v", s.url, st, m)
		}
	}
	key := keyFor(t, pgHostURL, "e2e-deploy", "free")

	// The seed's example: created through A, run and deleted through B.
	id := a.createReady(key, map[string]any{"agent_id": "data-processor", "mode": "container",
		"config": map[string]any{"image": "agentcop/agent-sandbox:latest",
			"filesystem": map[string]any{"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/output"}, "blocked": []string{"/etc", "/root"}},
			"network":    map[string]any{"block_outbound": true},
			"resources":  map[string]any{"cpu": "0.5", "memory": "512m", "timeout": 30}}})
	ids.Store(id, true)
	if r := b.run(key, id, "result = 6*7", 30); r["status"] != "completed" || r["result"] != float64(42) {
		t.Fatalf("run through B: %v", r)
	}
	if st, _ := b.do("DELETE", "/api/sandbox/"+id, key, nil); st != 204 {
		t.Fatalf("delete through B: %d", st)
	}

	// The replicas' pods and Services are the cluster's: a sandbox whose egress is open reaches
	// none of them (its pod's gateway denies the cluster's addresses), though a sandbox pod is in
	// their namespace. What counts is who answers: the gateway takes each connection, then closes
	// it, or, on port 80, answers 403 with its reason itself.
	id = a.createReady(key, map[string]any{"agent_id": "attacker", "config": map[string]any{"network": map[string]any{"block_outbound": false}}})
	ids.Store(id, true)
	sandboxdSvc, err := k.cs.CoreV1().Services(ns).Get(ctx, "sandboxd", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pgSvc, err := k.cs.CoreV1().Services(ns).Get(ctx, "postgres", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hostOf := func(u string) string { return strings.TrimSuffix(strings.TrimPrefix(u, "http://"), ":8080") }
	probe := fmt.Sprintf(`import socket
HTTP, PG = b"GET /health HTTP/1.0\r\n\r\n", bytes.fromhex("0000000804d2162f")  # PG: an SSLRequest
got = {}
for host, port, hello in [(%q, 8080, HTTP), (%q, 8080, HTTP), (%q, 80, HTTP), (%q, 5432, PG)]:
    try:
        c = socket.create_connection((host, port), timeout=3)
        c.settimeout(3)
        c.sendall(hello)
        answer = b""
        while len(answer) < 512:
            part = c.recv(512)
            if not part:
                break
            answer += part
        got["%%s:%%d" %% (host, port)] = answer.decode(errors="replace")
    except OSError as e:
        got["%%s:%%d" %% (host, port)] = ""
result = got`, hostOf(a.url), hostOf(b.url), sandboxdSvc.Spec.ClusterIP, pgSvc.Spec.ClusterIP)
	r := a.run(key, id, probe, 60)
	answers, _ := r["result"].(map[string]any)
	if r["status"] != "completed" || len(answers) != 4 {
		t.Fatalf("probe of the cluster's services from a sandbox: %v", r)
	}
	for target, answer := range answers {
		if a := answer.(string); a != "" && !(strings.HasPrefix(a, "HTTP/1.1 403") && strings.Contains(a, "denied: ")) {
			t.Errorf("a sandbox with open egress got an answer from %s: %q", target, answer)
		}
	}
	if st, _ := a.do("DELETE", "/api/sandbox/"+id, key, nil); st != 204 {
		t.Fatalf("delete the attacker: %d", st)
	}

	// The Free plan's 3 sandboxes, atomic across the replicas.
	codes, created := burst(t, []*server{a, b}, key, 20)
	for s, l := range created {
		for _, id := range l {
			ids.Store(id, true)
			s.do("DELETE", "/api/sandbox/"+id, key, nil)
		}
	}
	if codes[201]+codes[202] != 3 || codes[429] != 17 {
		t.Fatalf("status counts %v; want 3 created and 17×429", codes)
	}

	// A replica dies mid-run: SIGKILL (no clean stop), and its pod is gone (a lost node).
	id = a.createReady(key, map[string]any{"agent_id": "lost"})
	ids.Store(id, true)
	st, m := a.do("POST", "/api/sandbox/"+id+"/run", key, map[string]any{"code": "import time; time.sleep(60)", "async": true, "timeout": 120})
	if st != 202 {
		t.Fatalf("async run: %d %v", st, m)
	}
	runID := m["run_id"].(string)
	a.awaitRun(key, id, runID, "running")
	killServe(t, a.url)
	zero := int64(0)
	if err := k.cs.CoreV1().Pods(ns).Delete(ctx, "sandboxd-0", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var run map[string]any
	var polled time.Time
	waitfor.True(t, 3*time.Minute, func() bool {
		if time.Since(polled) < 500*time.Millisecond {
			return false
		}
		polled = time.Now()
		st, m := b.do("GET", "/api/sandbox/"+id+"/runs/"+runID, key, nil)
		run = m
		return st == 200 && run["status"] != "running"
	})
	t.Logf("the run was recorded ended %v after its replica was killed", time.Since(killed).Round(100*time.Millisecond))
	if e, _ := run["error"].(map[string]any); run["status"] != "error" || e["type"] != "ReplicaLost" || run["finished_at"] == nil {
		t.Fatalf("run of the killed replica: %v", run)
	}
	waitfor.True(t, 2*time.Minute, func() bool { return sandboxPods(t, id) == 0 })
	if _, sb := b.do("GET", "/api/sandbox/"+id, key, nil); sb["status"] != "destroyed" || sb["destroy_reason"] != "replica_lost" {
		t.Fatalf("sandbox of the killed replica: %v", sb)
	}

	// The StatefulSet's new sandboxd-0 is a new replica, and serves.
	awaitReplicas(t, k, ns, 2)
	a = replica(0)
	id = a.createReady(key, map[string]any{"agent_id": "after"})
	ids.Store(id, true)
	if r := a.run(key, id, "result = 6*7", 30); r["status"] != "completed" || r["result"] != float64(42) {
		t.Fatalf("run on the new replica: %v", r)
	}
	if st, _ := a.do("DELETE", "/api/sandbox/"+id, key, nil); st != 204 {
		t.Fatalf("delete on the new replica: %d", st)
	}
}

// awaitReplicas waits until the StatefulSet sandboxd has n ready replicas, all of its current
// pods; on a timeout it fails with its pods' states and logs.
func awaitReplicas(t *testing.T, k *kubeEnv, ns string, n int32) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		s, err := k.cs.AppsV1().StatefulSets(ns).Get(ctx, "sandboxd", metav1.GetOptions{})
		if err == nil && s.Status.ReadyReplicas == n && s.Status.Replicas == n && s.Status.ObservedGeneration == s.Generation {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("StatefulSet sandboxd: %v %+v\n%s", err, statusOf(s), replicaLogs(k, ns))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func statusOf(s *appsv1.StatefulSet) any {
	if s == nil {
		return nil
	}
	return s.Status
}

// replicaLogs are the states and log tails of the StatefulSet's pods (a failure's explanation).
func replicaLogs(k *kubeEnv, ns string) string {
	ctx := context.Background()
	pods, err := k.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sandboxd"})
	if err != nil {
		return err.Error()
	}
	var out strings.Builder
	tail := int64(40)
	for _, p := range pods.Items {
		fmt.Fprintf(&out, "pod %s: phase %s, conditions %+v, containers %+v\n", p.Name, p.Status.Phase, p.Status.Conditions, p.Status.ContainerStatuses)
		for _, prev := range []bool{false, true} {
			b, err := k.cs.CoreV1().Pods(ns).GetLogs(p.Name, &corev1.PodLogOptions{TailLines: &tail, Previous: prev}).DoRaw(ctx)
			if err != nil && !apierrors.IsBadRequest(err) {
				fmt.Fprintf(&out, "  logs (previous %v): %v\n", prev, err)
			}
			fmt.Fprintf(&out, "  logs (previous %v):\n%s\n", prev, b)
		}
	}
	return out.String()
}

// killServe SIGKILLs the sandboxd serve process advertising url (a pod's: the host sees the pods'
// processes), as a crash or a lost node ends it: no clean stop.
func killServe(t *testing.T, url string) {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 1 && args[0] == "/sandboxd" && args[1] == "serve" && strings.Contains(string(b), "--advertise="+url+"\x00") {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no sandboxd serve process advertises %s", url)
}
