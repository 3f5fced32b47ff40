package kubernetes

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
)

// netinitContainer is the init container that drops every packet the pod sends but the agent's
// and the files sidecar's replies ("sandbox-agent netinit", cmd/sandbox-agent/netinit.go): the one container of the pod
// with a capability (NET_ADMIN, as root, for the nftables rules of the pod's network namespace).
// The sandbox's container, which starts after it has exited, has none.
func netinitContainer(agentImage string) corev1.Container {
	f, t := false, true
	root := int64(0)
	return corev1.Container{
		Name:            "netinit",
		Image:           agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         []string{"/sandbox-agent", "netinit", strconv.Itoa(AgentPort), strconv.Itoa(FilesPort)},
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
