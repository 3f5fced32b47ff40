package e2e

// The deploy manifests of deploy/kubernetes, applied as they are to the test cluster (the
// kubernetes pass only).

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sandboxd/sandboxd/internal/k8stest"
	"github.com/sandboxd/sandboxd/internal/store"
	"github.com/sandboxd/sandboxd/internal/store/postgres"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// postgresReady bounds how long PostgreSQL's pod may take to be Ready: the image's import, initdb
// and the server's start, on a loaded 2-core host.
const postgresReady = 3 * time.Minute

// kubeOnly skips t outside the kubernetes pass: it tests what runs on the cluster.
func kubeOnly(t *testing.T, why string) {
	t.Helper()
	if !onKubernetes {
		t.Skipf("kubernetes only (SANDBOXD_E2E_DRIVER=kubernetes runs it): %s", why)
	}
}

// deployPostgres deploys PostgreSQL in ns as an operator does: the image
// ($SANDBOXD_POSTGRES_ROOTFS, scripts/build-image.sh postgres) imported, the Secret `postgres`
// with a random password, and deploy/kubernetes/postgres.yaml applied as it is, but for its image
// placeholder and namespace. The test cluster has no storage provisioner, so a PersistentVolume
// (a host directory, bound to the StatefulSet's claim) stands in for one. It waits for the pod to
// be Ready and returns the superuser's URLs at the pod's IP (the host reaches it, so do the pods)
// and at the Service's ClusterIP (what pods use; the host cannot reach ClusterIPs: kube-proxy
// serves them to pods). Everything is deleted when t ends.
func deployPostgres(t *testing.T, c *k8stest.Cluster, cs kubernetes.Interface, ns string) (hostURL, serviceURL string) {
	t.Helper()
	rootfs := os.Getenv("SANDBOXD_POSTGRES_ROOTFS")
	if rootfs == "" {
		why := "needs SANDBOXD_POSTGRES_ROOTFS (scripts/build-image.sh postgres; make test sets it)"
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but %s", why)
		}
		t.Skip(why)
	}
	ref := c.ImportImage(t, rootfs, "sandboxd.invalid/postgres:e2e")
	ctx, cancel := context.WithTimeout(context.Background(), postgresReady)
	defer cancel()
	pw := make([]byte, 24)
	if _, err := rand.Read(pw); err != nil {
		t.Fatal(err)
	}
	password := hex.EncodeToString(pw)

	// The volume: a host directory owned by the image's postgres (hostPath has no fsGroup).
	dir, err := os.MkdirTemp("", "sandboxd-e2e-postgres-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 999, 999); err != nil {
		t.Fatal(err)
	}
	pvName := "sandboxd-e2e-postgres-" + ns
	t.Cleanup(func() { undeployPostgres(t, cs, ns, pvName, dir) })
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("10Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			// The StatefulSet's claim for its pod postgres-0, and no other.
			ClaimRef: &corev1.ObjectReference{Namespace: ns, Name: "data-postgres-0"},
			PersistentVolumeSource: corev1.PersistentVolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: dir, Type: ptr(corev1.HostPathDirectory)},
			},
		},
	}
	if _, err := cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatalf("persistent volume: %v", err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "postgres", Namespace: ns},
		StringData: map[string]string{"password": password}}
	if _, err := cs.CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatalf("secret: %v", err)
	}

	applyManifest(t, c, "postgres.yaml", "image: postgres-image", "image: "+ref, "namespace: sandboxes", "namespace: "+ns)
	svc, err := cs.CoreV1().Services(ns).Get(ctx, "postgres", metav1.GetOptions{})
	if err != nil || svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone {
		t.Fatalf("postgres.yaml: no Service postgres with a cluster IP: %v %+v", err, svc)
	}
	ip := waitPostgresReady(t, cs, ns, "")
	u := func(host string) string {
		return fmt.Sprintf("postgres://postgres:%s@%s:5432/postgres?sslmode=disable", password, host)
	}
	return u(ip), u(svc.Spec.ClusterIP)
}

// waitPostgresReady waits for ns's pod postgres-0 — one whose UID is not notUID — to be Ready and
// returns its IP; its state, events and log when it is not.
func waitPostgresReady(t *testing.T, cs kubernetes.Interface, ns string, notUID string) string {
	t.Helper()
	var pod *corev1.Pod
	ready := waitfor.Until(postgresReady, func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(context.Background(), "postgres-0", metav1.GetOptions{})
		if err != nil || string(p.UID) == notUID {
			return false
		}
		pod = p
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return p.Status.PodIP != ""
			}
		}
		return false
	})
	if !ready {
		var why strings.Builder
		if pod != nil {
			fmt.Fprintf(&why, "phase %s, conditions %+v, containers %+v\n", pod.Status.Phase, pod.Status.Conditions, pod.Status.ContainerStatuses)
			if log, err := cs.CoreV1().Pods(ns).GetLogs("postgres-0", &corev1.PodLogOptions{}).DoRaw(context.Background()); err == nil {
				fmt.Fprintf(&why, "log:\n%s\n", log)
			}
		}
		if evs, err := cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{}); err == nil {
			for _, e := range evs.Items {
				fmt.Fprintf(&why, "event %s/%s: %s: %s\n", e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
			}
		}
		t.Fatalf("postgres-0 not Ready within %s:\n%s", postgresReady, why.String())
	}
	return pod.Status.PodIP
}

