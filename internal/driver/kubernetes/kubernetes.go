// Package kubernetes is the sandbox driver that runs each sandbox as a pod of a Kubernetes
// cluster, through client-go. It registers itself as driver "kubernetes".
//
// A sandbox is one pod (pod.go) named sbx-<hash of id>, labelled app.kubernetes.io/managed-by=sandboxd,
// sandboxd/id=<id> and sandboxd/replica=<Options.Replica>, and a Secret of the same name holding
// the sandbox's agent secret:
//
//   - an init container from the agent image (WriteImage: the static sandbox-agent, and sandboxd)
//     copies the agent into an emptyDir ("sandbox-agent install"), which the sandbox's container
//     mounts read-only at /.sandbox/bin and runs as its command: the agent in TCP mode
//     (--listen :7070), which authenticates every connection with the sandbox's secret (a mutual
//     HMAC challenge, package agent: auth.go) and refuses connections from the pod itself;
//   - the sandbox's container runs the image the operator approved, by a digest-pinned reference
//     (Options.ClusterImages, keyed by Spec.RootFS; optional RuntimeClass, e.g. gVisor's), pulled
//     by the cluster; as the sandbox's own uid/gid (runUID: Spec.HostIDs+10000, unique among the
//     live pods, labelled sandboxd/uid), runAsNonRoot, read-only root, no privilege escalation, no
//     capabilities, seccomp RuntimeDefault, no service-account token, no service links, none of
//     the host's namespaces; limits of CPU, memory and ephemeral-storage (the disk), requests the
//     same but for CPU: a share of the limit (Options.CPURequest, default DefaultCPURequest),
//     since a sandbox idles between runs (the limit holds its runs);
//   - the sandbox's disk is one emptyDir in memory (a tmpfs, sizeLimit = the disk limit: a full
//     disk is ENOSPC, not a node's disk filled until the kubelet evicts the pod); /tmp, the runs'
//     working directory and every read_only and read_write path are directories of it (made by
//     the install init container, as the sandbox's user), mounted by subPath, read_only ones
//     read-only. What a container writes there is charged to its memory: the sandbox's files
//     count in its memory limit (resources.memory), uploads in the files sidecar's (the disk's
//     size and its own needs). A blocked directory is covered by an empty directory of mode 000
//     (the agent volume's "blocked", made by the install container) mounted read-only, a blocked
//     file by an empty root-owned file of mode 000 (the Secret's "blocked" key, by subPath); a
//     blocked path inside a read_only or read_write one gets its mount point made by install;
//   - the files sidecar (files.go): a native sidecar (an init container restarted Always) from the
//     agent image, "sandbox-agent files", as the sandbox's user, confined like the sandbox's
//     container, the whole disk mounted writable, serving the files API's operations (driver.Filer:
//     package agent's files protocol, files.go) on FilesPort behind the same challenge as the
//     agent; every path resolved beneath its directory by package hostfs (RESOLVE_BENEATH), so
//     the links and races of the sandbox, which writes those directories, lead nowhere else;
//   - egress: an init container, the only one with NET_ADMIN (as root), runs "sandbox-agent
//     netinit": nftables rules in the pod's network namespace. For a policy that blocks
//     everything they drop every packet out but the agent's and the files sidecar's replies. Any
//     other policy (egress.go) adds the egress gateway of package egress as a native sidecar from
//     the agent image ("sandbox-agent egress", uid GatewayUID, no capabilities, read-only root),
//     and the rules redirect the sandbox's DNS and TCP to it on the pod's loopback and let only
//     its uid send out. The driver sets the policy over the gateway's control channel (package
//     egressctl, the agent's HMAC challenge with a second secret only the sidecar mounts) at
//     Create and SetNetwork, and drains its decisions to Options.OnNetwork after every run and
//     at Destroy. The cluster's own addresses (apiserver, nodes, pod CIDRs, the kubernetes
//     service) are denied whatever the policy lists; Options.Resolver, if set, must be static
//     records (they are handed to the gateways).
//
// Exec dials the pod's IP (the host must route to the pod network) and speaks the agent protocol
// over the authenticated connection. The driver keeps no state of its own: the pods and Secrets
// are the state (the secret is read back from the Secret after a restart), so its sandboxes
// outlive its process; List and the start-up reconciliation find them by label. Destroy deletes
// the pod and its Secret in the foreground and returns once they are gone.
//
// Code contexts (driver.Contexter) are the agent's, as in the container driver: each create,
// delete and run a connection of its own; a timeout or cancel interrupts the code and keeps the
// interpreter if it stops in time.
//
// What differs from the container driver: the driver is a driver.Filer — the service makes no
// host disk for its sandboxes, Spec's host directories (TmpDir, WorkDir, the Mounts' HostDirs)
// are empty, and the files API goes through the files sidecar; there is no zygote (runs are
// launched: the host cannot start a process in a pod); the pids limit is the kubelet's
// podPidsLimit, every pod's (kubelet.go: Check and Create require one, and singleProcessOOMKill;
// allow_spawn needs it at most Spec.PidsLimit); an OOM is what the agent reads in its cgroup
// (RunResult.OOMKill), or a sandbox container the kernel OOM-killed as a whole. A pod that ends
// by itself (evicted, failed) makes Exec say driver.GoneError (gone.go); the pods of a lost
// replica are destroyed by the replica that declared it lost (DestroyReplica, replicas.go). The
// sandbox's UDP and ICMP are dropped even when its policy does not block outbound traffic, and
// the packets the pod's rules drop are not reported (no NFLOG reader in the pod).
package kubernetes

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/statedir"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/egressctl"
)

