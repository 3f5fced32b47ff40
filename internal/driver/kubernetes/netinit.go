package kubernetes

import (
	corev1 "k8s.io/api/core/v1"

	"github.com/sandboxd/sandboxd/internal/egress"
)

// netinitContainer is the init container that installs p's rules in the pod's network namespace
// ("sandbox-agent netinit"), or nil when p needs none.
func netinitContainer(agentImage string, p egress.Policy, gateway string) *corev1.Container {
	return nil
}
