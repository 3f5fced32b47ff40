package kubernetes

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// Labels of every object the driver makes.
const (
	labelManagedBy = "app.kubernetes.io/managed-by"
	managedBy      = "sandboxd"
	labelID        = "sandboxd/id"
	labelReplica   = "sandboxd/replica"
)

// Where things are in the sandbox's container.
const (
	agentDir   = "/.sandbox/bin"    // the agent binary (emptyDir filled by the install init container)
	secretDir  = "/.sandbox/secret" // the sandbox's Secret
	secretKey  = "secret"           // its key holding the agent's secret (hex)
	blockedKey = "blocked"          // its key holding an empty file of mode 000: what masks a blocked file
	labelUID   = "sandboxd/uid"     // the pod's run uid (runUID): no two live pods share one
)

// The directories of the disk volume (diskRoot in the containers that mount it whole: the install
// init container and the files sidecar): the sandbox's /tmp, its runs' working directory, and one
// per read_only or read_write path (mountDir).
const (
	diskRoot = "/disk"
	tmpDir   = "tmp"
	workDir  = "work"
)

// mountDir is the disk volume's directory of read_only or read_write path p: a name of its own
// for every path (a path may be longer than a file name may be).
func mountDir(p string) string {
	sum := sha256.Sum256([]byte(p))
	return "m-" + hex.EncodeToString(sum[:12])
}

// sandboxContainer is the name of the pod's container that runs the sandbox's code.
const sandboxContainer = "sandbox"

// blockedDir is the agent volume's directory of mode 000 that covers blocked directories (made by
// "sandbox-agent install").
const blockedDir = "blocked"

// runUID is the uid (and gid) of everything of a sandbox's pod but netinit and the gateway: the
// agent, the code, the files sidecar. It is the sandbox's own host ids' SandboxUser
// (Spec.HostIDs, which no other live sandbox of the service has), so no per-user kernel limit
// (inotify instances, pipe buffers, processes, message queues) is shared with another sandbox's
// pod: pods have no user namespace (containerd 1.6 cannot give them one), so the uid inside is the
// node's. A spec without host ids (tests) runs as SandboxUser.
func runUID(spec driver.Spec) uint32 {
	if spec.HostIDs == 0 {
		return driver.SandboxUser
	}
	return spec.HostIDs + driver.SandboxUser
}

// confined is the security context of every container of a pod but netinit: uid (and gid), not
// root, a read-only root, no privilege escalation, no capabilities, seccomp RuntimeDefault.
func confined(uid uint32) *corev1.SecurityContext {
	f, t, id := false, true, int64(uid)
	return &corev1.SecurityContext{
		RunAsNonRoot:             &t,
		RunAsUser:                &id,
		RunAsGroup:               &id,
		ReadOnlyRootFilesystem:   &t,
		AllowPrivilegeEscalation: &f,
		Privileged:               &f,
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// AgentPort is the port the agent listens on in every pod.
const AgentPort = 7070

// objectName is the name of sandbox id's pod and Secret: a DNS label, which an ID (with "_" and
// capitals) need not be.
func objectName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "sbx-" + hex.EncodeToString(sum[:10])
}

// labelValue matches what Kubernetes accepts as a label value.
var labelValue = regexp.MustCompile(`^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$`)

func (d *Driver) labels(id string) map[string]string {
	return map[string]string{labelManagedBy: managedBy, labelID: id, labelReplica: d.replica}
}

// secretObject is sandbox id's Secret: the agent's secret and the empty file that masks blocked
// files.
func (d *Driver) secretObject(id string, secret, gatewaySecret []byte) *corev1.Secret {
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: objectName(id), Namespace: d.ns, Labels: d.labels(id)},
		Data:       map[string][]byte{secretKey: secret, blockedKey: {}, gatewayKey: gatewaySecret},
		Type:       corev1.SecretTypeOpaque,
	}
}

