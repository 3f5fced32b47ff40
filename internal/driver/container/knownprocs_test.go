package container

import (
	"bufio"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestKnownProcs: the straggler check's memory of a sandbox's processes gives what reading their
// status gives, reads again what it cannot vouch for (a process that ended, PID reused or not;
// one whose parent ended and was reparented), and forgets what left the listing. Host processes
// stand in for a sandbox's (no root needed); being outside every PID namespace below the host's,
// they are treated as zygotes are: a parent not vouched for is reported as 0, never a stale one.
func TestKnownProcs(t *testing.T) {
	// parent: a shell that starts a sleep (child) and then becomes a sleep itself.
	start := func(t *testing.T) (parent *exec.Cmd, child int) {
		t.Helper()
		cmd := exec.Command("sh", "-c", "sleep 100 & echo $!; exec sleep 100")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		child, err = strconv.Atoi(strings.TrimSpace(line))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if p, err := os.FindProcess(child); err == nil {
				p.Kill()
			}
		})
		return cmd, child
	}
	same := func(t *testing.T, k *knownProcs, pids []int) {
		t.Helper()
		got, gz := k.procsOf(pids, -1)
		want, wz := procsOf(pids)
		for i := range want {
			ppidOK := got[i].ppid == want[i].ppid || got[i].ppid == 0 && len(want[i].ns) <= 1 // not vouched for, not used
			if got[i].pid != want[i].pid || !ppidOK || !slices.Equal(got[i].ns, want[i].ns) {
				t.Errorf("process %d: %+v, its status says %+v", pids[i], got[i], want[i])
			}
		}
		if len(gz) != len(wz) {
			t.Errorf("zygotes %v, want %v", gz, wz)
		}
	}
	fds := func(k *knownProcs) map[int]int {
		m := map[int]int{}
		for p, e := range k.m {
			m[p] = e.fd
		}
		return m
	}
	tests := []struct {
		name string
		run  func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int)
	}{
		{"kept between checks", func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int) {
			pids := []int{parent.Process.Pid, child}
			same(t, k, pids)
			before := fds(k)
			same(t, k, pids)
			if after := fds(k); len(after) != 2 || after[child] != before[child] || after[parent.Process.Pid] != before[parent.Process.Pid] {
				t.Errorf("entries %v then %v: want both kept", before, after)
			}
		}},
		{"ended and reaped, still listed", func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int) {
			pids := []int{parent.Process.Pid, child}
			same(t, k, pids)
			parent.Process.Kill()
			parent.Wait()
			// The listing was taken before the end: its status is gone, the entry must not speak for it.
			got, _ := k.procsOf(pids, -1)
			if got[0].ns != nil || k.m[parent.Process.Pid] != nil {
				t.Errorf("an ended process: %+v, entry %v", got[0], k.m[parent.Process.Pid])
			}
		}},
		{"reparented", func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int) {
			pids := []int{parent.Process.Pid, child}
			same(t, k, pids)
			ppid := parent.Process.Pid
			parent.Process.Kill()
			parent.Wait()
			got, _ := k.procsOf(pids, -1)
			if got[1].ppid == ppid {
				t.Errorf("the child of an ended parent: ppid %d, want its new parent or 0", got[1].ppid)
			}
			same(t, k, []int{child})
		}},
		{"left the listing", func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int) {
			same(t, k, []int{parent.Process.Pid, child})
			same(t, k, []int{child})
			if _, ok := k.m[parent.Process.Pid]; ok || len(k.m) != 1 {
				t.Errorf("entries %v: want the child's only", fds(k))
			}
		}},
		{"the agent's entry does not depend on its parent", func(t *testing.T, k *knownProcs, parent *exec.Cmd, child int) {
			k.procsOf([]int{child}, child) // no parent entry: usable only as the init's
			before := fds(k)
			k.procsOf([]int{child}, child)
			if after := fds(k); after[child] != before[child] {
				t.Errorf("entries %v then %v", before, after)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent, child := start(t)
			k := &knownProcs{}
			defer k.close()
			tt.run(t, k, parent, child)
		})
	}
}
