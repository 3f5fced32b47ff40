// Package vm runs the end-to-end suite (test/e2e) inside a cgroup v2 VM: Debian 12's own kernel
// under qemu (software emulation), with only cgroup v2 mounted, once with a plain init and once
// under systemd 252 as PID 1. It proves sandboxd works on the hosts most users have, from a host
// that is cgroup v1 hybrid without systemd.
//
// Contract. The VM (scripts/build-vm.sh; its directory in SANDBOXD_VM) sees the host's / read-only
// over 9p under a tmpfs overlay, so the guest runs this host's binaries at their host paths, and a
// read-write "job" directory at /vm/job: this test writes job.sh, env and e2e.test there; the
// guest's /vm/run-job writes `started` (boot is over), output.log and, last, `status` (job.sh's
// exit status), then powers off. job.sh records what the guest looks like (mountinfo, cgroup,
// nft tables) before the suite and what is left after it (network namespaces, nft tables, cgroups
// and mounts named after sandboxd); the test asserts on them here.
//
// It needs root, qemu-system-x86_64, SANDBOXD_BIN, SANDBOXD_ROOTFS, SANDBOXD_PYTHON_WASM (as
// test/e2e) and SANDBOXD_VM; `make test` provides them. Without them the test skips, except when
// CI is set: then it fails. The guest has no network device: only loopback.
package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// suite is the -test.run pattern of the end-to-end tests run inside the VM: both modes, runs,
// the cpu quota, the memory limit (typed oom) and the pids limit, egress allowed and denied,
// delete and stop leaving nothing behind, restart reconciliation, and (systemd variant) the unit.
// Left out: the tests bound to a sandbox's lifetime (TestSeedExample's 30 s, TestExpiry's 2 s),
// which software emulation's 10-20x slower creates and runs outlive. skip leaves out the ways of
// stopping that differ only in who sends the signal (all run on the host); wantPass are the tests
// that must have passed — not skipped — in each variant.
var (
	suite    = `^(TestResourceLimits|TestCgroupLimits|TestFilesystemRules|TestNetworkEgress|TestCrashRecovery|TestWasmMode|TestStop|TestSystemdService)$`
	skip     = `^TestStop$/^(Ctrl-C_on_its_terminal|SIGINT_to_the_group|SIGINT_twice_to_the_group|SIGTERM_to_the_main_pid)$`
	wantPass = map[string][]string{
		"init":    {"TestResourceLimits", "TestCgroupLimits", "TestFilesystemRules", "TestNetworkEgress", "TestCrashRecovery", "TestWasmMode", "TestStop"},
		"systemd": {"TestResourceLimits", "TestCgroupLimits", "TestFilesystemRules", "TestNetworkEgress", "TestCrashRecovery", "TestWasmMode", "TestStop", "TestSystemdService"},
	}
)

const (
	// e2eTimeout is the suite's -test.timeout inside the guest (software emulation: container
	// work about 20x slower; the default suite took 270-280 s in the guest on a loaded 2-core host). Both variants fit `make test`'s
	// 60 minutes with their boot allowance.
	e2eTimeout = 20 * time.Minute
	// bootAllowance is what the VM may take besides the suite: boot and power-off.
	bootAllowance = 5 * time.Minute
	// watchdogLead is how long before the suite's timeout the guest's watchdog looks at a suite
	// still running (jobScript): the Go timeout's own report never came from a guest that hung.
	watchdogLead = 3 * time.Minute
	// poweroffGrace is how long the guest has to power off once it wrote its status.
	poweroffGrace = 60 * time.Second
)

type env struct {
	bin, rootfs, wasm, vm, qemu string
}