// undeployPostgres deletes what deployPostgres made: the StatefulSet and its pod (gone before its
// volume goes), the Service, the Secret, the claim, the volume and its directory.
func undeployPostgres(t *testing.T, cs kubernetes.Interface, ns, pvName, dir string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	del := func(what string, err error) {
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete %s: %v", what, err)
		}
	}
	del("statefulset", cs.AppsV1().StatefulSets(ns).Delete(ctx, "postgres", metav1.DeleteOptions{}))
	del("pod", cs.CoreV1().Pods(ns).Delete(ctx, "postgres-0", metav1.DeleteOptions{}))
	if !waitfor.Until(time.Minute+30*time.Second, func() bool {
		_, err := cs.CoreV1().Pods(ns).Get(ctx, "postgres-0", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}) {
		t.Errorf("postgres-0 still there after its deletion")
	}
	del("service", cs.CoreV1().Services(ns).Delete(ctx, "postgres", metav1.DeleteOptions{}))
	del("secret", cs.CoreV1().Secrets(ns).Delete(ctx, "postgres", metav1.DeleteOptions{}))
	del("claim", cs.CoreV1().PersistentVolumeClaims(ns).Delete(ctx, "data-postgres-0", metav1.DeleteOptions{}))
	del("volume", cs.CoreV1().PersistentVolumes().Delete(ctx, pvName, metav1.DeleteOptions{}))
	if err := os.RemoveAll(dir); err != nil {
		t.Errorf("remove the volume's directory: %v", err)
	}
}

func ptr[T any](v T) *T { return &v }

// TestDeployPostgres: deploy/kubernetes/postgres.yaml's PostgreSQL serves the host with the
// Secret's password, sandboxd's store migrates on it, and its data outlives its pod (the claim).
func TestDeployPostgres(t *testing.T) {
	kubeOnly(t, "deploys deploy/kubernetes/postgres.yaml to the cluster")
	env := kubeSetup(t)
	ns := "sandboxd-e2e-postgres"
	ctx := context.Background()
	if _, err := env.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("namespace: %v", err)
	}
	start := time.Now()
	hostURL, serviceURL := deployPostgres(t, env.cluster, env.cs, ns)
	t.Logf("postgres-0 Ready in %.1f s; the pods' URL: %s", time.Since(start).Seconds(), redact(serviceURL))

	db, err := sql.Open("pgx", hostURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var one int
	var version, user string
	if err := db.QueryRowContext(ctx, "SELECT 1, current_setting('server_version'), current_user").Scan(&one, &version, &user); err != nil {
		t.Fatalf("SELECT 1 at %s: %v", redact(hostURL), err)
	}
	if one != 1 || !strings.HasPrefix(version, "15.") || user != "postgres" {
		t.Errorf("SELECT 1, version, user = %d, %q, %q; want 1, 15.x, postgres", one, version, user)
	}
	// The password is required: a wrong one is refused (scram-sha-256 from any host).
	wrong, err := url.Parse(hostURL)
	if err != nil {
		t.Fatal(err)
	}
	wrong.User = url.UserPassword("postgres", "wrong")
	bad, err := sql.Open("pgx", wrong.String())
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if err := bad.PingContext(ctx); err == nil || !strings.Contains(err.Error(), "password authentication failed") {
		t.Errorf("a wrong password: %v; want password authentication failed", err)
	}

	st, err := postgres.Open(ctx, hostURL)
	if err != nil {
		t.Fatalf("the store on the deployed PostgreSQL: %v", err)
	}
	if _, err := st.AccountByName(ctx, "nobody"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("AccountByName on a new store: %v; want ErrNotFound", err)
	}
	st.Close()
	var migrations int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM schema_version").Scan(&migrations); err != nil || migrations == 0 {
		t.Fatalf("schema_version: %d migrations, %v", migrations, err)
	}

	// A new pod (the StatefulSet's) on the same claim has the same data: the volume is the state.
	if _, err := db.ExecContext(ctx, "CREATE TABLE survives (v text); INSERT INTO survives VALUES ('yes')"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	old, err := env.cs.CoreV1().Pods(ns).Get(ctx, "postgres-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	restart := time.Now()
	if err := env.cs.CoreV1().Pods(ns).Delete(ctx, "postgres-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	ip := waitPostgresReady(t, env.cs, ns, string(old.UID))
	t.Logf("postgres-0 replaced and Ready in %.1f s", time.Since(restart).Seconds())
	newURL := strings.Replace(hostURL, "@"+old.Status.PodIP+":", "@"+ip+":", 1)
	db2, err := sql.Open("pgx", newURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	var v string
	if err := db2.QueryRowContext(ctx, "SELECT v FROM survives").Scan(&v); err != nil || v != "yes" {
		t.Fatalf("after a new pod: %q, %v; want the row written before", v, err)
	}
	// The old pod stopped cleanly (preStop's fast shutdown): the new one did not recover a crash.
	logs, err := env.cs.CoreV1().Pods(ns).GetLogs("postgres-0", &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(logs), "not properly shut down") || !strings.Contains(string(logs), "database system was shut down at") {
		t.Errorf("the new pod's log, after the old one's stop:\n%s", logs)
	}
}

// redact is a database URL without its password.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(a URL that does not parse)"
	}
	return u.Redacted()
}