// podObject is sandbox id's pod (see the package comment).
func (d *Driver) podObject(id string, spec driver.Spec, img driver.ClusterImage) (*corev1.Pod, error) {
	if spec.DiskBytes <= 0 {
		return nil, errors.New("the spec has no disk limit (DiskBytes)")
	}
	disk := resource.NewQuantity(spec.DiskBytes, resource.BinarySI)
	// The sandbox's disk is memory (a tmpfs): what its code writes there is charged to its memory
	// limit (resources.memory stays the limit of everything it holds).
	limits := corev1.ResourceList{
		corev1.ResourceCPU:              *resource.NewMilliQuantity(int64(spec.CPU*1000+0.5), resource.DecimalSI),
		corev1.ResourceMemory:           *resource.NewQuantity(spec.MemoryBytes, resource.BinarySI),
		corev1.ResourceEphemeralStorage: *disk,
	}
	// Requests are the limits, but CPU: a sandbox idles between its runs, so it asks the scheduler
	// for a share of its limit (the limit still holds its runs to their cores).
	requests := limits.DeepCopy()
	requests[corev1.ResourceCPU] = *resource.NewMilliQuantity(max(int64(spec.CPU*1000*d.cpuRequest+0.5), 1), resource.DecimalSI)
	f := false
	t := true
	uid := int64(runUID(spec))
	restricted := confined(runUID(spec))
	secretMode, blockedMode := int32(0o444), int32(0)
	volumes := []corev1.Volume{
		{Name: "agent", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: resource.NewQuantity(64<<20, resource.BinarySI)}}},
		{Name: "secret", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: objectName(id),
			Items: []corev1.KeyToPath{
				{Key: secretKey, Path: secretKey, Mode: &secretMode},
				{Key: blockedKey, Path: blockedKey, Mode: &blockedMode},
			},
		}}},
		// The sandbox's disk: a tmpfs of its size, so that a full disk is ENOSPC (not a node's
		// disk filled until the kubelet evicts the pod); its directories are mounted one by one.
		{Name: "disk", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory, SizeLimit: disk}}},
	}
	mounts := []corev1.VolumeMount{
		{Name: "agent", MountPath: agentDir, ReadOnly: true},
		{Name: "secret", MountPath: secretDir, ReadOnly: true},
		{Name: "disk", SubPath: tmpDir, MountPath: "/tmp"},
		{Name: "disk", SubPath: workDir, MountPath: pyrunner.WorkDir},
	}
	diskDirs := []string{diskRoot + "/" + tmpDir, diskRoot + "/" + workDir}
	for _, m := range spec.Mounts {
		// The files API reaches it through the files sidecar (files.go), read_only ones too.
		mounts = append(mounts, corev1.VolumeMount{Name: "disk", SubPath: mountDir(m.Path), MountPath: m.Path, ReadOnly: m.ReadOnly})
		diskDirs = append(diskDirs, diskRoot+"/"+mountDir(m.Path))
	}
	for _, p := range spec.Blocked {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return nil, fmt.Errorf("blocked path %q is not a clean absolute path", p)
		}
		if slices.ContainsFunc(spec.Blocked, func(b string) bool { return strings.HasPrefix(p, b+"/") }) {
			continue // inside another blocked path, which covers it (and has no room for its mount point)
		}
		if holder := diskMountOf(mounts, p); holder != nil {
			// Inside a directory of the disk, not the image: its mount point is made there (by the
			// install container: a read-only mount has no room to make it at the container's start).
			diskDirs = append(diskDirs, diskRoot+"/"+holder.SubPath+strings.TrimPrefix(p, holder.MountPath))
		} else if isFile(spec.RootFS, p) {
			// An empty file of mode 000 owned by root (the Secret's blocked key).
			mounts = append(mounts, corev1.VolumeMount{Name: "secret", MountPath: p, SubPath: blockedKey, ReadOnly: true})
			continue
		}
		// A directory (or a path the image lacks): an empty directory of mode 000, read-only (the
		// install container's, in the agent's volume: the sandbox's uid owns it but can neither
		// enter it nor, on a read-only mount, chmod it). A blocked path that is also a writable
		// one (/tmp, the working directory, a read_write path) is only blocked: two mounts at one
		// path make the apiserver refuse the pod.
		mounts = slices.DeleteFunc(mounts, func(m corev1.VolumeMount) bool { return m.MountPath == p })
		mounts = append(mounts, corev1.VolumeMount{Name: "agent", SubPath: blockedDir, MountPath: p, ReadOnly: true})
	}
	prestart := "0"
	if spec.AllowSpawn {
		prestart = "1"
	}
	initContainers := []corev1.Container{{
		Name:            "agent",
		Image:           d.agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         append([]string{"/sandbox-agent", "install", "/agent"}, diskDirs...),
		VolumeMounts:    []corev1.VolumeMount{{Name: "agent", MountPath: "/agent"}, {Name: "disk", MountPath: diskRoot}},
		SecurityContext: restricted,
		Resources:       corev1.ResourceRequirements{Requests: initResources, Limits: initResources},
	}, netinitContainer(d.agentImage, needsGateway(spec.Network)), filesContainer(d.agentImage, restricted, spec.DiskBytes)}
	dnsPolicy, dnsConfig := corev1.DNSClusterFirst, (*corev1.PodDNSConfig)(nil)
	if needsGateway(spec.Network) {
		d.deniedMu.Lock()
		denied, upstream := d.denied, d.upstream
		d.deniedMu.Unlock()
		if len(d.hosts) == 0 && !upstream.IsValid() {
			return nil, fmt.Errorf("no DNS server for the egress gateway: the cluster's (service kube-system/kube-dns) was not found, and no static host records are configured")
		}
		initContainers = append(initContainers, gatewayContainer(d.agentImage, denied, d.hosts, upstream))
		volumes = append(volumes, gatewayVolumes(id)...)
		dnsPolicy, dnsConfig = corev1.DNSNone, gatewayDNSConfig()
	}
	var runtimeClass *string
	if img.RuntimeClass != "" {
		runtimeClass = &img.RuntimeClass
	}
	podLabels := d.labels(id)
	podLabels[labelUID] = strconv.FormatUint(uint64(runUID(spec)), 10)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: objectName(id), Namespace: d.ns, Labels: podLabels},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  &f,
			EnableServiceLinks:            &f,
			HostNetwork:                   false,
			HostPID:                       false,
			HostIPC:                       false,
			RuntimeClassName:              runtimeClass,
			TerminationGracePeriodSeconds: new(int64), // the agent ignores SIGTERM: kill at once
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   &t,
				RunAsUser:      &uid,
				RunAsGroup:     &uid,
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			InitContainers: initContainers,
			DNSPolicy:      dnsPolicy,
			DNSConfig:      dnsConfig,
			Containers: []corev1.Container{{
				Name:            sandboxContainer,
				Image:           img.Ref,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Command: []string{agentDir + "/sandbox-agent", "--listen", ":" + strconv.Itoa(AgentPort),
					"--secret-file", secretDir + "/" + secretKey, "--prestart", prestart},
				Ports:           []corev1.ContainerPort{{Name: "agent", ContainerPort: AgentPort, Protocol: corev1.ProtocolTCP}},
				VolumeMounts:    mounts,
				SecurityContext: restricted,
				Resources:       corev1.ResourceRequirements{Requests: requests, Limits: limits},
			}},
			Volumes: volumes,
		},
	}, nil
}

// diskMountOf returns the deepest mount of the disk volume strictly above p (nil: none).
func diskMountOf(mounts []corev1.VolumeMount, p string) *corev1.VolumeMount {
	var holder *corev1.VolumeMount
	for i, m := range mounts {
		if m.Name == "disk" && strings.HasPrefix(p, m.MountPath+"/") && (holder == nil || len(m.MountPath) > len(holder.MountPath)) {
			holder = &mounts[i]
		}
	}
	return holder
}

// initResources are what an init container gets.
var initResources = corev1.ResourceList{
	corev1.ResourceCPU:    resource.MustParse("20m"), // a copy and a few nftables rules: the pod's request is at least this
	corev1.ResourceMemory: resource.MustParse("64Mi"),
}

// isFile reports whether p is a regular file (or a symlink, which a directory mount cannot cover
// either) in the image at rootfs; a directory or a path the image lacks is not.
func isFile(rootfs, p string) bool {
	if rootfs == "" {
		return false
	}
	fi, err := os.Lstat(filepath.Join(rootfs, p))
	if err != nil {
		return false
	}
	return fi.Mode().Type() != fs.ModeDir
}
