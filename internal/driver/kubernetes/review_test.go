package kubernetes

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/k8stest"
	service "github.com/sandboxd/sandboxd/internal/sandbox"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/sqlite"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// TestNodeProblems: a declaration without a pids limit or singleProcessOOMKill makes the
// kubelets unfit, saying what to declare; allow_spawn is refused when the pods' limit is above
// the sandbox's.
func TestNodeProblems(t *testing.T) {
	for _, c := range []struct {
		k    driver.KubeletLimits
		want []string
	}{
		{driver.KubeletLimits{PodPidsLimit: 256, SingleProcessOOMKill: true}, nil},
		{driver.KubeletLimits{PodPidsLimit: -1, SingleProcessOOMKill: true}, []string{"pod_pids_limit"}},
		{driver.KubeletLimits{SingleProcessOOMKill: true}, []string{"pod_pids_limit"}},
		{driver.KubeletLimits{PodPidsLimit: 256}, []string{"single_process_oom_kill"}},
		{driver.KubeletLimits{}, []string{"pod_pids_limit", "single_process_oom_kill"}},
	} {
		err := kubeletLimitsOf(c.k).err
		if (err == nil) != (len(c.want) == 0) {
			t.Errorf("%+v: %v, want problems with %q", c.k, err, c.want)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%+v: %v, want %q named", c.k, err, w)
			}
		}
	}
	fit := kubeletLimits{pids: 256}
	if err := fit.fit(true, 256); err != nil {
		t.Errorf("allow_spawn at the pods' limit: %v", err)
	}
	if err := fit.fit(false, 64); err != nil {
		t.Errorf("no allow_spawn below the pods' limit: %v", err)
	}
	if err := fit.fit(true, 64); !errors.Is(err, driver.ErrUnsupported) {
		t.Errorf("allow_spawn below the pods' limit: %v, want ErrUnsupported", err)
	}
	if err := (kubeletLimits{err: errors.New("no pids limit")}).fit(false, 256); err == nil {
		t.Error("an unfit node accepted")
	}
}

// TestPodEnd: what a pod's status says of its sandbox.
func TestPodEnd(t *testing.T) {
	term := func(reason string) corev1.ContainerStatus {
		return corev1.ContainerStatus{Name: "sandbox", State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 137, Reason: reason}}}
	}
	for _, c := range []struct {
		name   string
		status corev1.PodStatus
		gone   string
		oom    bool
	}{
		{"running", corev1.PodStatus{Phase: corev1.PodRunning, ContainerStatuses: []corev1.ContainerStatus{{Name: "sandbox",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}}}, "", false},
		{"oom killed", corev1.PodStatus{Phase: corev1.PodFailed, ContainerStatuses: []corev1.ContainerStatus{term("OOMKilled")}}, "OOM-killed", true},
		{"oom killed, pod still running", corev1.PodStatus{Phase: corev1.PodRunning, ContainerStatuses: []corev1.ContainerStatus{term("OOMKilled")}}, "OOM-killed", true},
		{"container died", corev1.PodStatus{Phase: corev1.PodFailed, ContainerStatuses: []corev1.ContainerStatus{term("Error")}}, "exit 137 Error", false},
		{"evicted", corev1.PodStatus{Phase: corev1.PodFailed, Reason: "Evicted", Message: "Usage of EmptyDir volume \"tmp\" exceeds the limit \"64Mi\"."}, "evicted", false},
		{"evicted, its container killed", corev1.PodStatus{Phase: corev1.PodFailed, Reason: "Evicted", ContainerStatuses: []corev1.ContainerStatus{term("Error")}}, "evicted", false},
	} {
		reason, oom := podEnd(&corev1.Pod{Status: c.status})
		if oom != c.oom || (c.gone == "") != (reason == "") || !strings.Contains(reason, c.gone) {
			t.Errorf("%s: %q oom=%v, want %q oom=%v", c.name, reason, oom, c.gone, c.oom)
		}
	}
}