// Name is the driver's registry name.
const Name = "kubernetes"

func init() {
	driver.Register(Name, func(opts driver.Options) (driver.Driver, error) { return Open(opts) })
}

// DefaultCPURequest is the share of its CPU limit a pod requests unless Options.CPURequest says
// otherwise.
const DefaultCPURequest = 0.1

// agentGrace is how long past a run's timeout the driver waits for the agent's answer.
const agentGrace = 10 * time.Second

// Driver is the kubernetes driver. It is safe for concurrent use.
type Driver struct {
	cs         kubernetes.Interface
	ns         string
	replica    string
	images     map[string]driver.ClusterImage
	agentImage string
	cpuRequest float64 // the share of its CPU limit a pod requests (Options.CPURequest)
	log        *slog.Logger
	onNetwork  func(egress.Decision) // Options.OnNetwork
	hosts      egress.StaticResolver // Options.Resolver: the gateways' static records (nil: the cluster's DNS, upstream)
	apiserver  string                // the kubeconfig's server URL

	deniedMu sync.Mutex
	denied   []netip.Prefix // the cluster's own addresses (clusterDenied), as of deniedAt
	deniedAt time.Time
	upstream netip.Addr // the gateways' DNS server when hosts is nil: kube-system/kube-dns's IP, as of deniedAt

	mu     sync.Mutex
	boxes  map[string]*box // what Exec needs, cached (the API has it all)
	limits kubeletLimits   // what the nodes' kubelets enforce, as declared (kubelet.go)
}

// box is what the driver needs to reach a sandbox's agent and its egress gateway.
type box struct {
	id        string
	addr      string // the agent's pod IP:port
	filesAddr string // the files sidecar's
	secret    []byte
	gw        *egressctl.Client // nil: no gateway (the policy blocks everything)
	boot      string            // the gateway's boot ID last seen (guarded by Driver.mu)
}

func newBox(id, ip string, secret []byte) *box {
	return &box{id: id, addr: net.JoinHostPort(ip, strconv.Itoa(AgentPort)), filesAddr: net.JoinHostPort(ip, strconv.Itoa(FilesPort)), secret: secret}
}

// Open connects to the cluster of opts.Kubeconfig or, without one, to the cluster it runs in
// (its pod's service account: deploy/kubernetes/sandboxd.yaml).
func Open(opts driver.Options) (*Driver, error) {
	if opts.AgentImage == "" {
		return nil, errors.New("kubernetes driver: no agent image")
	}
	var cfg *rest.Config
	var err error
	if opts.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", opts.Kubeconfig)
	} else if cfg, err = rest.InClusterConfig(); err != nil {
		err = fmt.Errorf("%w (outside a cluster, pass --kubeconfig)", err)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes driver: kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes driver: %w", err)
	}
	d := &Driver{cs: cs, ns: opts.Namespace, replica: opts.Replica, images: opts.ClusterImages,
		agentImage: opts.AgentImage, log: opts.Log(), boxes: map[string]*box{}, onNetwork: opts.OnNetwork,
		limits: kubeletLimitsOf(opts.Kubelet)}
	switch r := opts.Resolver.(type) {
	case nil:
	case egress.StaticResolver:
		d.hosts = r
	default:
		// The gateways resolve in the pods: only static records can be handed to them.
		return nil, fmt.Errorf("kubernetes driver: a resolver other than static host records (%T) cannot be handed to the pods' gateways", r)
	}
	if d.ns == "" {
		d.ns = "default"
	}
	switch r := opts.CPURequest; {
	case r == 0:
		d.cpuRequest = DefaultCPURequest
	case r > 0 && r <= 1:
		d.cpuRequest = r
	default:
		return nil, fmt.Errorf("kubernetes driver: CPU request %v: want a share of the limit, in (0, 1]", r)
	}
	if d.replica == "" {
		d.replica = "default"
	}
	d.apiserver = cfg.Host
	return d, nil
}

