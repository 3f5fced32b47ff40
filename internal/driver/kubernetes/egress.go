package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/egressctl"
)

// The pod's egress gateway: a native sidecar (an init container with restartPolicy Always) from
// the agent image, "sandbox-agent egress" (cmd/sandbox-agent/egress.go), as GatewayUID.
const (
	gatewayName = "egress"
	// GatewayUID is the gateway's uid (and gid): neither the sandbox's (driver.SandboxUser) nor
	// root. netinit lets only this uid send packets out of the pod.
	GatewayUID = driver.SandboxUser + 1
	// ControlPort is the gateway's control channel (package egressctl) on the pod's IP.
	ControlPort  = 7072
	gatewayKey   = "egress"           // the Secret's key holding the gateway's own secret (hex)
	gatewayDir   = "/.sandbox/egress" // where the sidecar mounts it
	gatewayState = "/.sandbox/state"  // the sidecar's emptyDir: the policy set last
	// The gateway's ports on the pod's loopback (cmd/sandbox-agent/egress.go).
	gatewayProxyPort = 3128
)

// gatewayResources are what the sidecar may use; gatewayRequests what it asks the scheduler for
// (it idles with its sandbox).
var (
	gatewayResources = corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("200m"),
		corev1.ResourceMemory: resource.MustParse("128Mi"),
	}
	gatewayRequests = corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("20m"),
		corev1.ResourceMemory: resource.MustParse("64Mi"),
	}
)

// needsGateway says whether a sandbox of policy p gets the gateway: every policy but "block
// everything" with no allow list (netinit alone enforces that).
func needsGateway(p egress.Policy) bool { return !p.BlockOutbound || len(p.Rules) > 0 }

// gatewayContainer is the gateway sidecar of a pod. deny are the prefixes no policy opens (the
// cluster's own addresses), hosts the static records it resolves from, or else upstream the DNS
// server it resolves with (the cluster's: the pod's resolv.conf names the gateway itself).
func gatewayContainer(agentImage string, deny []netip.Prefix, hosts egress.StaticResolver, upstream netip.Addr) corev1.Container {
	always := corev1.ContainerRestartPolicyAlways
	cmd := []string{"/sandbox-agent", "egress", "--control", ":" + strconv.Itoa(ControlPort),
		"--secret-file", gatewayDir + "/" + gatewayKey, "--state", gatewayState + "/policy.json"}
	for _, p := range deny {
		cmd = append(cmd, "--deny", p.String())
	}
	for _, name := range slices.Sorted(maps.Keys(hosts)) {
		var as []string
		for _, a := range hosts[name] {
			as = append(as, a.String())
		}
		cmd = append(cmd, "--host", name+"="+strings.Join(as, ","))
	}
	if len(hosts) == 0 {
		cmd = append(cmd, "--upstream", upstream.String())
	}
	return corev1.Container{
		Name:            gatewayName,
		Image:           agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		RestartPolicy:   &always,
		Command:         cmd,
		Ports:           []corev1.ContainerPort{{Name: "egress-control", ContainerPort: ControlPort, Protocol: corev1.ProtocolTCP}},
		VolumeMounts: []corev1.VolumeMount{
			{Name: "egress-secret", MountPath: gatewayDir, ReadOnly: true},
			{Name: "egress-state", MountPath: gatewayState},
		},
		SecurityContext: confined(GatewayUID),
		Resources:       corev1.ResourceRequirements{Requests: gatewayRequests, Limits: gatewayResources},
	}
}

// gatewayVolumes are the sidecar's volumes: its secret (only it mounts the key: the sandbox's
// container cannot read it) and its state.
func gatewayVolumes(id string) []corev1.Volume {
	mode := int32(0o444) // root-owned; the sidecar's uid reads it, no other container mounts it
	return []corev1.Volume{
		{Name: "egress-secret", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: objectName(id),
			Items:      []corev1.KeyToPath{{Key: gatewayKey, Path: gatewayKey, Mode: &mode}},
		}}},
		{Name: "egress-state", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{
			Medium: corev1.StorageMediumMemory, SizeLimit: resource.NewQuantity(1<<20, resource.BinarySI)}}},
	}
}