func requireEnv(t *testing.T) env {
	t.Helper()
	e := env{bin: os.Getenv("SANDBOXD_BIN"), rootfs: os.Getenv("SANDBOXD_ROOTFS"),
		wasm: os.Getenv("SANDBOXD_PYTHON_WASM"), vm: os.Getenv("SANDBOXD_VM")}
	var why string
	switch {
	case os.Geteuid() != 0:
		why = "needs root"
	case e.bin == "" || e.rootfs == "" || e.wasm == "":
		why = "needs SANDBOXD_BIN, SANDBOXD_ROOTFS and SANDBOXD_PYTHON_WASM (run make test)"
	case e.vm == "":
		why = "needs SANDBOXD_VM, the directory scripts/build-vm.sh prints (run make test)"
	}
	if why == "" {
		var err error
		if e.qemu, err = exec.LookPath("qemu-system-x86_64"); err != nil {
			why = "no qemu-system-x86_64 (scripts/install-deps.sh installs it)"
		}
	}
	for _, f := range []string{filepath.Join(e.bin, "sandboxd"), filepath.Join(e.vm, "vmlinuz"), filepath.Join(e.vm, "initrd.gz")} {
		if _, err := os.Stat(f); why == "" && err != nil {
			why = err.Error()
		}
	}
	if why != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but the VM tests cannot run: %s", why)
		}
		t.Skip(why)
	}
	return e
}

func TestCgroupV2(t *testing.T) {
	e := requireEnv(t)
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	e2e := filepath.Join(t.TempDir(), "e2e.test")
	build := exec.Command("go", "test", "-c", "-o", e2e, "./test/e2e")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go test -c ./test/e2e: %v\n%s", err, out)
	}
	for _, variant := range []string{"init", "systemd"} {
		t.Run(variant, func(t *testing.T) { runVM(t, e, root, e2e, variant) })
	}
}

// moduleRoot is the directory holding go.mod, above the working directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// jobScript runs the suite in the guest and records the guest's state around it.
const jobScript = `#!/bin/sh
# Written by test/vm: runs the end-to-end suite inside the VM (cwd /vm/job, env from ./env).
J=/vm/job
echo "vm: variant $SANDBOXD_VM_VARIANT, kernel $(uname -r), pid 1 $(cat /proc/1/comm)"
cat /proc/self/mountinfo >$J/mountinfo.before
cat /proc/self/cgroup >$J/cgroup.self
cat /sys/fs/cgroup/cgroup.controllers >$J/cgroup.controllers
nft list tables >$J/nft.before 2>&1
cd "$E2E_DIR" || exit 1
# The watchdog: a heartbeat every 30 s; a suite still running shortly before its own timeout
# records what the guest is doing, then SIGQUITs the servers (their goroutines go to the suite's
# logs) and the suite (its own).
quit() { for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = "$1" ] && kill -QUIT "${d#/proc/}"; done; }
( n=0
  while [ $n -lt "$WATCHDOG_S" ]; do # a heartbeat: a guest that stops writing it hung as a whole
    sleep 30 || exit; n=$((n + 30)); echo "$n s: load $(cat /proc/loadavg)" >>$J/heartbeat.log
  done
  { echo "vm: watchdog after $WATCHDOG_S s: load $(cat /proc/loadavg)"; cat /proc/meminfo | head -3
    for d in /proc/[0-9]*; do
      c=$(tr '\0' ' ' <$d/cmdline 2>/dev/null)
      case "$c" in *e2e.test*|*sandboxd*|*sandbox-agent*|*python*|*crun*)
        echo "== ${d#/proc/} state $(cut -d' ' -f3 $d/stat) wchan $(cat $d/wchan) cgroup $(tr "\n" " " <$d/cgroup): $c"
        cat $d/stack;;
      esac
    done
  } >$J/watchdog.log 2>&1
  quit sandboxd; sleep 30; quit e2e.test ) &
wd=$!
$J/e2e.test -test.v -test.count=1 -test.timeout="$E2E_TIMEOUT" -test.run "$E2E_RUN" -test.skip "$E2E_SKIP"
rc=$?
kill $wd 2>/dev/null
ip netns list >$J/netns.after 2>&1
nft list tables >$J/nft.after 2>&1
find /sys/fs/cgroup -name '*sandbox*' -type d | while read -r d; do echo "$d ($(grep populated "$d/cgroup.events"))"; done >$J/cgroups.after 2>&1
cat /proc/self/mountinfo >$J/mountinfo.after
if [ "$(cat /proc/1/comm)" = systemd ]; then
  systemctl --failed --no-pager >$J/systemd.failed 2>&1
  journalctl -b --no-pager >$J/journal.log 2>&1
fi
exit $rc
`

