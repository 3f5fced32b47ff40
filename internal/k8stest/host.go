package k8stest

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/cgroup"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// sysctls are the kernel settings the cluster changes (the kubelet's tunables, and the bridge
// plugin's ip_forward), restored by teardown from the state directory's sysctls.json.
var sysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
}

// hostDirs are host directories a component may create despite the configuration (the kubelet's
// /var/log/containers symlinks, defaults of containerd's and the CNI plugins'); teardown removes
// those that did not exist before, if empty.
var hostDirs = []string{
	"/var/log/containers", "/var/log/pods", "/var/lib/kubelet", "/var/lib/containerd", "/run/containerd",
	"/var/run/netns", "/var/lib/cni", "/etc/cni", "/opt/cni", "/opt/containerd", "/run/kubernetes",
	"/etc/kubernetes", "/usr/libexec/kubernetes",
}

// hostState is what of the host the cluster may change, before it starts.
type hostState struct {
	Sysctls map[string]string `json:"sysctls"`
	Missing []string          `json:"missing"` // hostDirs that did not exist
}

func snapshotHost() hostState {
	s := hostState{Sysctls: map[string]string{}}
	for _, k := range sysctls {
		if v, err := os.ReadFile("/proc/sys/" + k); err == nil {
			s.Sysctls[k] = strings.TrimSpace(string(v))
		}
	}
	for _, d := range hostDirs {
		if _, err := os.Lstat(d); errors.Is(err, os.ErrNotExist) {
			s.Missing = append(s.Missing, d)
		}
	}
	return s
}

// saveHostSettings writes c.before into the state directory, for a teardown by another process.
func (c *Cluster) saveHostSettings() error {
	b, _ := json.Marshal(c.before)
	return os.WriteFile(filepath.Join(c.dir, "host.json"), b, 0o600)
}

// nodeIP is the IPv4 address of the interface of the default route (else the first global one).
func nodeIP() (string, error) {
	var names []string
	if f, err := os.Open("/proc/net/route"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) > 2 && fs[1] == "00000000" {
				names = append(names, fs[0])
			}
		}
		f.Close()
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for _, i := range ifs {
		if i.Flags&net.FlagUp != 0 && i.Flags&net.FlagLoopback == 0 && i.Name != BridgeName {
			names = append(names, i.Name)
		}
	}
	for _, n := range names {
		i, err := net.InterfaceByName(n)
		if err != nil {
			continue
		}
		addrs, _ := i.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() {
				return ipn.IP.String(), nil
			}
		}
	}
	return "", errors.New("no non-loopback IPv4 address for the node (the kubelet must not listen on loopback)")
}

// hostRoutes are the host's IPv4 routes but the default one and those of interface skip.
func hostRoutes(skip string) []*net.IPNet {
	var routes []*net.IPNet
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 || fs[1] == "Destination" || fs[1] == "00000000" || (skip != "" && fs[0] == skip) {
			continue
		}
		d, err1 := strconv.ParseUint(fs[1], 16, 32)
		m, err2 := strconv.ParseUint(fs[7], 16, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		ip, mask := make(net.IP, 4), make(net.IPMask, 4)
		binary.LittleEndian.PutUint32(ip, uint32(d))
		binary.LittleEndian.PutUint32(mask, uint32(m))
		routes = append(routes, &net.IPNet{IP: ip, Mask: mask})
	}
	return routes
}

// podCIDR is the first of 10.244.N.0/24 that no route of the host's overlaps.
func podCIDR() (string, error) {
	routes := hostRoutes(BridgeName)
	for n := 0; n < 256; n++ {
		_, cand, _ := net.ParseCIDR(fmt.Sprintf("10.244.%d.0/24", n))
		free := true
		for _, r := range routes {
			if r.Contains(cand.IP) || cand.Contains(r.IP) {
				free = false
				break
			}
		}
		if free {
			return cand.String(), nil
		}
	}
	return "", errors.New("no free 10.244.N.0/24 for the pods")
}

// serviceRouteProto marks the host's unreachable route for serviceCIDR as the cluster's (ip
// route's "proto"), so that teardown deletes that route and no other.
const serviceRouteProto = "77"

// blockServiceCIDR makes serviceCIDR unreachable on the host: the pods route it to the host
// (podRoutes), where kube-proxy DNATs the Service ports it programmed before routing; without
// this route the rest of the range (an unallocated address, a Service's other port) would be
// forwarded along the host's default route, beyond the host. A host route of its own
// overlapping serviceCIDR is an error (not replaced).
func blockServiceCIDR() error {
	_, svc, _ := net.ParseCIDR(serviceCIDR)
	for _, r := range hostRoutes("") {
		if r.Contains(svc.IP) || svc.Contains(r.IP) {
			return fmt.Errorf("the host has a route %s overlapping the cluster's service range %s", r, serviceCIDR)
		}
	}
	if out, err := exec.Command("ip", "route", "add", "unreachable", serviceCIDR, "proto", serviceRouteProto).CombinedOutput(); err != nil {
		return fmt.Errorf("ip route add unreachable %s: %v: %s", serviceCIDR, err, out)
	}
	return nil
}