// gatewayDNSConfig is the resolv.conf of a pod with a gateway (dnsPolicy None): the gateway's
// DNS (127.0.0.1, where netinit redirects the sandbox's DNS to the gateway's DNS port), no
// search domain, ndots 1 — nothing depends on the cluster's DNS being reachable from the pod,
// and a lookup of an allowed name is not first asked under search domains the gateway would deny
// (a denial in the audit per search domain and lookup).
func gatewayDNSConfig() *corev1.PodDNSConfig {
	one := "1"
	return &corev1.PodDNSConfig{Nameservers: []string{"127.0.0.1"}, Searches: []string{},
		Options: []corev1.PodDNSConfigOption{{Name: "ndots", Value: &one}}}
}

// hasGateway says whether pod runs the gateway sidecar.
func hasGateway(pod *corev1.Pod) bool {
	return slices.ContainsFunc(pod.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == gatewayName })
}

// proxyEnv is what every run of a sandbox with a gateway gets (as the container driver's runs
// do): the gateway's HTTP proxy for HTTP and HTTPS. These replace the caller's; a client that
// ignores them is redirected to the transparent proxy anyway.
func proxyEnv() map[string]string {
	proxy := "http://127.0.0.1:" + strconv.Itoa(gatewayProxyPort)
	noProxy := "localhost,127.0.0.1,::1"
	return map[string]string{
		"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
		"NO_PROXY": noProxy, "no_proxy": noProxy,
	}
}

// setPolicy sends p to sandbox b's gateway, retrying while the sidecar starts (until ctx ends).
func (d *Driver) setPolicy(ctx context.Context, b *box, p egress.Policy) error {
	var last error
	for delay := 10 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		boot, err := b.gw.SetPolicy(ctx, p)
		if err == nil {
			d.mu.Lock()
			if b.boot != "" && b.boot != boot {
				d.log.Warn("the egress gateway restarted: decisions it had not handed over are lost", "sandbox", b.id)
			}
			b.boot = boot
			d.mu.Unlock()
			return nil
		}
		last = err
		if errors.Is(err, egressctl.ErrRefused) {
			return err // the gateway answered: an error of the policy's, not of the connection
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("egress gateway: %w (last: %v)", ctx.Err(), last)
		case <-time.After(delay):
		}
	}
}

// drainTimeout bounds taking a gateway's decisions after a run or before a Destroy (a live
// gateway answers in milliseconds; a gone pod must not hold a Destroy or an Exec's error long).
const drainTimeout = 5 * time.Second

// drain takes sandbox b's gateway's decisions and hands them to Options.OnNetwork, as sandbox
// b's (whatever the gateway wrote in them). What it cannot take is logged, not returned: the run
// it follows has its result.
func (d *Driver) drain(ctx context.Context, b *box) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), drainTimeout)
	defer cancel()
	ds, dropped, boot, err := b.gw.Drain(ctx)
	if err != nil {
		d.log.Warn("cannot take the egress gateway's decisions", "sandbox", b.id, "err", err)
		return
	}
	d.mu.Lock()
	restarted := b.boot != "" && b.boot != boot
	b.boot = boot
	d.mu.Unlock()
	if restarted {
		d.log.Warn("the egress gateway restarted: decisions it had not handed over are lost", "sandbox", b.id)
	}
	if dropped > 0 {
		d.log.Warn("the egress gateway's buffer was full: decisions were not recorded", "sandbox", b.id, "lost", dropped)
	}
	if d.onNetwork == nil {
		return
	}
	for _, x := range ds {
		x.SandboxID = b.id
		d.onNetwork(x)
	}
}