// Name returns "kubernetes".
func (d *Driver) Name() string { return Name }

// Close releases nothing: the driver holds no resources of its process.
func (d *Driver) Close() error { return nil }

// Check asks the apiserver for the driver's pods (which also proves its permissions); it fails
// while the kubelets are not declared to set a pids limit and singleProcessOOMKill (kubelet.go).
func (d *Driver) Check(ctx context.Context) error {
	_, err := d.cs.CoreV1().Pods(d.ns).List(ctx, metav1.ListOptions{LabelSelector: d.selector(), Limit: 1})
	if err != nil {
		return fmt.Errorf("kubernetes: %w", err)
	}
	if k := d.kubelets(ctx, true); k.err != nil {
		return fmt.Errorf("kubernetes: the nodes cannot hold sandboxes safely: %w", k.err)
	}
	return nil
}

func (d *Driver) selector() string {
	return labels.SelectorFromSet(labels.Set{labelManagedBy: managedBy, labelReplica: d.replica}).String()
}

// Create makes sandbox id's Secret and pod and waits until its agent answers.
func (d *Driver) Create(ctx context.Context, id string, spec driver.Spec) (err error) {
	if err := statedir.CheckID(id); err != nil {
		return err
	}
	if !labelValue.MatchString(id) {
		return fmt.Errorf("kubernetes: sandbox id %q is not a label value (at most 63 characters, ending in a letter or digit)", id)
	}
	if spec.SitePackages != "" {
		return fmt.Errorf("kubernetes: site packages: %w", driver.ErrUnsupported)
	}
	img, ok := d.images[spec.RootFS]
	if !ok {
		return fmt.Errorf("kubernetes: image %s has no cluster reference (config: the image's cluster ref)", spec.RootFS)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	if err := d.kubelets(ctx, false).fit(spec.AllowSpawn, spec.PidsLimit); err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	if err := d.uidFree(ctx, spec); err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	if needsGateway(spec.Network) {
		d.refreshDenied(ctx)
	}
	pod, err := d.podObject(id, spec, img)
	if err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	secret := []byte(fmt.Sprintf("%x", agent.MakeSecret()))
	gwSecret := []byte(fmt.Sprintf("%x", agent.MakeSecret()))
	defer func() {
		if err != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
			defer cancel()
			if derr := d.Destroy(dctx, id); derr != nil {
				err = fmt.Errorf("%w (and cleaning up failed: %v)", err, derr)
			}
		}
	}()
	if _, err := d.cs.CoreV1().Secrets(d.ns).Create(ctx, d.secretObject(id, secret, gwSecret), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("kubernetes: create %s: secret: %w", id, err)
	}
	created, err := d.cs.CoreV1().Pods(d.ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("kubernetes: create %s: pod: %w", id, err)
	}
	// A pod that stays Pending (unschedulable, a CNI or mount failure) or whose agent never
	// answers must not hold the create, nor a place in the warm pool, for ever.
	wctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	ip, err := d.waitRunning(wctx, created)
	if err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	b := newBox(id, ip, secret)
	if hasGateway(pod) {
		b.gw = &egressctl.Client{Addr: net.JoinHostPort(ip, strconv.Itoa(ControlPort)), Secret: gwSecret}
	}
	if err := agent.WaitReadyDial(wctx, b.addr, agent.TCPDial(b.addr, b.secret)); err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	if err := waitFiles(wctx, b); err != nil {
		return fmt.Errorf("kubernetes: create %s: %w", id, err)
	}
	if b.gw != nil {
		if err := d.setPolicy(wctx, b, spec.Network); err != nil {
			return fmt.Errorf("kubernetes: create %s: %w", id, err)
		}
	}
	d.mu.Lock()
	d.boxes[id] = b
	d.mu.Unlock()
	return nil
}

