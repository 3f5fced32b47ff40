// Package k8stest runs, for tests, one real single-node Kubernetes cluster per test process:
// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, a kubelet and kube-proxy built
// by scripts/build-k8s.sh (their directory in $SANDBOXD_K8S), over a containerd of its own
// (Debian's containerd, runc and bridge CNI plugin).
//
// Everything the cluster writes is under one state directory (os.TempDir()/sandboxd-k8s-*):
// containerd's root, state and socket (not the system's /run/containerd), the runc state, the
// pods' network namespaces, etcd's data, the certificates (generated here), the kubeconfigs, the
// kubelet's root and the pods' logs, and one log file per component (logs/NAME.log; their tails
// are printed when a test that used the cluster fails). Ports are on loopback, but for the
// kubelet's and the apiserver's, which listen on the node's address (the host's: the apiserver
// reaches the kubelet there, pods reach the apiserver there; neither allows anonymous access).
// The pods' network is a bridge (BridgeName, no masquerading) whose subnet the host routes to:
// a pod's IP is reachable from the host directly. Pods reach Services through kube-proxy
// (nftables mode), the apiserver at the kubernetes Service's 10.96.0.1:443 included; the host
// does not (its route for the service range is unreachable). Pods' cgroups are under CgroupRoot
// in every cgroup hierarchy.
//
// One cluster at a time on a host: Start takes an exclusive flock on os.TempDir()/sandboxd-k8stest.lock
// (a second test process waits for the first one's Stop), which also records the state directory,
// so that Start cleans up what a killed process left. Stop tears everything down: every process
// (the components, containerd's shims, the pods' processes), the mounts under the state
// directory, the pods' network namespaces and veths, the bridge, the cgroups; it gives back the
// kernel settings the kubelet and the bridge plugin change (vm.overcommit_memory, vm.panic_on_oom,
// kernel.panic, kernel.panic_on_oops, kernel.keys.root_max{keys,bytes}, net.ipv4.ip_forward)
// and removes the host directories the components created (/var/log/containers, …) if they are
// empty. On the host the cluster makes one route (serviceCIDR unreachable, proto 77) and
// kube-proxy's two nftables tables, ip kube-proxy and ip6 kube-proxy (its Service DNAT,
// masquerading and rejects); Stop and Start's cleanup of a killed process's leftovers delete
// them. No other iptables or nftables rule is made (kubelet: makeIPTablesUtilChains false; the
// bridge plugin: ipMasq false; kube-proxy's PATH holds only nft, so its start-up cleanup of its
// iptables and IPVS modes touches nothing).
//
// Needs root, $SANDBOXD_K8S, and containerd, ctr, runc, nft, busybox (static: the pods' pause
// process) and /usr/lib/cni/{bridge,host-local,loopback} (scripts/install-deps.sh).
package k8stest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sandboxd/sandboxd/internal/deathsig"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

const (
	// BridgeName is the Linux bridge of the pods' network.
	BridgeName = "sbxk8s0"
	// CgroupRoot is the kubelet's cgroup root (cgroupfs driver), in every hierarchy.
	CgroupRoot = "/sandboxd-k8stest"
	// cniNetwork is the name of the pods' CNI network.
	cniNetwork = "sandboxd-k8stest"
	// PauseImage is the pods' sandbox image, imported at Start: busybox sleeping.
	PauseImage = "sandboxd.invalid/k8stest/pause:1"
	// FakeInternetRoute is the one range beyond the host that pods have a route to (through the
	// host, which forwards it to the kubernetes driver's tests' fake internet, a network
	// namespace of theirs): pods have no default route, so nothing they send leaves the host.
	// Their other routes stay on the host too: the node's IP (the host's own address) and
	// serviceCIDR (kube-proxy's Services; the rest unreachable on the host) — so that a pod's
	// connection there is routed, and an egress rule in the pod (the kubernetes driver's
	// gateway) decides about it, not a missing route.
	FakeInternetRoute = "203.0.113.240/28"
	// serviceCIDR is the range of service IPs, served by kube-proxy to the pods, which have a
	// route to it (podRoutes); the host's route for it is unreachable (blockServiceCIDR).
	serviceCIDR = "10.96.0.0/24"
	// stepTimeout bounds each wait of Start for a broken component; not a speed target.
	stepTimeout = 3 * time.Minute
)

// podRoutes are the routes of the pods (through the bridge): FakeInternetRoute, the node's IP,
// serviceCIDR; no default route.
func podRoutes(nodeIP string) []map[string]string {
	return []map[string]string{{"dst": FakeInternetRoute}, {"dst": nodeIP + "/32"}, {"dst": serviceCIDR}}
}