// TestKubeletLimits: with the test cluster's kubelet declared (podPidsLimit, singleProcessOOMKill)
// Check passes; a sandbox with allow_spawn and a pids limit below the pods' is refused; a driver
// whose options declare nothing fails Check, saying what to declare.
func TestKubeletLimits(t *testing.T) {
	d := shared(t)
	ctx := context.Background()
	if err := d.Check(ctx); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if k := d.kubelets(ctx, true); k.pids != k8stest.PodPidsLimit || k.err != nil {
		t.Fatalf("kubelets: %+v, want pids %d", k, k8stest.PodPidsLimit)
	}
	o := env.opts
	o.Kubelet, o.Replica = driver.KubeletLimits{}, "undeclared"
	undeclared, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := undeclared.Check(ctx); err == nil || !strings.Contains(err.Error(), "pod_pids_limit") {
		t.Errorf("Check without a declaration: %v", err)
	}
	spec := testSpec()
	spec.AllowSpawn, spec.PidsLimit = true, 64
	err = d.Create(ctx, "sbx_pids"+strings.ToLower(fmt.Sprint(time.Now().UnixNano()%1e6)), spec)
	if !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "podPidsLimit") {
		t.Fatalf("allow_spawn with pids 64 under a podPidsLimit of %d: %v, want ErrUnsupported", k8stest.PodPidsLimit, err)
	}
}

// TestPidsBomb: a thread bomb and a fork bomb in a pod stop at the pod's pids limit, not at the
// node's (each stops by itself at 3000, which no pod may reach: the node's PIDs are not the
// test's to exhaust); the agent outlives both and runs the next run.
func TestPidsBomb(t *testing.T) {
	d := shared(t)
	spec := testSpec()
	spec.AllowSpawn = true
	id := sandbox(t, d, spec)
	res := drivertest.Exec(t, d, id, `
import os, threading
threading.stack_size(65536)
stop = threading.Event()
threads, terr, started = 0, "", []
try:
    while threads < 3000:
        th = threading.Thread(target=stop.wait, daemon=True)
        th.start()
        started.append(th)
        threads += 1
except Exception as e:
    terr = repr(e)
stop.set()
for th in started:
    th.join()
import signal
kids, ferr = [], ""
try:
    while len(kids) < 3000:
        pid = os.fork()
        if pid == 0:  # a small process (a forked Python's copied pages would reach the memory limit first)
            os.execv("/bin/sleep", ["sleep", "600"])
        kids.append(pid)
except Exception as e:
    ferr = repr(e)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
result = {"threads": threads, "terr": terr, "forks": len(kids), "ferr": ferr}
`, 2*time.Minute)
	var got struct {
		Threads, Forks int
		Terr, Ferr     string
	}
	if res.Status != driver.StatusCompleted || json.Unmarshal(res.Result, &got) != nil {
		t.Fatalf("bomb: %s %s %+v %s", res.Status, res.Stderr, res.Error, res.Result)
	}
	t.Logf("bomb: %+v", got)
	if got.Threads >= k8stest.PodPidsLimit || got.Terr == "" {
		t.Errorf("thread bomb started %d threads (%s), want it stopped below the pods' limit %d", got.Threads, got.Terr, k8stest.PodPidsLimit)
	}
	if got.Forks >= k8stest.PodPidsLimit || got.Forks < k8stest.PodPidsLimit/2 || !strings.Contains(got.Ferr, "BlockingIOError") {
		t.Errorf("fork bomb made %d processes (%s), want it stopped (EAGAIN) between half the pods' limit and the limit, %d", got.Forks, got.Ferr, k8stest.PodPidsLimit)
	}
	if res := drivertest.Exec(t, d, id, "print('after')", time.Minute); res.Status != driver.StatusCompleted || string(res.Stdout) != "after\n" {
		t.Fatalf("run after the bombs: %s %q %q", res.Status, res.Stdout, res.Stderr)
	}
}

