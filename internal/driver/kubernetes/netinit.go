package kubernetes

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
)

// netinitContainer is the init container that installs the pod's egress rules ("sandbox-agent
// netinit", cmd/sandbox-agent/netinit.go): without a gateway, drop every packet the pod sends but
// the agent's and the files sidecar's replies; with one, redirect the sandbox's DNS and TCP to the
// gateway and let only the gateway's uid send out. It is the one container of the pod with a
// capability (NET_ADMIN, as root, for the nftables rules of the pod's network namespace); the
// sidecars and the sandbox's container, which start after it has exited, have none.
func netinitContainer(agentImage string, gateway bool) corev1.Container {
	cmd := []string{"/sandbox-agent", "netinit", strconv.Itoa(AgentPort) + "," + strconv.Itoa(FilesPort)}
	if gateway {
		cmd = append(cmd, strconv.Itoa(GatewayUID))
	}
	f, t := false, true
	root := int64(0)
	return corev1.Container{
		Name:            "netinit",
		Image:           agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         cmd,
		SecurityContext: &corev1.SecurityContext{
			RunAsNonRoot:             &f,
			RunAsUser:                &root,
			RunAsGroup:               &root,
			ReadOnlyRootFilesystem:   &t,
			AllowPrivilegeEscalation: &f,
			Privileged:               &f,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}, Add: []corev1.Capability{"NET_ADMIN"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		Resources: corev1.ResourceRequirements{Requests: initResources, Limits: initResources},
	}
}