// unblockServiceCIDR deletes blockServiceCIDR's route, if there.
func unblockServiceCIDR() error {
	out, err := exec.Command("ip", "route", "show", "exact", serviceCIDR, "proto", serviceRouteProto).Output()
	if err != nil || len(strings.TrimSpace(string(out))) == 0 {
		return nil
	}
	if out, err := exec.Command("ip", "route", "del", "unreachable", serviceCIDR, "proto", serviceRouteProto).CombinedOutput(); err != nil {
		return fmt.Errorf("ip route del unreachable %s: %v: %s", serviceCIDR, err, out)
	}
	return nil
}

// proxyTables are the nftables tables kube-proxy (nftables mode) makes, family and name.
var proxyTables = [][2]string{{"ip", "kube-proxy"}, {"ip6", "kube-proxy"}}

// leftProxyTables is those of proxyTables the host has.
func leftProxyTables() ([][2]string, error) {
	out, err := exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w", err)
	}
	var left [][2]string
	for _, l := range strings.Split(string(out), "\n") {
		for _, t := range proxyTables {
			if strings.TrimSpace(l) == "table "+t[0]+" "+t[1] {
				left = append(left, t)
			}
		}
	}
	return left, nil
}

// deleteProxyTables deletes kube-proxy's tables (its rules do not outlive the cluster: it
// leaves them when it exits, to keep serving across a restart).
func deleteProxyTables() error {
	left, err := leftProxyTables()
	if err != nil {
		return err
	}
	var errs []error
	for _, t := range left {
		if out, err := exec.Command("nft", "delete", "table", t[0], t[1]).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("nft delete table %s %s: %v: %s", t[0], t[1], err, out))
		}
	}
	return errors.Join(errs...)
}

// cgroupMounts are the mount points of the host's cgroup hierarchies (v1 and v2).
func cgroupMounts() []string {
	l, err := cgroup.ReadLayout()
	if err != nil {
		return nil
	}
	var out []string
	for _, m := range l.Mounts() {
		out = append(out, m.Dir)
	}
	return out
}

// makeCgroupRoot makes CgroupRoot in every hierarchy (the kubelet requires it to exist), with
// the parent's cpus and mems in a cgroup v1 cpuset.
func makeCgroupRoot() error {
	for _, m := range cgroupMounts() {
		d := filepath.Join(m, CgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(m, f)); err == nil {
				if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(d, f), err)
				}
			}
		}
	}
	return nil
}

// mountPoints is the mount points of this process's mount namespace.
func mountPoints() []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if fs := strings.Fields(l); len(fs) > 4 {
			// A mount point whose directory was removed reads "…//deleted".
			out = append(out, strings.TrimSuffix(cgroup.UnescapeMountinfo(fs[4]), "//deleted"))
		}
	}
	return out
}

// stop shuts the cluster down and releases the lock.
func (c *Cluster) stop() error {
	err := c.shutdown()
	c.unlock()
	return err
}

// shutdown stops the components in reverse order of start (SIGTERM, then SIGKILL after a
// grace), then tears the rest down; the lock stays held.
func (c *Cluster) shutdown() error {
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		if p.exited() {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
	return teardown(c.dir)
}

// unlock releases the host-wide lock (another process may start its cluster at once).
func (c *Cluster) unlock() {
	if c.lock != nil {
		_ = c.lock.Truncate(0)
		c.lock.Close() // releases the flock
		c.lock = nil
	}
}

// teardown removes what a cluster with state directory dir left: processes that name dir
// (containerd's shims, and the components if a killed test process left them), the processes of
// the pods' cgroups and those cgroups, the mounts under dir (pods' root filesystems, network
// namespaces, shm), the bridge, the kubelet's symlinks into dir, dir itself; it restores the
// kernel settings and removes the host directories that did not exist before, if empty.
// stateDirName matches the name of a cluster's state directory in os.TempDir() (os.MkdirTemp's
// random digits), and no other's (the kubernetes driver's tests' sandboxd-k8s-driver-*).
var stateDirName = regexp.MustCompile(`^sandboxd-k8s-[0-9]+$`)

// leftovers returns the state directories killed holders of the lock left: the one the lock
// file names, every other one in os.TempDir() (a holder killed before it wrote the lock file, or
// whose teardown failed and was forgotten when the next holder wrote its own), and those only
// mounts still name (their directory removed). Only the lock's holder may call it.
func leftovers() []string {
	seen := map[string]bool{}
	var dirs []string
	add := func(d string) {
		if d = filepath.Clean(d); !seen[d] && filepath.Dir(d) == filepath.Clean(os.TempDir()) && stateDirName.MatchString(filepath.Base(d)) {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	if prev, _ := os.ReadFile(lockPath()); len(prev) > 0 {
		add(string(prev))
	}
	if ents, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				add(filepath.Join(os.TempDir(), e.Name()))
			}
		}
	}
	tmp := filepath.Clean(os.TempDir()) + "/"
	for _, m := range mountPoints() {
		if rest, ok := strings.CutPrefix(m, tmp); ok {
			first, _, _ := strings.Cut(rest, "/")
			add(tmp + first)
		}
	}
	return dirs
}

