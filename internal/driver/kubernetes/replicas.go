package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sandboxd/sandboxd/internal/driver"
)

var _ driver.ReplicaDestroyer = (*Driver)(nil)

// DestroyReplica destroys the sandboxes another replica's driver made in the driver's namespace
// before before (driver.ReplicaDestroyer): the pods and Secrets labelled with that replica, warm
// ones included. The pods of a lost replica do not die with its host; the replica that declares
// it lost calls this. A pod's creation time is the apiserver's, in whole seconds.
func (d *Driver) DestroyReplica(ctx context.Context, replica string, before time.Time) (int, error) {
	if replica == "" || !labelValue.MatchString(replica) {
		return 0, fmt.Errorf("kubernetes: replica %q is not a label value", replica)
	}
	opts := metav1.ListOptions{LabelSelector: labels.SelectorFromSet(labels.Set{labelManagedBy: managedBy, labelReplica: replica}).String()}
	pods, err := d.cs.CoreV1().Pods(d.ns).List(ctx, opts)
	if err != nil {
		return 0, fmt.Errorf("kubernetes: pods of replica %s: %w", replica, err)
	}
	secrets, err := d.cs.CoreV1().Secrets(d.ns).List(ctx, opts)
	if err != nil {
		return 0, fmt.Errorf("kubernetes: secrets of replica %s: %w", replica, err)
	}
	seen := map[string]bool{}
	var ids []string
	for _, m := range append(metas(pods.Items), metasOfSecrets(secrets.Items)...) {
		id := m.Labels[labelID]
		if id == "" || seen[id] || m.Name != objectName(id) || !m.CreationTimestamp.Time.Before(before) {
			continue
		}
		seen[id] = true
		ids = append(ids, id)
	}
	// A few at a time: each waits for its pod to go.
	sem := make(chan struct{}, 8)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for _, id := range ids {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := d.Destroy(ctx, id); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return len(ids) - len(errs), errors.Join(errs...)
}