// Cluster is the process's running cluster.
type Cluster struct {
	Kubeconfig       string       // path of an admin kubeconfig (group system:masters)
	Config           *rest.Config // client-go config for it
	NodeName         string
	ContainerdSocket string
	CNIBridgeCIDR    string // the pods' subnet; the host reaches pod IPs directly

	// NodeIP is the node's InternalIP: the host's address the kubelet listens on.
	NodeIP string
	// StartDuration is how long Start took to bring the cluster up (node Ready).
	StartDuration time.Duration

	etcdPort, kubeletPort int

	dir     string // the state directory
	bins    string // $SANDBOXD_K8S
	procs   []*proc
	before  hostState
	lock    *os.File
	imgMu   sync.Mutex
	images  map[string]string // src+"\x00"+ref → pinned reference (ImportImage)
	clients *kubernetes.Clientset
}

var (
	mu       sync.Mutex
	current  *Cluster
	startErr error
)

// Start returns the process's one cluster, starting it at the first call (later calls share
// it); t.Skip without SANDBOXD_K8S, root or the Debian packages (t.Fatal under CI). A failed start
// fails every later caller too. When t fails, the tails of the components' logs are printed.
func Start(t testing.TB) *Cluster {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if current != nil {
		current.tailsOnFailure(t)
		return current
	}
	if startErr != nil {
		t.Fatalf("k8stest: the cluster did not start: %v", startErr)
	}
	if err := prerequisites(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("k8stest: the Kubernetes tests must run under CI: %v", err)
		}
		t.Skipf("k8stest: no cluster: %v", err)
	}
	c, err := start(t)
	if err != nil {
		startErr = err
		if c != nil {
			t.Logf("k8stest: %s", c.tails())
			c.stop()
		}
		t.Fatalf("k8stest: start: %v", err)
	}
	current = c
	c.tailsOnFailure(t)
	return c
}

// Stop tears the process's cluster down (call it from TestMain after m.Run); nothing is left.
// A no-op without a cluster. Errors are printed: TestMain has no test to fail.
func Stop() {
	mu.Lock()
	defer mu.Unlock()
	if current == nil {
		return
	}
	if err := current.stop(); err != nil {
		fmt.Fprintf(os.Stderr, "k8stest: stop: %v\n", err)
	}
	current = nil
}

// prerequisites says what is missing to run a cluster here.
func prerequisites() error {
	if os.Getenv("SANDBOXD_K8S") == "" {
		return errors.New("SANDBOXD_K8S is not set (SANDBOXD_K8S=$(scripts/build-k8s.sh))")
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root")
	}
	for _, f := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox", "nft"} {
		if _, err := exec.LookPath(f); err != nil {
			return fmt.Errorf("%s: %w (scripts/install-deps.sh)", f, err)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			return fmt.Errorf("CNI plugin: %w (scripts/install-deps.sh)", err)
		}
	}
	for _, b := range binaries {
		if _, err := os.Stat(filepath.Join(os.Getenv("SANDBOXD_K8S"), b)); err != nil {
			return fmt.Errorf("$SANDBOXD_K8S: %w", err)
		}
	}
	return nil
}

const cniBinDir = "/usr/lib/cni"

var binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"}

// PodPidsLimit is the kubelet's podPidsLimit: the pids.max of every pod's cgroup (the pause
// process, init containers and the sandbox's agent and runs count).
const PodPidsLimit = 256

// lockPath is the host-wide lock of the one cluster; it holds the holder's state directory.
func lockPath() string { return filepath.Join(os.TempDir(), "sandboxd-k8stest.lock") }

