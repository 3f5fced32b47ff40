package kubernetes

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/sandboxd/sandboxd/internal/driver"
)

// A sandbox's pod can end without the driver: the kubelet evicts it (its disk, or the node's
// pressure), its node goes, its sandbox container dies (restartPolicy Never: the pod fails). Such a
// sandbox is gone: Exec says so with a *driver.GoneError (an ErrNotFound with the reason), which
// the service turns into the sandbox's end, so that later runs are not service errors until its
// expiry. A container the kernel OOM-killed as a whole (a kubelet without singleProcessOOMKill
// on cgroup v2 sets memory.oom.group) ended the run that was running: that run's result is oom,
// and the sandbox is gone after it.

// podEnd says why p no longer runs its sandbox ("" while it does or may still), and whether its
// sandbox container was OOM-killed.
func podEnd(p *corev1.Pod) (reason string, oom bool) {
	if p.Status.Phase == corev1.PodFailed && p.Status.Reason == "Evicted" { // its containers' ends follow from it
		return "its pod was evicted by the node" + suffix(p.Status.Message), false
	}
	for _, cs := range p.Status.ContainerStatuses {
		if cs.Name != "sandbox" {
			continue
		}
		if t := cs.State.Terminated; t != nil {
			if t.Reason == "OOMKilled" {
				return fmt.Sprintf("its container was OOM-killed as a whole, the sandbox's agent with it (exit %d; on cgroup v2 a kubelet without singleProcessOOMKill=true kills every process of the container)", t.ExitCode), true
			}
			return fmt.Sprintf("its container ended (exit %d %s%s)", t.ExitCode, t.Reason, suffix(t.Message)), false
		}
	}
	switch {
	case p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded:
		return fmt.Sprintf("its pod ended (%s %s%s)", p.Status.Phase, p.Status.Reason, suffix(p.Status.Message)), false
	case p.DeletionTimestamp != nil:
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.DisruptionTarget && c.Status == corev1.ConditionTrue {
				return fmt.Sprintf("its pod was evicted by the cluster (%s%s)", c.Reason, suffix(c.Message)), false
			}
		}
		return "its pod is being deleted by the cluster", false
	}
	return "", false
}

func suffix(msg string) string {
	msg = strings.TrimSpace(strings.ReplaceAll(msg, ": ", ", "))
	if msg == "" {
		return ""
	}
	return ", " + msg
}

// gone returns a *driver.GoneError for sandbox id that ended for reason.
func gone(id, reason string) error {
	return &driver.GoneError{Reason: "the sandbox's pod no longer runs, " + reason, ID: id}
}

// endWait bounds how long Exec waits, after its agent's connection broke, for the pod's status to
// say whether the pod ended (the kubelet reports a dead container within a second or two).
const endWait = 15 * time.Second

// afterBrokenRun looks at sandbox id's pod after its agent's connection broke during a run: oom
// when its container was OOM-killed (the run's result), a *driver.GoneError when the pod ended
// otherwise, else nil (the pod runs: the caller's error stands). It waits up to endWait for the
// kubelet to report the container's end.
func (d *Driver) afterBrokenRun(ctx context.Context, id string) (oom bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, endWait)
	defer cancel()
	name := objectName(id)
	p, err := d.cs.CoreV1().Pods(d.ns).Get(ctx, name, metav1.GetOptions{})
	for {
		if apierrors.IsNotFound(err) {
			return false, gone(id, "its pod was deleted")
		}
		if err != nil {
			return false, nil
		}
		if p.Labels[labelID] != id {
			return false, driver.ErrNotFound
		}
		if reason, oom := podEnd(p); reason != "" {
			if oom {
				d.log.Error("a run's OOM killed the sandbox's whole container, its agent with it: set singleProcessOOMKill: true in the kubelets' configuration",
					"sandbox", id, "pod", name, "node", p.Spec.NodeName)
				return true, nil
			}
			return false, gone(id, reason)
		}
		w, werr := d.cs.CoreV1().Pods(d.ns).Watch(ctx, metav1.ListOptions{
			FieldSelector:   fields.OneTermEqualSelector("metadata.name", name).String(),
			ResourceVersion: p.ResourceVersion,
		})
		if werr != nil {
			return false, nil
		}
		next := (*corev1.Pod)(nil)
		for ev := range w.ResultChan() {
			if q, ok := ev.Object.(*corev1.Pod); ok {
				if ev.Type == watch.Deleted {
					w.Stop()
					return false, gone(id, "its pod was deleted")
				}
				next = q
				break
			}
		}
		w.Stop()
		if next == nil { // the wait is over (or the watch ended): look once more
			if ctx.Err() != nil {
				return false, nil
			}
			p, err = d.cs.CoreV1().Pods(d.ns).Get(ctx, name, metav1.GetOptions{})
			continue
		}
		p, err = next, nil
	}
}
