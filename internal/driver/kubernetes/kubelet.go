package kubernetes

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// What a pod gets from the kubelet of its node, not from its own spec. Kubernetes v1.37 has no
// pids limit in a pod's spec (neither per container nor in pod-level resources): the only one is
// the kubelet's podPidsLimit, which every pod of the node gets in its pod cgroup's pids.max. And on
// a cgroup v2 node the kubelet sets memory.oom.group on every container unless it has
// singleProcessOOMKill: true, so a run's OOM would kill the whole container, the agent with it.
// The driver reads both from every schedulable node's kubelet (its /configz, through the
// apiserver's node proxy: the driver's role needs list on nodes and get on nodes/proxy), and
//
//   - Check fails, and Create refuses, while a node sets no pids limit (a fork or thread bomb in
//     one pod would exhaust the node's PIDs: threads count, and runs without allow_spawn can
//     still start threads) or lacks singleProcessOOMKill: true;
//   - Create refuses allow_spawn for a sandbox whose Spec.PidsLimit is below the largest
//     podPidsLimit (the sandbox would get more processes than it was given).

// kubeletLimits is what the schedulable nodes' kubelets enforce on every pod.
type kubeletLimits struct {
	pids      int64     // the largest podPidsLimit of the nodes (what a pod may get)
	nodes     []string  // the nodes read
	err       error     // why the nodes are unfit (nil: fit)
	readAt    time.Time // when they were read
	readError error     // reading them failed (then pids, nodes and err are unknown)
}

// kubeletsFor is how long the kubelets' configuration is reused before it is read again.
const kubeletsFor = time.Minute

// kubeletConfig is the part of a kubelet's /configz the driver reads (v1beta1 field names).
type kubeletConfig struct {
	KubeletConfig struct {
		PodPidsLimit         *int64 `json:"podPidsLimit"`
		SingleProcessOOMKill *bool  `json:"singleProcessOOMKill"`
	} `json:"kubeletconfig"`
}

// kubelets returns the kubelets' limits, read again when older than kubeletsFor (or when fresh).
func (d *Driver) kubelets(ctx context.Context, fresh bool) kubeletLimits {
	d.mu.Lock()
	k := d.limits
	d.mu.Unlock()
	if !fresh && !k.readAt.IsZero() && k.readError == nil && time.Since(k.readAt) < kubeletsFor {
		return k
	}
	k = d.readKubelets(ctx)
	d.mu.Lock()
	d.limits = k
	d.mu.Unlock()
	return k
}

// readKubelets reads the configuration of every schedulable node's kubelet.
func (d *Driver) readKubelets(ctx context.Context) kubeletLimits {
	k := kubeletLimits{readAt: time.Now()}
	nodes, err := d.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		k.readError = fmt.Errorf("list the nodes (the driver's role needs list on nodes): %w", err)
		return k
	}
	var problems []string
	for _, n := range nodes.Items {
		if n.Spec.Unschedulable || !nodeReady(&n) {
			continue
		}
		raw, err := d.cs.CoreV1().RESTClient().Get().Resource("nodes").Name(n.Name).
			SubResource("proxy").Suffix("configz").DoRaw(ctx)
		if err != nil {
			k.readError = fmt.Errorf("read node %s's kubelet configuration (the driver's role needs get on nodes/proxy): %w", n.Name, err)
			return k
		}
		var c kubeletConfig
		if err := json.Unmarshal(raw, &c); err != nil {
			k.readError = fmt.Errorf("node %s's kubelet configuration: %w", n.Name, err)
			return k
		}
		k.nodes = append(k.nodes, n.Name)
		problems = append(problems, nodeProblems(n.Name, c)...)
		if p := c.KubeletConfig.PodPidsLimit; p != nil && *p > k.pids {
			k.pids = *p
		}
	}
	if len(k.nodes) == 0 {
		problems = append(problems, "no node is ready and schedulable")
	}
	if len(problems) > 0 {
		k.err = errors.New(strings.Join(problems, "; "))
	}
	return k
}

// nodeProblems says what makes node's kubelet configuration c unfit for sandboxes.
func nodeProblems(node string, c kubeletConfig) []string {
	var p []string
	if l := c.KubeletConfig.PodPidsLimit; l == nil || *l <= 0 {
		p = append(p, fmt.Sprintf("node %s's kubelet sets no podPidsLimit, so a fork bomb in one sandbox would exhaust the node's PIDs (set podPidsLimit in its KubeletConfiguration)", node))
	}
	if o := c.KubeletConfig.SingleProcessOOMKill; o == nil || !*o {
		p = append(p, fmt.Sprintf("node %s's kubelet lacks singleProcessOOMKill=true (on cgroup v2 a run's OOM would kill the whole container, the sandbox's agent with it)", node))
	}
	return p
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// fit returns why a sandbox of spawn and pids cannot be created on the cluster's nodes, or nil.
func (k kubeletLimits) fit(spawn bool, pids int64) error {
	if k.readError != nil {
		return fmt.Errorf("the nodes' limits are unknown: %w", k.readError)
	}
	if k.err != nil {
		return k.err
	}
	if spawn && pids > 0 && k.pids > pids {
		return fmt.Errorf("%w, allow_spawn with a pids limit of %d needs the kubelets' podPidsLimit at most %d, and the cluster's pods get %d (Kubernetes has no pids limit per pod)",
			driver.ErrUnsupported, pids, pids, k.pids)
	}
	return nil
}
