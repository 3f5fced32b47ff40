package kubernetes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// FilesPort is the port the files sidecar listens on in every pod.
const FilesPort = 7071

// filesMemory is what the files sidecar needs beside the files it writes (its runtime, a buffer
// per connection).
const filesMemory = 32 << 20

// filesContainer is the pod's files sidecar: a native sidecar (an init container that keeps
// running, restarted if it ends) from the agent image, running "sandbox-agent files" (package
// agent, files.go) as the sandbox's user, confined as the sandbox's container is (restricted), the
// whole disk volume mounted writable at diskRoot. What it writes on the disk (a tmpfs) is charged
// to its memory: its limit is the disk's size and its own needs.
func filesContainer(agentImage string, restricted *corev1.SecurityContext, diskBytes int64) corev1.Container {
	always := corev1.ContainerRestartPolicyAlways
	// It requests only its own needs: the disk's pages are there only as far as the sandbox's
	// files fill it (the scheduler would otherwise reserve the whole disk again per pod).
	limits := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("100m"),
		corev1.ResourceMemory: *resource.NewQuantity(diskBytes+filesMemory, resource.BinarySI),
	}
	requests := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("10m"),
		corev1.ResourceMemory: *resource.NewQuantity(filesMemory, resource.BinarySI),
	}
	return corev1.Container{
		Name:            "files",
		Image:           agentImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		RestartPolicy:   &always,
		Command: []string{"/sandbox-agent", "files", "--listen", ":" + strconv.Itoa(FilesPort),
			"--secret-file", secretDir + "/" + secretKey, "--root", diskRoot},
		Ports: []corev1.ContainerPort{{Name: "files", ContainerPort: FilesPort, Protocol: corev1.ProtocolTCP}},
		VolumeMounts: []corev1.VolumeMount{
			{Name: "disk", MountPath: diskRoot},
			{Name: "secret", MountPath: secretDir, ReadOnly: true},
		},
		SecurityContext: restricted,
		Resources:       corev1.ResourceRequirements{Requests: requests, Limits: limits},
	}
}

// files returns the client of sandbox id's files sidecar.
func (d *Driver) files(ctx context.Context, id string) (agent.FilesClient, error) {
	b, err := d.lookup(ctx, id)
	if err != nil {
		return agent.FilesClient{}, err
	}
	return agent.FilesClient{Dial: agent.TCPDial(b.filesAddr, b.secret)}, nil
}

// filesErr is err of a files operation on sandbox id: ErrNotFound if the sandbox is gone
// meanwhile (the sidecar unreachable because its pod is), else err.
func (d *Driver) filesErr(ctx context.Context, id, op string, err error) error {
	if err == nil {
		return nil
	}
	var ne net.Error
	if ctx.Err() == nil && (errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF)) {
		d.forget(id)
		if _, lerr := d.lookup(ctx, id); errors.Is(lerr, driver.ErrNotFound) {
			return lerr
		}
	}
	return fmt.Errorf("kubernetes: %s in sandbox %s: %w", op, id, err)
}

// WriteFile stores r as rel of the sandbox's path mount (driver.Filer), through its files sidecar.
func (d *Driver) WriteFile(ctx context.Context, id, mount, rel string, r io.Reader, limit int64) (int64, string, error) {
	c, err := d.files(ctx, id)
	if err != nil {
		return 0, "", err
	}
	size, sum, err := c.Write(ctx, mountDir(mount), rel, r, limit)
	return size, sum, d.filesErr(ctx, id, "write "+mount+"/"+rel, err)
}

// OpenFile opens rel of the sandbox's path mount for reading (driver.Filer).
func (d *Driver) OpenFile(ctx context.Context, id, mount, rel string) (driver.File, hostfs.Info, error) {
	c, err := d.files(ctx, id)
	if err != nil {
		return nil, hostfs.Info{}, err
	}
	f, err := c.Open(ctx, mountDir(mount), rel)
	if err != nil {
		return nil, hostfs.Info{}, d.filesErr(ctx, id, "open "+mount+"/"+rel, err)
	}
	return f, f.Info, nil
}

// RemoveFile removes rel of the sandbox's path mount (driver.Filer).
func (d *Driver) RemoveFile(ctx context.Context, id, mount, rel string) error {
	c, err := d.files(ctx, id)
	if err != nil {
		return err
	}
	return d.filesErr(ctx, id, "remove "+mount+"/"+rel, c.Remove(ctx, mountDir(mount), rel))
}

// DiskUsage returns the bytes the files on the sandbox's disk use (driver.Filer).
func (d *Driver) DiskUsage(ctx context.Context, id string) (int64, error) {
	c, err := d.files(ctx, id)
	if err != nil {
		return 0, err
	}
	n, err := c.Usage(ctx)
	return n, d.filesErr(ctx, id, "disk usage", err)
}

// CreateContext starts code context name's interpreter in sandbox id (driver.Contexter).
func (d *Driver) CreateContext(ctx context.Context, id, name string) error {
	return d.contextOp(ctx, id, name, agent.OpContextCreate)
}

// DeleteContext ends code context name's interpreter in sandbox id (driver.Contexter).
func (d *Driver) DeleteContext(ctx context.Context, id, name string) error {
	return d.contextOp(ctx, id, name, agent.OpContextDelete)
}

// contextTimeout bounds a context's creation or deletion (an interpreter's start, or its end).
const contextTimeout = 30 * time.Second

func (d *Driver) contextOp(ctx context.Context, id, name, op string) error {
	b, err := d.lookup(ctx, id)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, contextTimeout)
	defer cancel()
	res, err := agent.RunDial(ctx, agent.TCPDial(b.addr, b.secret),
		agent.RunRequest{Op: op, Context: name, MaxOutput: agent.DefaultMaxOutput}, nil, nil)
	if err != nil {
		d.forget(id)
		if _, lerr := d.lookup(ctx, id); errors.Is(lerr, driver.ErrNotFound) {
			return lerr
		}
		return fmt.Errorf("kubernetes: %s %s in sandbox %s: %w", op, name, id, err)
	}
	if res.AgentError != "" {
		return fmt.Errorf("kubernetes: %s %s in sandbox %s: agent: %s", op, name, id, res.AgentError)
	}
	return nil
}

// waitFiles returns once b's files sidecar answers (it starts before the sandbox's container,
// but need not listen yet when the agent does).
func waitFiles(ctx context.Context, b *box) error {
	c := agent.FilesClient{Dial: agent.TCPDial(b.filesAddr, b.secret)}
	var last error
	for {
		if last = c.Ping(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("files sidecar at %s not ready: %w (last error: %v)", b.filesAddr, ctx.Err(), last)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

var (
	_ driver.Filer     = (*Driver)(nil)
	_ driver.Contexter = (*Driver)(nil)
)