// start brings the cluster up; on error, the returned cluster (if not nil) is to be stopped.
func start(t testing.TB) (*Cluster, error) {
	lock, err := os.OpenFile(lockPath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Logf("k8stest: waiting for another process's cluster (%s)", lockPath())
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
			lock.Close()
			return nil, fmt.Errorf("flock %s: %w", lockPath(), err)
		}
	}
	// What killed holders left (the lock is held: no cluster runs).
	for _, d := range leftovers() {
		t.Logf("k8stest: cleaning up %s, left by a killed test process", d)
		if err := teardown(d); err != nil {
			t.Logf("k8stest: cleaning up %s: %v", d, err)
		}
	}
	t0 := time.Now() // the lock is held: what follows is the start itself
	dir, err := os.MkdirTemp("", "sandboxd-k8s-")
	if err != nil {
		lock.Close()
		return nil, err
	}
	if err := lock.Truncate(0); err == nil {
		_, _ = lock.WriteAt([]byte(dir), 0)
	}
	c := &Cluster{
		dir:              dir,
		bins:             os.Getenv("SANDBOXD_K8S"),
		lock:             lock,
		NodeName:         "sandboxd-k8stest",
		ContainerdSocket: filepath.Join(dir, "containerd", "containerd.sock"),
		Kubeconfig:       filepath.Join(dir, "admin.kubeconfig"),
		images:           map[string]string{},
	}
	c.before = snapshotHost()
	if err := c.saveHostSettings(); err != nil {
		return c, err
	}
	if c.NodeIP, err = nodeIP(); err != nil {
		return c, err
	}
	if c.CNIBridgeCIDR, err = podCIDR(); err != nil {
		return c, err
	}
	if err := blockServiceCIDR(); err != nil {
		return c, err
	}
	for _, d := range []string{"logs", "pki", "containerd", "cni/net.d", "cni/ipam", "etcd", "kubelet", "pods"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return c, err
		}
	}
	if err := makeCgroupRoot(); err != nil {
		return c, err
	}
	if err := c.startContainerd(); err != nil {
		return c, fmt.Errorf("containerd: %w", err)
	}
	if err := c.importPause(t); err != nil {
		return c, fmt.Errorf("pause image: %w", err)
	}
	if err := c.startControlPlane(); err != nil {
		return c, err
	}
	if err := c.startKubelet(); err != nil {
		return c, fmt.Errorf("kubelet: %w", err)
	}
	if err := c.startKubeProxy(); err != nil {
		return c, fmt.Errorf("kube-proxy: %w", err)
	}
	c.StartDuration = time.Since(t0)
	return c, nil
}

// proc is a component the cluster started.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when it has exited
	err  error         // its exit, once done
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// spawn starts a component with its output in logs/NAME.log. It dies with this process
// (Pdeathsig) and is in a process group of its own.
func (c *Cluster) spawn(name, path string, args ...string) (*proc, error) {
	return c.spawnEnv(name, nil, path, args...)
}

