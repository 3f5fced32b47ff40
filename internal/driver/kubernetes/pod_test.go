package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/egress"
)

// TestPodObject: what every pod is, without a cluster — the confinement the package promises.
func TestPodObject(t *testing.T) {
	rootfs := t.TempDir()
	for _, p := range []string{"usr/share/doc", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(rootfs, "etc/hosts"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	d := &Driver{ns: "ns", replica: "r", agentImage: "agent@sha256:00"}
	spec := driver.Spec{RootFS: rootfs, CPU: 0.5, MemoryBytes: 128 << 20, DiskBytes: 64 << 20, AllowSpawn: true,
		Blocked: []string{"/usr/share/doc", "/etc/hosts", "/nowhere"},
		Mounts:  []driver.Mount{{Path: "/workspace/out"}, {Path: "/workspace/in", ReadOnly: true}},
		Network: egress.Policy{BlockOutbound: true}}
	pod, err := d.podObject("t-1", spec, driver.ClusterImage{Ref: "python@sha256:11", RuntimeClass: "gvisor"})
	if err != nil {
		t.Fatal(err)
	}
	ps := pod.Spec
	if *ps.AutomountServiceAccountToken || *ps.EnableServiceLinks || ps.HostNetwork || ps.HostPID || ps.HostIPC ||
		!*ps.SecurityContext.RunAsNonRoot || *ps.RuntimeClassName != "gvisor" {
		t.Errorf("pod security: %+v", ps)
	}
	if pod.Labels[labelManagedBy] != managedBy || pod.Labels[labelID] != "t-1" || pod.Labels[labelReplica] != "r" {
		t.Errorf("labels %v", pod.Labels)
	}
	c := ps.Containers[0]
	sc := c.SecurityContext
	if *sc.RunAsUser != 10000 || !*sc.ReadOnlyRootFilesystem || *sc.AllowPrivilegeEscalation || len(sc.Capabilities.Add) != 0 ||
		sc.Capabilities.Drop[0] != "ALL" || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("sandbox container security: %+v", sc)
	}
	if c.Image != "python@sha256:11" || c.Resources.Limits.Cpu().MilliValue() != 500 || c.Resources.Limits.Memory().Value() != 128<<20 ||
		c.Resources.Limits.StorageEphemeral().Value() != 64<<20 || !c.Resources.Requests.Memory().Equal(*c.Resources.Limits.Memory()) {
		t.Errorf("sandbox container: image %s resources %+v", c.Image, c.Resources)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for path, want := range map[string]struct {
		volume, subPath string
		ro              bool
	}{
		"/.sandbox/bin": {"agent", "", true}, "/tmp": {"disk", tmpDir, false}, "/.sandbox/work": {"disk", workDir, false},
		"/workspace/out": {"disk", mountDir("/workspace/out"), false}, "/workspace/in": {"disk", mountDir("/workspace/in"), true},
		"/usr/share/doc": {"agent", blockedDir, true}, "/nowhere": {"agent", blockedDir, true}, "/etc/hosts": {"secret", blockedKey, true},
	} {
		m, ok := mounts[path]
		if !ok || m.Name != want.volume || m.SubPath != want.subPath || m.ReadOnly != want.ro {
			t.Errorf("mount %s: %+v, want %+v", path, m, want)
		}
	}
	// The disk: one tmpfs of the disk's size, its directories made by the install container.
	for _, v := range ps.Volumes {
		if v.Name == "disk" && (v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory || v.EmptyDir.SizeLimit.Value() != 64<<20) {
			t.Errorf("disk volume %+v", v.VolumeSource)
		}
	}
	if mountDir("/workspace/out") == mountDir("/workspace/in") || mountDir(strings.Repeat("/a", 500)) != mountDir(strings.Repeat("/a", 500)) {
		t.Error("mountDir: not one name per path")
	}
	// Only netinit has a capability, and it is the only one.
	for _, ic := range ps.InitContainers {
		add := ic.SecurityContext.Capabilities.Add
		if (ic.Name == "netinit") != (len(add) == 1 && add[0] == "NET_ADMIN") {
			t.Errorf("init container %s adds %v", ic.Name, add)
		}
	}
	names := []string{}
	for _, ic := range ps.InitContainers {
		names = append(names, ic.Name)
	}
	// netinit before the files sidecar: its rules are in place before any sidecar serves.
	if strings.Join(names, " ") != "agent netinit files" {
		t.Errorf("init containers %v, want agent, netinit, files", names)
	}
	// The files sidecar: a native sidecar, confined as the sandbox's container, the disk whole;
	// its memory holds the disk's files it writes.
	fc := ps.InitContainers[2]
	if fc.RestartPolicy == nil || *fc.RestartPolicy != corev1.ContainerRestartPolicyAlways || *fc.SecurityContext.RunAsUser != 10000 ||
		!*fc.SecurityContext.ReadOnlyRootFilesystem || len(fc.SecurityContext.Capabilities.Add) != 0 ||
		fc.Resources.Limits.Memory().Value() != 64<<20+filesMemory || fc.VolumeMounts[0].MountPath != diskRoot || fc.VolumeMounts[0].SubPath != "" {
		t.Errorf("files sidecar: %+v", fc)
	}
	if cmd := strings.Join(ps.InitContainers[0].Command, " "); !strings.Contains(cmd, diskRoot+"/"+mountDir("/workspace/in")) || !strings.Contains(cmd, diskRoot+"/"+tmpDir) {
		t.Errorf("install: %s", cmd)
	}
	if cmd := strings.Join(ps.InitContainers[1].Command, " "); !strings.HasSuffix(cmd, fmt.Sprintf(" %d,%d", AgentPort, FilesPort)) {
		t.Errorf("netinit lets out the replies of %s, want the agent's and the files sidecar's", cmd)
	}
	if _, err := d.podObject("t-2", driver.Spec{RootFS: rootfs, CPU: 1, MemoryBytes: 1 << 20, DiskBytes: 1 << 20, Blocked: []string{"../x"}}, driver.ClusterImage{Ref: "x"}); err == nil {
		t.Error("a relative blocked path was accepted")
	}
}

// TestPodBlockedWritable: a blocked path that is also a writable mount (/tmp, a read_write path)
// is mounted once, blocked: the apiserver refuses a pod with two mounts at one path.
func TestPodBlockedWritable(t *testing.T) {
	d := &Driver{ns: "ns", replica: "r", agentImage: "agent@sha256:00"}
	spec := driver.Spec{RootFS: t.TempDir(), CPU: 0.5, MemoryBytes: 128 << 20, DiskBytes: 64 << 20,
		Blocked: []string{"/tmp", "/workspace/out"}, Mounts: []driver.Mount{{Path: "/workspace/out"}},
		Network: egress.Policy{BlockOutbound: true}}
	pod, err := d.podObject("t-2", spec, driver.ClusterImage{Ref: "python@sha256:11"})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		if prev, dup := seen[m.MountPath]; dup {
			t.Errorf("%s mounted twice (%s, %s)", m.MountPath, prev, m.Name)
		}
		seen[m.MountPath] = m.Name
	}
	for _, p := range spec.Blocked {
		if seen[p] != "agent" {
			t.Errorf("%s mounted from %q, want blocked", p, seen[p])
		}
	}
}

// TestPodBlockedInsideMount: a blocked path inside a read_only or read_write path gets its mount
// point made in the disk's directory by the install container (the container runtime cannot make
// it in a read-only mount), and one inside another blocked path is left to it.
func TestPodBlockedInsideMount(t *testing.T) {
	d := &Driver{ns: "ns", replica: "r", agentImage: "agent@sha256:00"}
	spec := driver.Spec{RootFS: t.TempDir(), CPU: 0.5, MemoryBytes: 128 << 20, DiskBytes: 64 << 20,
		Blocked: []string{"/workspace/data/secret/deep", "/workspace/hidden", "/workspace/hidden/x"},
		Mounts:  []driver.Mount{{Path: "/workspace/data", ReadOnly: true}, {Path: "/workspace/hidden"}},
		Network: egress.Policy{BlockOutbound: true}}
	pod, err := d.podObject("t-3", spec, driver.ClusterImage{Ref: "python@sha256:11"})
	if err != nil {
		t.Fatal(err)
	}
	install := strings.Join(pod.Spec.InitContainers[0].Command, " ")
	if !strings.Contains(install, " "+diskRoot+"/"+mountDir("/workspace/data")+"/secret/deep") {
		t.Errorf("install %s: no mount point for the blocked path inside the read_only one", install)
	}
	paths := map[string]int{}
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		paths[m.MountPath]++
	}
	if paths["/workspace/hidden/x"] != 0 || paths["/workspace/hidden"] != 1 || paths["/workspace/data/secret/deep"] != 1 {
		t.Errorf("mounts %v", paths)
	}
}

