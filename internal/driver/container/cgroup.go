package container

import (
	"github.com/sandboxd/sandboxd/internal/cgroup"
)

// cgroupParent is the cgroup (relative to every hierarchy's root) under which sandboxes live:
// cgroupsPath in config.json is cgroupParent/<id>, with the cgroupfs driver.
const cgroupParent = "/sandboxd"

// cgroupLayout is the host's cgroup layout (package cgroup) with the container driver's naming:
// a sandbox's group is cgroupParent/<id>, made by the OCI runtime.
type cgroupLayout struct{ cgroup.Layout }

func readCgroupLayout() (cgroupLayout, error) {
	l, err := cgroup.ReadLayout()
	return cgroupLayout{l}, err
}

// cgroupGroup is the group of sandbox id.
func cgroupGroup(id string) string { return cgroupParent + "/" + id }

// sandboxDir is the sandbox's cgroup directory in hierarchy m.
func sandboxDir(m cgroup.Mount, id string) string { return cgroup.Dir(m, cgroupGroup(id)) }

// memoryDir is the sandbox's memory cgroup directory (also used for its process list).
func (l cgroupLayout) memoryDir(id string) string { return l.MemoryDir(cgroupGroup(id)) }

// oomKills returns the sandbox's OOM-kill counter.
func (l cgroupLayout) oomKills(id string) (int64, error) { return l.OOMKills(cgroupGroup(id)) }

// procs lists the PIDs (host view) in the sandbox's memory cgroup and its descendants.
func (l cgroupLayout) procs(id string) ([]int, error) { return l.Procs(cgroupGroup(id)) }

// removeCgroups kills whatever is left in the sandbox's cgroups and removes its directories in
// every hierarchy. Missing directories are fine.
func (l cgroupLayout) removeCgroups(id string) error { return l.Remove(cgroupGroup(id)) }