// uidFree fails when a pod of the namespace already runs as spec's run uid (runUID), terminating
// ones too (their processes run as that uid until they are gone): the service gives no two of its
// live sandboxes the same host ids, but two replicas on one cluster must be given disjoint id
// ranges (the config's "ids", --ids-slot) to keep that true across them, and a replica that
// replaced a lost one of the same range (a StatefulSet's new pod) gets none of the lost one's uids
// until its pods are gone: such a create fails.
func (d *Driver) uidFree(ctx context.Context, spec driver.Spec) error {
	if spec.HostIDs == 0 {
		return nil
	}
	uid := strconv.FormatUint(uint64(runUID(spec)), 10)
	pods, err := d.cs.CoreV1().Pods(d.ns).List(ctx, metav1.ListOptions{
		LabelSelector: labels.SelectorFromSet(labels.Set{labelManagedBy: managedBy, labelUID: uid}).String()})
	if err != nil {
		return fmt.Errorf("list the pods of uid %s: %w", uid, err)
	}
	if len(pods.Items) > 0 {
		p := pods.Items[0]
		return fmt.Errorf("uid %s is the uid of the pod %s (replica %s): replicas on one cluster need disjoint id ranges (config \"ids\": {\"first\": …}, --ids-slot)",
			uid, p.Name, p.Labels[labelReplica])
	}
	return nil
}

// waitRunning watches pod until it runs with an IP, and fails as soon as it cannot (it ended, or
// a container cannot start: a bad image, a bad mount).
func (d *Driver) waitRunning(ctx context.Context, pod *corev1.Pod) (string, error) {
	w, err := d.cs.CoreV1().Pods(d.ns).Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", pod.Name).String(),
		ResourceVersion: pod.ResourceVersion,
	})
	if err != nil {
		return "", fmt.Errorf("watching the pod: %w", err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("waiting for the pod: %w", ctx.Err())
		case ev, ok := <-w.ResultChan():
			if !ok {
				// The watch ended (a timeout of the apiserver's): look once, then watch again.
				p, err := d.cs.CoreV1().Pods(d.ns).Get(ctx, pod.Name, metav1.GetOptions{})
				if err != nil {
					return "", fmt.Errorf("the pod: %w", err)
				}
				if ip, err := running(p); ip != "" || err != nil {
					return ip, err
				}
				return d.waitRunning(ctx, p)
			}
			switch ev.Type {
			case watch.Deleted:
				return "", errors.New("the pod was deleted while it started")
			case watch.Error:
				return "", fmt.Errorf("watching the pod: %v", apierrors.FromObject(ev.Object))
			}
			if p, ok := ev.Object.(*corev1.Pod); ok {
				if ip, err := running(p); ip != "" || err != nil {
					return ip, err
				}
			}
		}
	}
}

// running returns p's IP once its sandbox container runs, an error once it cannot, else "". (The
// pod is Running as soon as its files sidecar is, before the sandbox container has started.)
func running(p *corev1.Pod) (string, error) {
	switch p.Status.Phase {
	case corev1.PodFailed, corev1.PodSucceeded:
		return "", fmt.Errorf("the pod ended (%s): %s %s%s", p.Status.Phase, p.Status.Reason, p.Status.Message, containerStates(p))
	case corev1.PodRunning:
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Name == sandboxContainer && cs.State.Running != nil && p.Status.PodIP != "" {
				return p.Status.PodIP, nil
			}
		}
	}
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		if w := cs.State.Waiting; w != nil && fatalWaiting[w.Reason] {
			return "", fmt.Errorf("container %s cannot start: %s: %s", cs.Name, w.Reason, w.Message)
		}
		if t := cs.State.Terminated; t != nil && t.ExitCode != 0 {
			return "", fmt.Errorf("container %s ended: exit %d %s: %s", cs.Name, t.ExitCode, t.Reason, t.Message)
		}
	}
	return "", nil
}

// fatalWaiting are the reasons a container waits for that no wait ends.
var fatalWaiting = map[string]bool{
	"ErrImagePull": true, "ImagePullBackOff": true, "ErrImageNeverPull": true, "InvalidImageName": true,
	"CreateContainerConfigError": true, "CreateContainerError": true, "RunContainerError": true, "CrashLoopBackOff": true,
}