// TestPodGateway: a policy other than "block everything" gets the gateway sidecar — its own uid,
// no capability, a read-only root, its secret mounted in it alone — and netinit's redirecting
// rules for that uid; "block everything" gets neither.
func TestPodGateway(t *testing.T) {
	d := &Driver{ns: "ns", replica: "r", agentImage: "agent@sha256:00",
		denied: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		hosts:  egress.StaticResolver{"api.company.com": {netip.MustParseAddr("192.0.2.10")}}}
	for _, tc := range []struct {
		policy  egress.Policy
		gateway bool
	}{
		{egress.Policy{BlockOutbound: true}, false},
		{egress.Policy{BlockOutbound: true, Rules: []egress.Rule{{Host: "api.company.com"}}}, true},
		{egress.Policy{BlockOutbound: false}, true},
	} {
		spec := driver.Spec{RootFS: t.TempDir(), CPU: 0.5, MemoryBytes: 128 << 20, DiskBytes: 64 << 20, Network: tc.policy}
		pod, err := d.podObject("t-3", spec, driver.ClusterImage{Ref: "python@sha256:11"})
		if err != nil {
			t.Fatal(err)
		}
		if hasGateway(pod) != tc.gateway {
			t.Errorf("%+v: gateway %v, want %v", tc.policy, hasGateway(pod), tc.gateway)
		}
		var netinit, gw *corev1.Container
		for i, c := range pod.Spec.InitContainers {
			switch c.Name {
			case "netinit":
				netinit = &pod.Spec.InitContainers[i]
			case gatewayName:
				gw = &pod.Spec.InitContainers[i]
			}
		}
		wantArgs := []string{"/sandbox-agent", "netinit", "7070,7071"}
		if tc.gateway {
			wantArgs = append(wantArgs, "10001")
		}
		if netinit == nil || !slices.Equal(netinit.Command, wantArgs) {
			t.Errorf("%+v: netinit %+v, want %v", tc.policy, netinit, wantArgs)
		}
		for _, m := range pod.Spec.Containers[0].VolumeMounts {
			if m.Name == "egress-secret" || m.Name == "egress-state" {
				t.Errorf("the sandbox's container mounts %s", m.Name)
			}
		}
		// With a gateway, the pod's resolver is the gateway (127.0.0.1), nothing of the cluster's.
		dc := pod.Spec.DNSConfig
		if tc.gateway && (pod.Spec.DNSPolicy != corev1.DNSNone || dc == nil || !slices.Equal(dc.Nameservers, []string{"127.0.0.1"}) ||
			len(dc.Searches) != 0 || dc.Options[0].Name != "ndots" || *dc.Options[0].Value != "1") {
			t.Errorf("%+v: dns policy %s, config %+v", tc.policy, pod.Spec.DNSPolicy, dc)
		}
		if !tc.gateway && (pod.Spec.DNSPolicy != corev1.DNSClusterFirst || dc != nil) {
			t.Errorf("%+v: dns policy %s, config %+v", tc.policy, pod.Spec.DNSPolicy, dc)
		}
		if !tc.gateway {
			continue
		}
		sc := gw.SecurityContext
		if *gw.RestartPolicy != corev1.ContainerRestartPolicyAlways || *sc.RunAsUser != GatewayUID || *sc.RunAsGroup != GatewayUID ||
			GatewayUID == driver.SandboxUser || !*sc.RunAsNonRoot || !*sc.ReadOnlyRootFilesystem || *sc.AllowPrivilegeEscalation ||
			len(sc.Capabilities.Add) != 0 || sc.Capabilities.Drop[0] != "ALL" || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Errorf("gateway: %+v", gw)
		}
		cmd := strings.Join(gw.Command, " ")
		if !strings.Contains(cmd, "--deny 10.244.0.0/16") || !strings.Contains(cmd, "--host api.company.com=192.0.2.10") || strings.Contains(cmd, "--upstream") {
			t.Errorf("gateway command %q", cmd)
		}
	}

	// Without static records the gateway resolves with the cluster's DNS server, given
	// explicitly; none known: no pod (not a gateway that would ask itself).
	spec := driver.Spec{RootFS: t.TempDir(), CPU: 0.5, MemoryBytes: 128 << 20, DiskBytes: 64 << 20, Network: egress.Policy{BlockOutbound: false}}
	d.hosts = nil
	if _, err := d.podObject("t-3", spec, driver.ClusterImage{Ref: "python@sha256:11"}); err == nil {
		t.Error("a gateway pod without static records nor the cluster's DNS server")
	}
	d.upstream = netip.MustParseAddr("10.96.0.10")
	pod, err := d.podObject("t-3", spec, driver.ClusterImage{Ref: "python@sha256:11"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range pod.Spec.InitContainers {
		if cmd := strings.Join(c.Command, " "); c.Name == gatewayName && (!strings.HasSuffix(cmd, " --upstream 10.96.0.10") || strings.Contains(cmd, "--host")) {
			t.Errorf("gateway command %q, want --upstream 10.96.0.10", cmd)
		}
	}
}

// TestClusterDenied: what the gateways deny beyond the fixed set — the apiserver's address, every
// node's addresses and pod ranges, the kubernetes service's IP — and that a failed list keeps
// the last one.
func TestClusterDenied(t *testing.T) {
	cs := fake.NewClientset(
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
			Spec: corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24", "fd00:10:244:1::/64"}},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: "192.168.7.10"}, {Type: corev1.NodeExternalIP, Address: "203.0.113.7"},
				{Type: corev1.NodeHostName, Address: "n1"}}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: "kube-system"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"}}},
	)
	d := &Driver{cs: cs, log: slog.New(slog.DiscardHandler), apiserver: "https://198.51.100.5:6443"}
	d.refreshDenied(context.Background())
	var got []string
	for _, p := range d.denied {
		got = append(got, p.String())
	}
	want := []string{"10.244.1.0/24", "10.96.0.1/32", "192.168.7.10/32", "198.51.100.5/32", "203.0.113.7/32", "fd00:10:244:1::/64"}
	if !slices.Equal(got, want) {
		t.Errorf("denied %v, want %v", got, want)
	}
	if d.upstream.String() != "10.96.0.10" {
		t.Errorf("the gateways' upstream %v, want kube-dns's 10.96.0.10", d.upstream)
	}
	// Past the TTL with the nodes unlistable: the last list stays.
	d.deniedAt = time.Now().Add(-2 * deniedTTL)
	cs.PrependReactor("list", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("the apiserver is away")
	})
	d.refreshDenied(context.Background())
	if len(d.denied) != len(want) {
		t.Errorf("after a failed list: %v", d.denied)
	}
}
