package kubernetes

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/k8stest"
)

// The tests run real pods in the test process's cluster (package k8stest: $SANDBOXD_K8S, root),
// from the default image (scripts/build-image.sh, or $SANDBOXD_ROOTFS) and the agent image this
// package writes (WriteImage, without the server) of the sandbox-agent built from ./cmd/sandbox-agent; both are
// imported into the cluster's containerd. Without a cluster they skip, except under $CI.

func TestMain(m *testing.M) {
	code := m.Run()
	drivers.Close()
	if inet != nil {
		inet.Stop()
	}
	k8stest.Stop()
	if env != nil {
		os.RemoveAll(env.tmp) // the agent binary and image built for the tests
	}
	os.Exit(code)
}

// testEnv is what every test's driver shares: the cluster and the images in it.
type testEnv struct {
	c      *k8stest.Cluster
	tmp    string // removed at the end of the tests
	rootfs string
	opts   driver.Options // without Replica
}

var (
	envOnce sync.Once
	env     *testEnv
	envErr  error
	drivers drivertest.Drivers[*Driver]
)

const testNamespace = "sandboxd-test"

// setup starts the cluster (or skips t) and imports the images, once.
func setup(t testing.TB) *testEnv {
	t.Helper()
	c := k8stest.Start(t)
	envOnce.Do(func() { env, envErr = newEnv(t, c) })
	if envErr != nil {
		t.Fatalf("setup: %v", envErr)
	}
	return env
}

func newEnv(t testing.TB, c *k8stest.Cluster) (*testEnv, error) {
	repo, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return nil, err
	}
	root := filepath.Dir(strings.TrimSpace(string(repo)))
	tmp, err := os.MkdirTemp("", "sandboxd-k8s-driver-")
	if err != nil {
		return nil, err
	}
	agentBin := filepath.Join(tmp, "sandbox-agent")
	cmd := exec.Command("go", "build", "-o", agentBin, "./cmd/sandbox-agent")
	cmd.Dir, cmd.Env = root, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the agent: %v: %s", err, out)
	}
	layout := filepath.Join(tmp, "agent-image")
	if _, err := WriteImage(layout, agentBin, ""); err != nil {
		return nil, err
	}
	rootfs, err := drivertest.ImageRootFS(root)
	if err != nil {
		return nil, err
	}
	agentRef := c.ImportImage(t, layout, "sandboxd.invalid/sandbox-agent:test")
	imageRef := c.ImportImage(t, rootfs, "sandboxd.invalid/python:test")
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return nil, err
	}
	_, err = cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNamespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("namespace: %w", err)
	}
	return &testEnv{c: c, tmp: tmp, rootfs: rootfs, opts: driver.Options{
		Kubeconfig:    c.Kubeconfig,
		Namespace:     testNamespace,
		ClusterImages: map[string]driver.ClusterImage{rootfs: {Ref: imageRef}},
		AgentImage:    agentRef,
		Kubelet:       driver.KubeletLimits{PodPidsLimit: k8stest.PodPidsLimit, SingleProcessOOMKill: true}, // k8stest's kubelet
		// The test cluster has no cluster DNS (kube-system/kube-dns): the gateways resolve from
		// static records (the egress tests set their own).
		Resolver: egress.StaticResolver{"example.com": {netip.MustParseAddr("203.0.113.250")}},
	}}, nil
}

// open opens a driver of a replica of its own (state of its own: the pods it lists).
func open(t testing.TB, replica string) *Driver {
	t.Helper()
	e := setup(t)
	o := e.opts
	o.Replica = replica
	d, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// shared is the driver most tests share.
func shared(t testing.TB) *Driver {
	t.Helper()
	setup(t)
	return drivers.Get(t, "shared", func() (*Driver, error) { return open(t, "shared"), nil })
}

// testSpec is a sandbox of the service's defaults, but a fifth of a core: the pods' CPU
// requests must fit the test node's two cores (requests = limits) while a test holds several.
func testSpec() driver.Spec {
	return driver.Spec{RootFS: env.rootfs, CPU: 0.2, MemoryBytes: 256 << 20, PidsLimit: k8stest.PodPidsLimit, DiskBytes: 64 << 20,
		Network: egress.Policy{BlockOutbound: true}}
}

var harness = drivertest.Harness{
	Open: func(t *testing.T) driver.Driver { return open(t, "t-"+statedir.RandomHex(4)) },
	Reopen: func(t *testing.T, old driver.Driver) driver.Driver {
		return open(t, old.(*Driver).replica)
	},
	Spec:      func(t *testing.T) driver.Spec { setup(t); return testSpec() },
	Python:    true,
	Spawn:     true,
	Signals:   true,
	Egress:    true, // allow lists through the pod's gateway sidecar (egress_test.go tries them)
	Survives:  true, // the pods are the state; the secret is read back from the Secret
	ImageFile: "/usr/lib/os-release",
	// The pod's /tmp, working directory and paths are a tmpfs of the pod, not the spec's host
	// directories (a cluster's node is not the service's host): the suite shares files through
	// the driver's Filer (the files sidecar) and sizes /tmp with DiskBytes.
	NoHostDirs: "the pod's paths are a tmpfs of the pod",
	// Crash: nil — the driver holds nothing of its process (no mounts, sockets or processes).
}

// TestConformance runs the driver conformance suite against the real cluster.
func TestConformance(t *testing.T) {
	setup(t)
	drivertest.Run(t, harness)
}

// TestMeasure: create -> ready and a print(1) run, p50 of 10 (SANDBOXD_MEASURE=1).
func TestMeasure(t *testing.T) {
	h := harness
	h.Spec = func(t *testing.T) driver.Spec { // a core, as the container driver's TestMeasure gives
		s := testSpec()
		s.CPU = 1
		return s
	}
	drivertest.Measure(t, h, shared(t), 10)
}