func containerStates(p *corev1.Pod) string {
	s := ""
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		if t := cs.State.Terminated; t != nil {
			s += fmt.Sprintf("; %s: exit %d %s %s", cs.Name, t.ExitCode, t.Reason, t.Message)
		}
	}
	return s
}

// lookup returns how to reach sandbox id's agent: cached, or read back from the cluster (a
// sandbox of an earlier process).
func (d *Driver) lookup(ctx context.Context, id string) (*box, error) {
	d.mu.Lock()
	b := d.boxes[id]
	d.mu.Unlock()
	if b != nil {
		return b, nil
	}
	if statedir.CheckID(id) != nil {
		return nil, driver.ErrNotFound
	}
	pod, err := d.cs.CoreV1().Pods(d.ns).Get(ctx, objectName(id), metav1.GetOptions{})
	if apierrors.IsNotFound(err) || (err == nil && pod.Labels[labelID] != id) {
		return nil, driver.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes: sandbox %s: %w", id, err)
	}
	if reason, _ := podEnd(pod); reason != "" {
		return nil, gone(id, reason)
	}
	if pod.Status.Phase != corev1.PodRunning || pod.Status.PodIP == "" {
		return nil, fmt.Errorf("kubernetes: sandbox %s: the pod is %s", id, pod.Status.Phase)
	}
	sec, err := d.cs.CoreV1().Secrets(d.ns).Get(ctx, objectName(id), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, driver.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes: sandbox %s: %w", id, err)
	}
	b = newBox(id, pod.Status.PodIP, sec.Data[secretKey])
	if hasGateway(pod) {
		b.gw = &egressctl.Client{Addr: net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(ControlPort)), Secret: sec.Data[gatewayKey]}
	}
	d.mu.Lock()
	d.boxes[id] = b
	d.mu.Unlock()
	return b, nil
}

// Exec runs req in sandbox id through its agent.
func (d *Driver) Exec(ctx context.Context, id string, req driver.ExecRequest) (driver.ExecResult, error) {
	b, err := d.lookup(ctx, id)
	if err != nil {
		return driver.ExecResult{}, err
	}
	runCtx := ctx
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, req.Timeout+agentGrace)
		defer cancel()
	}
	env := req.Env
	if b.gw != nil {
		env = maps.Clone(req.Env)
		if env == nil {
			env = map[string]string{}
		}
		maps.Copy(env, proxyEnv())
		// Every decision of the run reaches the service's audit before its result does.
		defer d.drain(ctx, b)
	}
	areq := agent.RunRequest{Code: req.Code, TimeoutMS: req.Timeout.Milliseconds(), Env: env,
		MaxOutput: req.MaxOutput, Agent: req.Agent, Context: req.Context} // AllowSpawn: the agent's own (--prestart)
	started := time.Now()
	onCall := func(ctx context.Context, call json.RawMessage) []byte { return driver.AnswerAgentCall(ctx, req, call) }
	res, err := agent.RunDial(runCtx, agent.TCPDial(b.addr, b.secret), areq, driver.AgentOutput(req), onCall)
	wall := time.Since(started)
	if err != nil {
		deadline := errors.Is(err, context.DeadlineExceeded)
		if ctx.Err() == nil && !deadline {
			// The connection broke: did the pod end (evicted, failed), or an OOM kill its whole
			// container during this run (gone.go)?
			d.forget(id)
			oom, gerr := d.afterBrokenRun(ctx, id)
			if oom {
				killed := driver.ExecResult{Started: started, Duration: wall}
				driver.Classify(driver.Outcome{OOMKill: true}, &killed)
				return killed, nil
			}
			if gerr != nil {
				return driver.ExecResult{}, gerr
			}
			return driver.ExecResult{}, fmt.Errorf("kubernetes: exec in sandbox %s: %w", id, err)
		}
		// The caller ended the run, or the agent did not answer in time: a result. The agent kills
		// the run's processes when the connection closes.
		killed := driver.ExecResult{Started: started, Duration: wall}
		driver.Classify(driver.Outcome{Cancelled: ctx.Err() != nil, TimedOut: deadline}, &killed)
		return killed, nil
	}
	if res.AgentError != "" {
		return driver.ExecResult{}, fmt.Errorf("kubernetes: exec in sandbox %s: agent: %s", id, res.AgentError)
	}
	return driver.AgentResult(res, started, wall, res.OOMKill), nil
}