// SetNetwork replaces the egress policy of ready sandbox id (driver.NetworkSetter): its
// gateway enforces p from the call's return on. A sandbox made without a gateway (its policy
// blocked everything) can only keep blocking everything.
func (d *Driver) SetNetwork(ctx context.Context, id string, p egress.Policy) error {
	b, err := d.lookup(ctx, id)
	if err != nil {
		return err
	}
	if b.gw == nil {
		if needsGateway(p) {
			return fmt.Errorf("kubernetes: sandbox %s was made without an egress gateway (its policy blocked everything): it cannot take %+v", id, p)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, drainTimeout)
	defer cancel()
	// What the old policy decided is the old owner's: drained before the new one applies.
	d.drain(ctx, b)
	if err := d.setPolicy(ctx, b, p); err != nil {
		return fmt.Errorf("kubernetes: sandbox %s: %w", id, err)
	}
	return nil
}

// deniedTTL is how long the cluster's addresses are used before they are listed again (a node
// that joins is denied to pods created from then on).
const deniedTTL = 5 * time.Minute

// refreshDenied lists the cluster's own addresses again if the last list is older than
// deniedTTL; when the nodes cannot be listed it keeps the last list (the first time, what could
// not be listed is denied only as the private ranges it lies in).
func (d *Driver) refreshDenied(ctx context.Context) {
	d.deniedMu.Lock()
	defer d.deniedMu.Unlock()
	if !d.deniedAt.IsZero() && time.Since(d.deniedAt) < deniedTTL {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if len(d.hosts) == 0 {
		// The gateways' upstream: the cluster's DNS service (kube-system/kube-dns).
		if svc, err := d.cs.CoreV1().Services("kube-system").Get(ctx, "kube-dns", metav1.GetOptions{}); err != nil {
			d.log.Warn("egress: cannot get the cluster's DNS service (kube-system/kube-dns) for the gateways", "err", err)
		} else if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err != nil {
			d.log.Warn("egress: the cluster's DNS service has no cluster IP", "ip", svc.Spec.ClusterIP)
		} else {
			d.upstream = a
		}
	}
	denied, err := d.clusterDenied(ctx, d.apiserver)
	if err != nil && d.denied != nil {
		d.log.Warn("egress: cannot list the cluster's addresses again: the gateways of new pods deny the last list", "err", err)
		return // tried again at the next create
	}
	d.denied, d.deniedAt = denied, time.Now()
}

// clusterDenied are the cluster's own addresses, which no policy opens (the gateway's
// Config.Denied): the apiserver's (from the kubeconfig), every node's addresses and pod ranges,
// and the kubernetes service's cluster IP. The private ranges they usually lie in are denied
// anyway unless an address rule lists them; these stay denied even then. What the driver may not
// list (no permission on nodes) is logged and left to the private ranges.
func (d *Driver) clusterDenied(ctx context.Context, apiserver string) ([]netip.Prefix, error) {
	out := []netip.Prefix{}
	var lerr error
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
		} else if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		}
	}
	if u, err := url.Parse(apiserver); err == nil && u.Hostname() != "" {
		if _, err := netip.ParseAddr(u.Hostname()); err == nil {
			add(u.Hostname())
		} else if addrs, err := net.DefaultResolver.LookupHost(ctx, u.Hostname()); err == nil {
			for _, a := range addrs {
				add(a)
			}
		} else {
			d.log.Warn("egress: cannot resolve the apiserver's name to deny its addresses", "err", err)
		}
	}
	nodes, err := d.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	switch {
	case err == nil:
		for _, n := range nodes.Items {
			for _, a := range n.Status.Addresses {
				add(a.Address)
			}
			for _, c := range append([]string{n.Spec.PodCIDR}, n.Spec.PodCIDRs...) {
				add(c)
			}
		}
	case apierrors.IsForbidden(err):
		d.log.Warn("egress: no permission to list nodes: their addresses are denied only as private ranges", "err", err)
	default:
		d.log.Warn("egress: cannot list nodes", "err", err)
		lerr = err
	}
	svc, err := d.cs.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err == nil {
		for _, ip := range append([]string{svc.Spec.ClusterIP}, svc.Spec.ClusterIPs...) {
			add(ip)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
	return slices.Compact(out), lerr
}