// TestEvictedPodIsGone: a pod the cluster evicts (the eviction API, as a node drain does; its
// disk is a tmpfs, so filling it is ENOSPC, not the kubelet's eviction) makes the next Exec say
// the sandbox is gone (driver.ErrNotFound: a GoneError with why while the pod is still seen).
func TestEvictedPodIsGone(t *testing.T) {
	d := shared(t)
	id := sandbox(t, d, testSpec())
	drivertest.MustExec(t, d, id, "print(1)")
	admin, err := kubernetes.NewForConfig(env.c.Config)
	if err != nil {
		t.Fatal(err)
	}
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: objectName(id), Namespace: d.ns}}
	if err := admin.PolicyV1().Evictions(d.ns).Evict(context.Background(), ev); err != nil {
		t.Fatalf("evict: %v", err)
	}
	// The pod's grace is 0, so the object goes at once and the kubelet kills the containers when it
	// sees that: Exec runs until then.
	waitfor.True(t, 2*time.Minute, func() bool {
		_, err = d.Exec(context.Background(), id, driver.ExecRequest{Code: "print(1)", Timeout: time.Minute, MaxOutput: 1 << 20})
		return err != nil
	})
	if !errors.Is(err, driver.ErrNotFound) { // a GoneError saying why while the pod is still seen
		t.Fatalf("Exec in an evicted pod: %v, want ErrNotFound (the service then ends the sandbox)", err)
	}
	t.Logf("gone: %v", err)
}

// TestLostReplicaPodsDestroyed: the pods and Secrets of a replica declared lost — a sandbox with a
// record and a warm one without — are destroyed by the replica that declares it lost (its pods do
// not die with its host), and nothing of the sweeper's own is touched.
func TestLostReplicaPodsDestroyed(t *testing.T) {
	setup(t)
	ctx := context.Background()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	_, acct, _, err := service.CreateKey(ctx, st, service.DefaultPlans(), "acme", "free")
	if err != nil {
		t.Fatal(err)
	}
	suffix := strings.ToLower(fmt.Sprint(time.Now().UnixNano() % 1e6))
	dead := open(t, "rep_dead"+suffix)
	if err := st.RegisterReplica(ctx, dead.replica, "http://dead"); err != nil {
		t.Fatal(err)
	}
	recorded, warm := "sbx_rec"+suffix, "sbx_warm"+suffix
	for _, id := range []string{recorded, warm} {
		if err := dead.Create(ctx, id, testSpec()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dead.Destroy(context.Background(), id) })
	}
	now := time.Now().UTC()
	if err := st.CreateSandbox(ctx, store.Sandbox{ID: recorded, AccountID: acct.ID, AgentID: "a", Mode: "container",
		Status: store.SandboxReady, CreatedAt: now, ExpiresAt: now.Add(time.Hour), Replica: dead.replica}, -1); err != nil {
		t.Fatal(err)
	}
	self := open(t, "rep_b"+suffix)
	svc, err := service.New(ctx, service.Config{DataDir: t.TempDir(),
		Images:  []service.Image{{Name: "agentcop/agent-sandbox:latest", Mode: "container", RootFS: env.rootfs, Default: true}},
		Replica: self.replica, Address: "http://rep_b", HeartbeatEvery: 100 * time.Millisecond, StaleAfter: time.Second,
	}, st, map[string]driver.Driver{"container": self})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close(context.Background()) })
	// The sweeper's own pod (made after its start, whose reconciliation destroys what it has no
	// record of), which must stay.
	own := sandbox(t, self, testSpec())
	waitfor.True(t, 5*time.Minute, func() bool {
		ids, err := dead.List(ctx)
		return err == nil && len(ids) == 0
	})
	rec, err := st.GetSandbox(ctx, "", recorded)
	if err != nil || rec.Status != store.SandboxDestroyed || rec.DestroyReason != service.ReasonReplicaLost {
		t.Fatalf("the lost replica's sandbox: %+v %v", rec, err)
	}
	if ids, err := self.List(ctx); err != nil || len(ids) != 1 || ids[0] != own {
		t.Fatalf("the sweeper's own sandboxes after the sweep: %v %v, want [%s]", ids, err, own)
	}
}