func runVM(t *testing.T, e env, root, e2eBin, variant string) {
	job := filepath.Join(t.TempDir(), "job")
	if err := os.Mkdir(job, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := copyFile(e2eBin, filepath.Join(job, "e2e.test")); err != nil {
		t.Fatal(err)
	}
	vars := [][2]string{
		{"CI", "1"}, {"HOME", "/root"},
		{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		{"SANDBOXD_BIN", e.bin}, {"SANDBOXD_ROOTFS", e.rootfs}, {"SANDBOXD_PYTHON_WASM", e.wasm},
		{"SANDBOXD_VM_VARIANT", variant},
		{"E2E_DIR", filepath.Join(root, "test", "e2e")}, {"E2E_RUN", suite}, {"E2E_SKIP", skip}, {"E2E_TIMEOUT", e2eTimeout.String()},
		{"WATCHDOG_S", strconv.Itoa(int((e2eTimeout - watchdogLead).Seconds()))},
	}
	var envFile strings.Builder
	for _, kv := range vars {
		fmt.Fprintf(&envFile, "%s=%s\n", kv[0], shellQuote(kv[1]))
	}
	for name, body := range map[string]string{"env": envFile.String(), "job.sh": jobScript} {
		if err := os.WriteFile(filepath.Join(job, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}

	limit := e2eTimeout + bootAllowance
	if d, ok := t.Deadline(); ok && time.Until(d)-30*time.Second < limit {
		limit = time.Until(d) - 30*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	consolePath := filepath.Join(t.TempDir(), "console.log")
	console, err := os.Create(consolePath)
	if err != nil {
		t.Fatal(err)
	}
	defer console.Close()
	cmd := exec.CommandContext(ctx, e.qemu,
		"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "4096",
		"-nographic", "-no-reboot", "-nic", "none",
		"-kernel", filepath.Join(e.vm, "vmlinuz"), "-initrd", filepath.Join(e.vm, "initrd.gz"),
		"-append", "console=ttyS0 quiet panic=-1 cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 sandboxd.vm="+variant,
		"-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
		"-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
		"-fsdev", "local,id=job,path="+job+",security_model=none,multidevs=remap",
		"-device", "virtio-9p-pci,fsdev=job,mount_tag=job")
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no guest outlives a killed test
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// Watch the job directory: `started` ends the boot, `status` the suite.
	var booted, done time.Time
	var qemuErr error
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
wait:
	for {
		select {
		case qemuErr = <-exited:
			break wait
		case <-tick.C:
		}
		if booted.IsZero() && exists(filepath.Join(job, "started")) {
			booted = time.Now()
		}
		if done.IsZero() && exists(filepath.Join(job, "status")) {
			done = time.Now()
			select {
			case qemuErr = <-exited:
			case <-time.After(poweroffGrace):
				t.Logf("the guest did not power off within %v of its status: killed", poweroffGrace)
				cancel()
				<-exited
			}
			break wait
		}
	}
	output := readFile(filepath.Join(job, "output.log"))
	t.Logf("guest output (%s):\n%s", variant, output)
	if wd := readFile(filepath.Join(job, "watchdog.log")); wd != "" {
		t.Errorf("the guest's watchdog fired (the suite neared its timeout):\n%s", tail(wd, 200))
	}
	if done.IsZero() {
		t.Fatalf("the guest wrote no status (qemu: %v, after %.0f s, limit %v); console tail:\n%s\nguest output tail:\n%s\nguest heartbeat tail:\n%s",
			qemuErr, time.Since(start).Seconds(), limit, tail(readFile(consolePath), 40), tail(output, 40), tail(readFile(filepath.Join(job, "heartbeat.log")), 5))
	}

	passed, failed := results(output)
	summary := fmt.Sprintf("vm[%s]: boot %.1f s, tests %.1f s, %d passed, %d failed",
		variant, booted.Sub(start).Seconds(), done.Sub(booted).Seconds(), len(passed), len(failed))
	if len(failed) > 0 {
		summary += " (" + strings.Join(failed, ", ") + ")"
	}
	t.Log(summary)
	fmt.Println(summary)

	for _, name := range wantPass[variant] {
		if !slices.Contains(passed, name) {
			t.Errorf("%s did not pass in the %s variant (failed, skipped or not run)", name, variant)
		}
	}
	checkCgroupV2Only(t, readFile(filepath.Join(job, "mountinfo.before")))
	checkNoLeaks(t, job)
	if status := strings.TrimSpace(readFile(filepath.Join(job, "status"))); status != "0" {
		t.Errorf("the suite exited %s in the guest; guest output tail:\n%s", status, tail(output, 60))
	}
	if t.Failed() && variant == "systemd" {
		t.Logf("systemctl --failed:\n%s", readFile(filepath.Join(job, "systemd.failed")))
	}
}

// checkCgroupV2Only wants one cgroup2 mount, at /sys/fs/cgroup, and no cgroup v1 mount.
func checkCgroupV2Only(t *testing.T, mountinfo string) {
	t.Helper()
	if mountinfo == "" {
		t.Error("the guest recorded no mountinfo")
		return
	}
	var v2, v1 []string
	for _, m := range parseMountinfo(mountinfo) {
		switch m.fstype {
		case "cgroup2":
			v2 = append(v2, m.point)
		case "cgroup":
			v1 = append(v1, m.point)
		}
	}
	if len(v2) != 1 || v2[0] != "/sys/fs/cgroup" || len(v1) > 0 {
		t.Errorf("the guest is not cgroup v2 only: cgroup2 at %v, cgroup v1 at %v", v2, v1)
	}
}

// checkNoLeaks wants the guest as the suite found it: no network namespace, the same nft
// tables, no cgroup and no new mount named after sandboxd.
func checkNoLeaks(t *testing.T, job string) {
	t.Helper()
	if ns := strings.TrimSpace(readFile(filepath.Join(job, "netns.after"))); ns != "" {
		t.Errorf("network namespaces left in the guest:\n%s", ns)
	}
	if before, after := readFile(filepath.Join(job, "nft.before")), readFile(filepath.Join(job, "nft.after")); before != after {
		t.Errorf("nft tables changed in the guest:\nbefore:\n%safter:\n%s", before, after)
	}
	if cg := strings.TrimSpace(readFile(filepath.Join(job, "cgroups.after"))); cg != "" {
		t.Errorf("cgroups left in the guest:\n%s", cg)
	}
	before := map[string]bool{}
	for _, m := range parseMountinfo(readFile(filepath.Join(job, "mountinfo.before"))) {
		before[m.key()] = true
	}
	var left []string
	for _, m := range parseMountinfo(readFile(filepath.Join(job, "mountinfo.after"))) {
		if !before[m.key()] && strings.Contains(strings.ToLower(m.key()), "sandbox") {
			left = append(left, m.key())
		}
	}
	if len(left) > 0 {
		t.Errorf("mounts left in the guest:\n%s", strings.Join(left, "\n"))
	}
}

type mount struct{ root, point, fstype, source string }

func (m mount) key() string { return m.point + " " + m.fstype + " " + m.source + " " + m.root }

// parseMountinfo reads /proc/self/mountinfo lines (proc(5)).
func parseMountinfo(s string) []mount {
	var ms []mount
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		dash := -1
		for i, x := range f {
			if x == "-" {
				dash = i
				break
			}
		}
		if len(f) < 5 || dash < 0 || dash+2 >= len(f) {
			continue
		}
		ms = append(ms, mount{root: f[3], point: f[4], fstype: f[dash+1], source: f[dash+2]})
	}
	return ms
}

var resultLine = regexp.MustCompile(`(?m)^--- (PASS|FAIL): (\S+)`)

// results lists the top-level tests that passed and failed in go test -v output.
func results(out string) (passed, failed []string) {
	for _, m := range resultLine.FindAllStringSubmatch(out, -1) {
		if m[1] == "PASS" {
			passed = append(passed, m[2])
		} else {
			failed = append(failed, m[2])
		}
	}
	sort.Strings(passed)
	sort.Strings(failed)
	return passed, failed
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"[… " + strconv.Itoa(len(lines)-n) + " lines]"}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o755)
}
