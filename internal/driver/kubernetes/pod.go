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
	agentUID   = driver.SandboxUser // the agent and the code share the run uid (tcp.go in cmd/sandbox-agent)
)

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
	limits := corev1.ResourceList{
		corev1.ResourceCPU:              *resource.NewMilliQuantity(int64(spec.CPU*1000+0.5), resource.DecimalSI),
		corev1.ResourceMemory:           *resource.NewQuantity(spec.MemoryBytes, resource.BinarySI),
		corev1.ResourceEphemeralStorage: *disk,
	}
	emptyDir := func(name string, size *resource.Quantity) corev1.Volume {
		return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: size}}}
	}
	f := false
	t := true
	uid := int64(agentUID)
	restricted := &corev1.SecurityContext{
		RunAsNonRoot:             &t,
		RunAsUser:                &uid,
		RunAsGroup:               &uid,
		ReadOnlyRootFilesystem:   &t,
		AllowPrivilegeEscalation: &f,
		Privileged:               &f,
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
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
		emptyDir("tmp", disk),
		emptyDir("work", disk),
	}
	mounts := []corev1.VolumeMount{
		{Name: "agent", MountPath: agentDir, ReadOnly: true},
		{Name: "secret", MountPath: secretDir, ReadOnly: true},
		{Name: "tmp", MountPath: "/tmp"},
		{Name: "work", MountPath: pyrunner.WorkDir},
	}
	for i, m := range spec.Mounts {
		if m.ReadOnly {
			// The image's own path, under the read-only root: nothing to mount. (The files a
			// service puts in the host directory do not reach the pod: see the package comment.)
			continue
		}
		name := "rw-" + strconv.Itoa(i)
		volumes = append(volumes, emptyDir(name, disk))
		mounts = append(mounts, corev1.VolumeMount{Name: name, MountPath: m.Path})
	}
	blockedDirs := false
	for _, p := range spec.Blocked {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return nil, fmt.Errorf("blocked path %q is not a clean absolute path", p)
		}
		if isFile(spec.RootFS, p) {
			// An empty file of mode 000 owned by root (the Secret's blocked key).
			mounts = append(mounts, corev1.VolumeMount{Name: "secret", MountPath: p, SubPath: blockedKey, ReadOnly: true})
			continue
		}
		// A directory (or a path the image lacks): an empty directory, read-only. A blocked path
		// that is also a writable one (/tmp, the working directory, a read_write path) is only
		// blocked: two mounts at one path make the apiserver refuse the pod.
		blockedDirs = true
		mounts = slices.DeleteFunc(mounts, func(m corev1.VolumeMount) bool { return m.MountPath == p })
		mounts = append(mounts, corev1.VolumeMount{Name: "blocked", MountPath: p, ReadOnly: true})
	}
	if blockedDirs {
		volumes = append(volumes, emptyDir("blocked", nil)) // read-only wherever it is mounted
	}
	prestart := "0"
	if spec.AllowSpawn {
		prestart = "1"
	}
	initContainers := []corev1.Container{{
		Name:            "agent",
		Image:           d.agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         []string{"/sandbox-agent", "install", "/agent"},
		VolumeMounts:    []corev1.VolumeMount{{Name: "agent", MountPath: "/agent"}},
		SecurityContext: restricted,
		Resources:       corev1.ResourceRequirements{Requests: initResources, Limits: initResources},
	}, netinitContainer(d.agentImage, needsGateway(spec.Network))}
	if needsGateway(spec.Network) {
		d.deniedMu.Lock()
		denied := d.denied
		d.deniedMu.Unlock()
		initContainers = append(initContainers, gatewayContainer(d.agentImage, denied, d.hosts))
		volumes = append(volumes, gatewayVolumes(id)...)
	}
	var dnsConfig *corev1.PodDNSConfig
	if needsGateway(spec.Network) {
		dnsConfig = gatewayDNSConfig()
	}
	var runtimeClass *string
	if img.RuntimeClass != "" {
		runtimeClass = &img.RuntimeClass
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: objectName(id), Namespace: d.ns, Labels: d.labels(id)},
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
			DNSConfig:      dnsConfig,
			Containers: []corev1.Container{{
				Name:            "sandbox",
				Image:           img.Ref,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Command: []string{agentDir + "/sandbox-agent", "--listen", ":" + strconv.Itoa(AgentPort),
					"--secret-file", secretDir + "/" + secretKey, "--prestart", prestart},
				Ports:           []corev1.ContainerPort{{Name: "agent", ContainerPort: AgentPort, Protocol: corev1.ProtocolTCP}},
				VolumeMounts:    mounts,
				SecurityContext: restricted,
				Resources:       corev1.ResourceRequirements{Requests: limits, Limits: limits},
			}},
			Volumes: volumes,
		},
	}, nil
}

// initResources are what an init container gets.
var initResources = corev1.ResourceList{
	corev1.ResourceCPU:    resource.MustParse("100m"),
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