// forget forgets what the driver knew of sandbox id: the next lookup asks the cluster again.
func (d *Driver) forget(id string) {
	d.mu.Lock()
	delete(d.boxes, id)
	d.mu.Unlock()
}

// destroyTimeout bounds a cleanup's Destroy.
const destroyTimeout = 2 * time.Minute

// startTimeout bounds a Create's wait for its pod to run and its agent to answer (an image the
// node has, as the operator's approved images are, starts in seconds).
const startTimeout = 2 * time.Minute

// Destroy deletes sandbox id's pod and Secret (foreground) and returns once both are gone.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	d.mu.Lock()
	b := d.boxes[id]
	delete(d.boxes, id)
	d.mu.Unlock()
	if b != nil && b.gw != nil {
		d.drain(ctx, b) // what the last moments decided (a run's stragglers)
	}
	if statedir.CheckID(id) != nil {
		return nil
	}
	name := objectName(id)
	// Grace 1 s, not 0: 0 removes the object at once (a force delete) while the kubelet may still
	// run the containers; 1 has the kubelet kill them (the agent ignores SIGTERM: SIGKILL after
	// 1 s) and remove the object once they are gone, which waitGone waits for.
	fg := metav1.DeletePropagationForeground
	grace := int64(1)
	pods, secrets := d.cs.CoreV1().Pods(d.ns), d.cs.CoreV1().Secrets(d.ns)
	if err := pods.Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &fg, GracePeriodSeconds: &grace}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("kubernetes: destroy %s: pod: %w", id, err)
	}
	if err := secrets.Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("kubernetes: destroy %s: secret: %w", id, err)
	}
	if err := d.waitGone(ctx, name); err != nil {
		return fmt.Errorf("kubernetes: destroy %s: %w", id, err)
	}
	return nil
}

// waitGone returns once pod name no longer exists.
func (d *Driver) waitGone(ctx context.Context, name string) error {
	for {
		p, err := d.cs.CoreV1().Pods(d.ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("the pod: %w", err)
		}
		w, err := d.cs.CoreV1().Pods(d.ns).Watch(ctx, metav1.ListOptions{
			FieldSelector:   fields.OneTermEqualSelector("metadata.name", name).String(),
			ResourceVersion: p.ResourceVersion,
		})
		if err != nil {
			return fmt.Errorf("watching the pod: %w", err)
		}
		deleted := false
		for ev := range w.ResultChan() {
			if ev.Type == watch.Deleted {
				deleted = true
				break
			}
		}
		w.Stop()
		if deleted {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("waiting for the pod to go: %w", err)
		}
	}
}

// List returns the sandboxes of the driver's replica that have a pod or a Secret.
func (d *Driver) List(ctx context.Context) ([]string, error) {
	opts := metav1.ListOptions{LabelSelector: d.selector()}
	pods, err := d.cs.CoreV1().Pods(d.ns).List(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: list pods: %w", err)
	}
	secrets, err := d.cs.CoreV1().Secrets(d.ns).List(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: list secrets: %w", err)
	}
	seen := map[string]bool{}
	var ids []string
	for _, m := range append(metas(pods.Items), metasOfSecrets(secrets.Items)...) {
		if id := m.Labels[labelID]; id != "" && !seen[id] && m.Name == objectName(id) {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return ids, nil
}

func metas(ps []corev1.Pod) []metav1.ObjectMeta {
	var ms []metav1.ObjectMeta
	for _, p := range ps {
		ms = append(ms, p.ObjectMeta)
	}
	return ms
}

func metasOfSecrets(ss []corev1.Secret) []metav1.ObjectMeta {
	var ms []metav1.ObjectMeta
	for _, s := range ss {
		ms = append(ms, s.ObjectMeta)
	}
	return ms
}

// Kill force-deletes sandbox id's pod without waiting (driver.Killer): the object goes at once,
// the kubelet kills the containers when it sees that; List still has the Secret until a Destroy.
func (d *Driver) Kill(id string) error {
	if statedir.CheckID(id) != nil {
		return nil
	}
	zero := int64(0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := d.cs.CoreV1().Pods(d.ns).Delete(ctx, objectName(id), metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("kubernetes: kill %s: %w", id, err)
	}
	return nil
}