func teardown(dir string) error {
	var errs []error
	// Processes naming dir: SIGKILL, and wait until gone.
	for _, pid := range pidsNaming(dir) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if !waitfor.Until(30*time.Second, func() bool { return len(pidsNaming(dir)) == 0 }) {
		errs = append(errs, fmt.Errorf("processes naming %s survive SIGKILL: %v", dir, pidsNaming(dir)))
	}
	if err := removeCgroupRoot(); err != nil {
		errs = append(errs, err)
	}
	// Mounts under dir, deepest first.
	var points []string
	for _, m := range mountPoints() {
		if m == dir || strings.HasPrefix(m, dir+"/") {
			points = append(points, m)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("umount %s: %w", p, err))
		}
	}
	// containerd 1.6 keeps two things outside its root and state whatever the configuration:
	// its shims' sockets (named by a hash of its address, namespace and the task's ID) and the
	// CNI library's cached results (named by network, container ID and interface). A shim or
	// a sandbox killed here leaves them.
	sock := filepath.Join(dir, "containerd", "containerd.sock")
	ids := containerIDs(dir)
	for _, id := range ids {
		_ = os.Remove(fmt.Sprintf("/run/containerd/s/%x", sha256.Sum256([]byte(filepath.Join(sock, "k8s.io", id)))))
	}
	// The results of this network are all ours (one cluster at a time), earlier ones included.
	if ents, err := os.ReadDir(cniResults); err == nil {
		for _, e := range ents {
			if rest, ok := strings.CutPrefix(e.Name(), cniNetwork+"-"); ok {
				if i := strings.LastIndex(rest, "-"); i > 0 {
					ids = append(ids, rest[:i])
				}
			}
		}
		for _, e := range ents {
			for _, id := range ids {
				if strings.Contains(e.Name(), "-"+id+"-") {
					_ = os.Remove(filepath.Join(cniResults, e.Name()))
				}
			}
		}
	}
	if err := unblockServiceCIDR(); err != nil {
		errs = append(errs, err)
	}
	if err := deleteProxyTables(); err != nil {
		errs = append(errs, err)
	}
	if _, err := net.InterfaceByName(BridgeName); err == nil {
		if out, err := exec.Command("ip", "link", "del", BridgeName).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip link del %s: %v: %s", BridgeName, err, out))
		}
	}
	if ents, err := os.ReadDir("/var/log/containers"); err == nil {
		for _, e := range ents {
			p := filepath.Join("/var/log/containers", e.Name())
			if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, dir+"/") {
				_ = os.Remove(p)
			}
		}
	}
	var before hostState
	if b, err := os.ReadFile(filepath.Join(dir, "host.json")); err == nil && json.Unmarshal(b, &before) == nil {
		for k, v := range before.Sysctls {
			if cur, err := os.ReadFile("/proc/sys/" + k); err == nil && strings.TrimSpace(string(cur)) != v {
				if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
					errs = append(errs, fmt.Errorf("restore %s=%s: %w", k, v, err))
				}
			}
		}
		for _, d := range before.Missing {
			removeEmptyTree(d)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// cniResults is where the CNI library caches the results of ADD (libcni's default cache dir).
const cniResults = "/var/lib/cni/results"

// containerIDs is the IDs of the sandboxes and containers the containerd under dir knew.
func containerIDs(dir string) []string {
	var ids []string
	for _, d := range []string{
		"containerd/state/io.containerd.runtime.v2.task/k8s.io",
		"containerd/root/io.containerd.grpc.v1.cri/sandboxes",
		"containerd/root/io.containerd.grpc.v1.cri/containers",
	} {
		ents, _ := os.ReadDir(filepath.Join(dir, d))
		for _, e := range ents {
			ids = append(ids, e.Name())
		}
	}
	return ids
}

// removeEmptyTree removes d if it holds directories and sockets only (bottom-up): a directory
// the cluster created, with the sockets of its dead processes (the kubelet's device-plugin
// socket is /var/lib/kubelet/device-plugins/kubelet.sock whatever its root dir).
func removeEmptyTree(d string) {
	ents, err := os.ReadDir(d)
	if err != nil {
		return
	}
	for _, e := range ents {
		switch p := filepath.Join(d, e.Name()); {
		case e.IsDir():
			removeEmptyTree(p)
		case e.Type()&os.ModeSocket != 0:
			_ = os.Remove(p)
		}
	}
	_ = os.Remove(d)
}

// pidsNaming is the processes whose command line names dir (other than this one).
func pidsNaming(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmdline), dir+"/") {
			out = append(out, pid)
		}
	}
	return out
}

// removeCgroupRoot kills every process of CgroupRoot's cgroups and removes them, in every
// hierarchy.
func removeCgroupRoot() error {
	l, err := cgroup.ReadLayout()
	if err != nil {
		return err
	}
	return l.Remove(CgroupRoot)
}