// spawnEnv is spawn with the environment env (nil: this process's).
func (c *Cluster) spawnEnv(name string, env []string, path string, args ...string) (*proc, error) {
	logf, err := os.OpenFile(c.logPath(name), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir, cmd.Env = c.dir, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := deathsig.Start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	c.procs = append(c.procs, p)
	return p, nil
}

func (c *Cluster) logPath(name string) string { return filepath.Join(c.dir, "logs", name+".log") }

// await waits until ready() holds, failing early when p exits.
func await(p *proc, what string, ready func() bool) error {
	if !waitfor.Until(stepTimeout, func() bool { return p.exited() || ready() }) {
		return fmt.Errorf("%s: not %s within %v", p.name, what, stepTimeout)
	}
	if p.exited() {
		return fmt.Errorf("%s exited (%v) before it was %s", p.name, p.err, what)
	}
	return nil
}

// freePort is a TCP port free on loopback now.
func freePort() (int, error) { return freePortOn("127.0.0.1") }

// freePortOn is a TCP port free on the address ip now.
func freePortOn(ip string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *Cluster) startContainerd() error {
	d := filepath.Join(c.dir, "containerd")
	cfg := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %[7]q
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[8]q
    conf_dir = %[9]q
    max_conf_num = 1
`, filepath.Join(d, "root"), filepath.Join(d, "state"), c.ContainerdSocket, c.ContainerdSocket+".ttrpc",
		filepath.Join(d, "opt"), PauseImage, filepath.Join(d, "runc"), cniBinDir, filepath.Join(c.dir, "cni/net.d"))
	conf := filepath.Join(d, "config.toml")
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		return err
	}
	cni, _ := json.MarshalIndent(map[string]any{
		"cniVersion": "0.4.0",
		"name":       cniNetwork,
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": BridgeName, "isGateway": true, "ipMasq": false, "hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": c.CNIBridgeCIDR}}},
				"routes":  podRoutes(c.NodeIP),
				"dataDir": filepath.Join(c.dir, "cni/ipam"),
			},
		}},
	}, "", "  ")
	if err := os.WriteFile(filepath.Join(c.dir, "cni/net.d/10-sandboxd.conflist"), cni, 0o600); err != nil {
		return err
	}
	containerd, _ := exec.LookPath("containerd")
	p, err := c.spawn("containerd", containerd, "--config", conf)
	if err != nil {
		return err
	}
	return await(p, "serving", func() bool { return c.ctr(context.Background(), "version") == nil })
}

// ctr runs ctr against the cluster's containerd in its k8s.io namespace.
func (c *Cluster) ctr(ctx context.Context, args ...string) error { return c.ctrIn(ctx, nil, args...) }

func (c *Cluster) startControlPlane() error {
	pkiDir := filepath.Join(c.dir, "pki")
	ca, err := newPKI(pkiDir)
	if err != nil {
		return err
	}
	if err := ca.serviceAccountKey(); err != nil {
		return err
	}
	serving, err := ca.issue("apiserver", "kube-apiserver", nil, "127.0.0.1", "localhost", c.NodeIP,
		"10.96.0.1", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
	if err != nil {
		return err
	}
	kubeletClient, err := ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"})
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, err := freePort2()
	if err != nil {
		return err
	}
	// The apiserver listens on the node's address, which pods reach through the bridge: the
	// kubernetes Service's endpoint (kube-proxy forwards 10.96.0.1:443 there).
	apiPort, err := freePortOn(c.NodeIP)
	if err != nil {
		return err
	}
	server := "https://" + net.JoinHostPort(c.NodeIP, strconv.Itoa(apiPort))

	c.etcdPort = etcdClient
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeer)
	etcd, err := c.spawn("etcd", filepath.Join(c.bins, "etcd"), "--name", "k8stest",
		"--data-dir", filepath.Join(c.dir, "etcd"), "--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "k8stest="+peerURL, "--log-level", "warn")
	if err != nil {
		return err
	}
	if err := await(etcd, "healthy", func() bool { return httpOK(etcdURL + "/health") }); err != nil {
		return err
	}

	f := func(n string) string { return filepath.Join(pkiDir, n) }
	api, err := c.spawn("kube-apiserver", filepath.Join(c.bins, "kube-apiserver"),
		"--etcd-servers", etcdURL,
		"--bind-address", c.NodeIP, "--secure-port", strconv.Itoa(apiPort), "--advertise-address", c.NodeIP,
		"--endpoint-reconciler-type", "lease", "--anonymous-auth=false", "--cert-dir", f("apiserver-generated"),
		"--tls-cert-file", serving.certFile, "--tls-private-key-file", serving.keyFile,
		"--client-ca-file", f("ca.crt"),
		"--service-account-key-file", f("sa.pub"), "--service-account-signing-key-file", f("sa.key"),
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-cluster-ip-range", serviceCIDR,
		"--authorization-mode", "Node,RBAC", "--allow-privileged=false",
		"--kubelet-client-certificate", kubeletClient.certFile, "--kubelet-client-key", kubeletClient.keyFile,
		"--kubelet-certificate-authority", f("ca.crt"),
		"--kubelet-preferred-address-types", "InternalIP,Hostname",
		"--profiling=false", "--v", "1")
	if err != nil {
		return err
	}
	admin, err := ca.issue("admin", "k8stest-admin", []string{"system:masters"})
	if err != nil {
		return err
	}
	if c.Config, err = ca.kubeconfig(c.Kubeconfig, server, admin); err != nil {
		return err
	}
	if c.clients, err = kubernetes.NewForConfig(c.Config); err != nil {
		return err
	}
	if err := await(api, "ready", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.clients.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil
	}); err != nil {
		return err
	}

	// kube-proxy's user is bound to the ClusterRole system:node-proxier by the default RBAC.
	proxy, err := ca.issue("kube-proxy", "system:kube-proxy", nil)
	if err != nil {
		return err
	}
	if _, err := ca.kubeconfig(filepath.Join(c.dir, "kube-proxy.kubeconfig"), server, proxy); err != nil {
		return err
	}
	for _, comp := range []struct{ name, cn string }{
		{"kube-controller-manager", "system:kube-controller-manager"},
		{"kube-scheduler", "system:kube-scheduler"},
	} {
		cert, err := ca.issue(comp.name, comp.cn, nil)
		if err != nil {
			return err
		}
		kc := filepath.Join(c.dir, comp.name+".kubeconfig")
		if _, err := ca.kubeconfig(kc, server, cert); err != nil {
			return err
		}
		args := []string{"--kubeconfig", kc, "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v", "1"}
		if comp.name == "kube-controller-manager" {
			args = append(args, "--use-service-account-credentials=true",
				"--service-account-private-key-file", f("sa.key"), "--root-ca-file", f("ca.crt"),
				"--cluster-signing-cert-file", f("ca.crt"), "--cluster-signing-key-file", f("ca.key"))
		}
		if _, err := c.spawn(comp.name, filepath.Join(c.bins, comp.name), args...); err != nil {
			return err
		}
	}
	kubelet, err := ca.issue("kubelet", "system:node:"+c.NodeName, []string{"system:nodes"})
	if err != nil {
		return err
	}
	if _, err := ca.kubeconfig(filepath.Join(c.dir, "kubelet.kubeconfig"), server, kubelet); err != nil {
		return err
	}
	_, err = ca.issue("kubelet-serving", "system:node:"+c.NodeName, nil, c.NodeIP, c.NodeName)
	return err
}

// freePort2 is two distinct free ports.
func freePort2() (int, int, error) {
	a, err := freePort()
	if err != nil {
		return 0, 0, err
	}
	for {
		b, err := freePort()
		if err != nil || b != a {
			return a, b, err
		}
	}
}

func httpOK(url string) bool {
	cl := http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (c *Cluster) startKubelet() error {
	port, err := freePort()
	if err != nil {
		return err
	}
	c.kubeletPort = port
	pkiDir := filepath.Join(c.dir, "pki")
	cfg, _ := json.MarshalIndent(map[string]any{
		"apiVersion":               "kubelet.config.k8s.io/v1beta1",
		"kind":                     "KubeletConfiguration",
		"address":                  c.NodeIP,
		"port":                     port,
		"readOnlyPort":             0,
		"healthzPort":              0,
		"containerRuntimeEndpoint": "unix://" + c.ContainerdSocket,
		"cgroupDriver":             "cgroupfs",
		"cgroupRoot":               CgroupRoot,
		"failCgroupV1":             false,
		"failSwapOn":               false,
		"oomScoreAdj":              0,
		"makeIPTablesUtilChains":   false,
		"podLogsDir":               filepath.Join(c.dir, "pods"),
		"volumePluginDir":          filepath.Join(c.dir, "kubelet", "volume-plugins"),
		"tlsCertFile":              filepath.Join(pkiDir, "kubelet-serving.crt"),
		"tlsPrivateKeyFile":        filepath.Join(pkiDir, "kubelet-serving.key"),
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": false},
			"x509":      map[string]any{"clientCAFile": filepath.Join(pkiDir, "ca.crt")},
		},
		"authorization": map[string]any{"mode": "AlwaysAllow"},
		// A shared test machine's disk and memory are not the cluster's to guard.
		"evictionHard": map[string]string{"memory.available": "1Mi", "nodefs.available": "1%",
			"imagefs.available": "1%", "nodefs.inodesFree": "1%"},
		"imageGCHighThresholdPercent": 100,
		"imageGCLowThresholdPercent":  99,
		"serializeImagePulls":         false,
		"resolvConf":                  "/etc/resolv.conf",

		// What the kubernetes driver requires of every node: a pids limit per pod (a fork bomb in
		// one pod must not exhaust the node's PIDs) and no group OOM kill (on cgroup v2 it kills
		// the agent with the run; this host's cgroup v1 kills one process anyway).
		"podPidsLimit":         PodPidsLimit,
		"singleProcessOOMKill": true,
	}, "", "  ")
	conf := filepath.Join(c.dir, "kubelet.yaml") // JSON is YAML
	if err := os.WriteFile(conf, cfg, 0o600); err != nil {
		return err
	}
	p, err := c.spawn("kubelet", filepath.Join(c.bins, "kubelet"), "--config", conf,
		"--kubeconfig", filepath.Join(c.dir, "kubelet.kubeconfig"), "--root-dir", filepath.Join(c.dir, "kubelet"),
		"--cert-dir", filepath.Join(pkiDir, "kubelet-generated"),
		"--hostname-override", c.NodeName, "--node-ip", c.NodeIP, "--v", "1")
	if err != nil {
		return err
	}
	if err := await(p, "Ready", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n, err := c.clients.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return cond.Status == corev1.ConditionTrue
			}
		}
		return false
	}); err != nil {
		return err
	}
	// Pods are admitted once their namespace's default service account exists.
	return await(p, "serving pods (the default service account)", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.clients.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})
}

// kubernetesService is the cluster IP of the default namespace's kubernetes Service (the first
// of serviceCIDR), its endpoint the apiserver at the node's address.
const kubernetesService = "10.96.0.1"

// startKubeProxy runs kube-proxy in nftables mode: it serves the Service IPs to the pods, with
// its rules in the host's tables ip kube-proxy and ip6 kube-proxy (teardown deletes them). It
// masquerades all traffic to a cluster IP (a pod reaching a Service of a pod on the same bridge
// gets the answer back through the host, without br_netfilter), leaves the conntrack sysctls
// and its OOM score alone, and serves its healthz and metrics on loopback. Its PATH holds nft
// alone: at start kube-proxy deletes what its other modes (iptables, IPVS) would have left on
// the host, which is not this cluster's to touch. Start returns once the kubernetes Service is
// programmed.
func (c *Cluster) startKubeProxy() error {
	health, metrics, err := freePort2()
	if err != nil {
		return err
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		return fmt.Errorf("nft: %w (scripts/install-deps.sh)", err)
	}
	binDir := filepath.Join(c.dir, "kube-proxy", "bin")
	if err := os.MkdirAll(binDir, 0o700); err != nil {
		return err
	}
	if err := os.Symlink(nft, filepath.Join(binDir, "nft")); err != nil {
		return err
	}
	zero, zeroDuration := int32(0), metav1.Duration{}
	cfg, _ := json.MarshalIndent(map[string]any{
		"apiVersion":         "kubeproxy.config.k8s.io/v1alpha1",
		"kind":               "KubeProxyConfiguration",
		"clientConnection":   map[string]any{"kubeconfig": filepath.Join(c.dir, "kube-proxy.kubeconfig")},
		"mode":               "nftables",
		"hostnameOverride":   c.NodeName,
		"clusterCIDR":        c.CNIBridgeCIDR,
		"detectLocalMode":    "ClusterCIDR",
		"nodePortAddresses":  []string{c.NodeIP + "/32"},
		"healthzBindAddress": "127.0.0.1:" + strconv.Itoa(health),
		"metricsBindAddress": "127.0.0.1:" + strconv.Itoa(metrics),
		"oomScoreAdj":        zero,
		"nftables":           map[string]any{"masqueradeAll": true, "syncPeriod": "30s", "minSyncPeriod": "0s"},
		// Zero: kube-proxy sets none of the host's nf_conntrack sysctls.
		"conntrack": map[string]any{"maxPerCore": zero, "min": zero,
			"tcpEstablishedTimeout": zeroDuration, "tcpCloseWaitTimeout": zeroDuration},
	}, "", "  ")
	conf := filepath.Join(c.dir, "kube-proxy.yaml") // JSON is YAML
	if err := os.WriteFile(conf, cfg, 0o600); err != nil {
		return err
	}
	p, err := c.spawnEnv("kube-proxy", []string{"PATH=" + binDir}, filepath.Join(c.bins, "kube-proxy"),
		"--config", conf, "--v", "1")
	if err != nil {
		return err
	}
	return await(p, "serving the kubernetes Service", func() bool { return c.ServiceProgrammed(kubernetesService, "tcp", 443) })
}

// ServiceProgrammed says whether kube-proxy has programmed the Service port ip:port/proto
// ("tcp", "udp", "sctp") with at least one endpoint: whether a pod's connection there is
// forwarded now. Tests wait for it after creating a Service (kube-proxy syncs its rules within
// about a second of a change to a Service or its endpoints).
func (c *Cluster) ServiceProgrammed(ip, proto string, port int) bool {
	family := "ip"
	if strings.Contains(ip, ":") {
		family = "ip6"
	}
	out, err := exec.Command("nft", "list", "map", family, "kube-proxy", "service-ips").Output()
	if err != nil {
		return false
	}
	// An element reads "10.96.0.1 . tcp . 443 : goto service-…"; it is there only while the
	// service has endpoints (else it is in the map no-endpoint-services).
	return strings.Contains(string(out), fmt.Sprintf("%s . %s . %d : ", ip, proto, port))
}

// tails is the last lines of every component's log.
func (c *Cluster) tails() string {
	var b strings.Builder
	ents, _ := os.ReadDir(filepath.Join(c.dir, "logs"))
	for _, e := range ents {
		data, _ := os.ReadFile(filepath.Join(c.dir, "logs", e.Name()))
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintf(&b, "\n--- %s (last %d lines)\n%s\n", e.Name(), len(lines), strings.Join(lines, "\n"))
	}
	return b.String()
}

// tailsOnFailure prints the components' log tails at t's end if t failed.
func (c *Cluster) tailsOnFailure(t testing.TB) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("k8stest: the cluster's logs (%s):%s", c.dir, c.tails())
		}
	})
}
