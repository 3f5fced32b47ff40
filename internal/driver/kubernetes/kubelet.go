package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// What a pod gets from the kubelet of its node, not from its own spec. Kubernetes v1.37 has no
// pids limit in a pod's spec (neither per container nor in pod-level resources): the only one is
// the kubelet's podPidsLimit, which every pod of the node gets in its pod cgroup's pids.max. And on
// a cgroup v2 node the kubelet sets memory.oom.group on every container unless it has
// singleProcessOOMKill: true, so a run's OOM would kill the whole container, the agent with it.
//
// The driver cannot read either safely: the kubelet's configuration is only served by its
// /configz, reached through the apiserver's node proxy, and `get` on nodes/proxy also authorizes
// exec into every pod of the node (the kubelet authorizes WebSocket upgrades as `get`). So the
// operator declares what the kubelets set (Options.Kubelet: the config file's "kubelet"), and
//
//   - Check fails, and Create refuses, while the declaration has no pids limit (a fork or thread
//     bomb in one pod would exhaust the node's PIDs: threads count, and runs without allow_spawn
//     can still start threads) or no singleProcessOOMKill: true;
//   - Create refuses allow_spawn for a sandbox whose Spec.PidsLimit is below the declared
//     podPidsLimit (the sandbox would get more processes than it was given).

// kubeletLimits is what the cluster's kubelets enforce on every pod, as declared.
type kubeletLimits struct {
	pids int64 // podPidsLimit (what a pod may get)
	err  error // why the kubelets are unfit (nil: fit)
}

// kubeletLimitsOf checks the operator's declaration k.
func kubeletLimitsOf(k driver.KubeletLimits) kubeletLimits {
	var problems []string
	if k.PodPidsLimit <= 0 {
		problems = append(problems, "no podPidsLimit is declared (config \"kubelet\": {\"pod_pids_limit\": N}): without one in every kubelet's configuration a fork bomb in one sandbox would exhaust its node's PIDs")
	}
	if !k.SingleProcessOOMKill {
		problems = append(problems, "singleProcessOOMKill is not declared (config \"kubelet\": {\"single_process_oom_kill\": true}): without it in every kubelet's configuration a run's OOM on cgroup v2 kills the whole container, the sandbox's agent with it")
	}
	l := kubeletLimits{pids: k.PodPidsLimit}
	if len(problems) > 0 {
		l.err = errors.New(strings.Join(problems, "; "))
	}
	return l
}

// kubelets returns the declared kubelets' limits (the context is for a future source that asks).
func (d *Driver) kubelets(context.Context, bool) kubeletLimits { return d.limits }

// fit returns why a sandbox of spawn and pids cannot be created on the cluster's nodes, or nil.
func (k kubeletLimits) fit(spawn bool, pids int64) error {
	if k.err != nil {
		return k.err
	}
	if spawn && pids > 0 && k.pids > pids {
		return fmt.Errorf("%w, allow_spawn with a pids limit of %d needs the kubelets' podPidsLimit at most %d, and the cluster's pods get %d (Kubernetes has no pids limit per pod)",
			driver.ErrUnsupported, pids, pids, k.pids)
	}
	return nil
}
