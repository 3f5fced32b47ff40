package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/egressctl"
)

func TestMain(m *testing.M) {
	// The test binary doubles as the agent's egress subcommand (TestNetinitGateway runs it).
	if os.Getenv("SANDBOX_AGENT_TEST_EGRESS") == "1" && len(os.Args) > 1 && os.Args[1] == egressCommand {
		egressMain(os.Args[2:])
	}
	os.Exit(m.Run())
}

// nsThread is a goroutine locked to a thread in a network namespace of its own, which runs
// functions for the test there (sockets, netlink, nftables and child processes made by them are
// the namespace's). The thread ends with the goroutine, and the namespace with its last user.
type nsThread struct {
	fns chan func()
	ns  netns.NsHandle
}

func newNSThread(t *testing.T) *nsThread {
	t.Helper()
	n := &nsThread{fns: make(chan func())}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		ns, err := netns.Get()
		n.ns = ns
		errc <- err
		for f := range n.fns {
			f()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(n.fns); n.ns.Close() })
	return n
}

func (n *nsThread) do(f func() error) error {
	errc := make(chan error, 1)
	n.fns <- func() { errc <- f() }
	return <-errc
}

func need(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("TestNetinitGateway must run under CI: %v", err)
	}
	t.Skipf("cannot run: %v", err)
}

// TestNetinitGateway: netinit's gateway rules and "sandbox-agent egress" in a network namespace
// of the test's own (the pod's), with a second one as the internet (192.0.2.10 api.company.com,
// .20 evil.example): a process of another uid (the sandbox's) reaches an allowed name only
// through the gateway (its DNS to any server and its TCP are redirected), nothing before the
// policy is set, no denied name, no address directly, no other port, no UDP, not the control
// channel from inside; the control channel from outside needs the gateway's secret; the
// decisions are drained.
func TestNetinitGateway(t *testing.T) {
	if os.Geteuid() != 0 {
		need(t, errors.New("needs root (network namespaces, nftables, other uids)"))
	}
	const py = "/usr/bin/python3" // the system's: other uids can run it
	_, err := os.Stat(py)
	need(t, err)

	pod, inet := newNSThread(t), newNSThread(t)
	wire(t, pod, inet)
	var servers []*http.Server
	var udp net.PacketConn
	err = inet.do(func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, a := range []string{"10.99.0.1/24", "192.0.2.10/32", "192.0.2.20/32"} {
			if err := netlink.AddrAdd(eth, mustAddr(a)); err != nil {
				return err
			}
		}
		lo, _ := netlink.LinkByName("lo")
		for _, l := range []netlink.Link{eth, lo} {
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		for _, s := range []struct{ addr, body string }{{"192.0.2.10:80", "api"}, {"192.0.2.10:8080", "api 8080"}, {"192.0.2.20:80", "evil"}} {
			ln, err := net.Listen("tcp4", s.addr)
			if err != nil {
				return err
			}
			body := s.body
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) }), ReadHeaderTimeout: 5 * time.Second}
			servers = append(servers, srv)
			go srv.Serve(ln)
		}
		udp, err = net.ListenPacket("udp4", "192.0.2.20:9999")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, s := range servers {
			s.Close()
		}
		udp.Close()
	})
	udpSeen := make(chan struct{}, 100)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, _, err := udp.ReadFrom(buf); err != nil {
				return
			}
			udpSeen <- struct{}{}
		}
	}()

	// The rules, as netinit installs them.
	if err := pod.do(func() error { return netRules([]uint16{7070}, 10001) }); err != nil {
		t.Fatal(err)
	}

	// The gateway, as uid 10001 (a copy of this test binary others can run), in the pod.
	dir, err := os.MkdirTemp("", "sandbox-agent-egress-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	self, _ := os.Executable()
	bin := filepath.Join(dir, "agent")
	if err := copyFile(self, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := []byte(fmt.Sprintf("%x", agent.MakeSecret()))
	if err := os.WriteFile(filepath.Join(dir, "secret"), secret, 0o444); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	os.Mkdir(state, 0o777)
	os.Chmod(state, 0o777)
	var gw *exec.Cmd
	startGateway := func() error {
		gw = exec.Command(bin, "egress", "--control", ":7071", "--secret-file", filepath.Join(dir, "secret"),
			"--state", filepath.Join(state, "policy.json"), "--deny", "10.99.0.0/24",
			"--host", "api.company.com=192.0.2.10", "--host", "evil.example=192.0.2.20")
		gw.Env = append(os.Environ(), "SANDBOX_AGENT_TEST_EGRESS=1")
		gw.Stdout, gw.Stderr = os.Stderr, os.Stderr
		gw.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 10001, Gid: 10001}, Pdeathsig: syscall.SIGKILL}
		return gw.Start()
	}
	if err := pod.do(startGateway); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.Process.Kill(); gw.Wait() })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctl := egressctl.Client{Addr: "10.99.0.2:7071", Secret: secret}
	fromInet := func(f func() error) error { return inet.do(f) }
	waitGateway := func() (boot string) {
		for { // until the gateway answers
			err := fromInet(func() error { var err error; _, _, boot, err = ctl.Drain(ctx); return err })
			if err == nil {
				return boot
			}
			if ctx.Err() != nil {
				t.Fatalf("the gateway never answered: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	boot := waitGateway()

	sandbox := func(code string) map[string]string {
		t.Helper()
		return probeAs(t, pod, py, code)
	}

	// Before the policy: nothing.
	got := sandbox(`fetch("api before the policy", "api.company.com", 80)`)
	if got["api before the policy"] != "nxdomain" {
		t.Errorf("before the policy: %q, want nxdomain", got["api before the policy"])
	}

	// A wrong secret sets nothing.
	p, _ := egress.ParsePolicy(false, nil)
	if err := fromInet(func() error {
		_, err := egressctl.Client{Addr: ctl.Addr, Secret: []byte(fmt.Sprintf("%x", agent.MakeSecret()))}.SetPolicy(ctx, p)
		return err
	}); !errors.Is(err, agent.ErrAuth) {
		t.Errorf("wrong secret: %v, want ErrAuth", err)
	}

	p, _ = egress.ParsePolicy(true, []string{"api.company.com:80"})
	if err := fromInet(func() error { _, err := ctl.SetPolicy(ctx, p); return err }); err != nil {
		t.Fatal(err)
	}
	got = sandbox(`
fetch("api", "api.company.com", 80)
fetch("evil", "evil.example", 80)
fetch("evil by address", "192.0.2.20", 80, "evil.example")
fetch("evil's address, api's name", "192.0.2.20", 80, "api.company.com")
fetch("api's other port", "192.0.2.10", 8080)
fetch("control from inside", "10.99.0.2", 7071)
fetch("transparent port directly", "127.0.0.1", 15001)
attempt("udp", lambda: udp("192.0.2.20", 9999))
attempt("dns to any server", lambda: dns_a("api.company.com", "203.0.113.53"))
attempt("setuid to the gateway's", lambda: os.setuid(10001))
attempt("raw socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
`)
	want := map[string]string{
		"api": "api", "evil": "nxdomain", "evil's address, api's name": "api",
		"api's other port": "refused", "control from inside": "refused", "transparent port directly": "refused",
		"dns to any server": "ok 192.0.2.10", "setuid to the gateway's": "EPERM", "raw socket": "EPERM",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: %q, want %q", k, got[k], w)
		}
	}
	if !strings.HasPrefix(got["evil by address"], "403") {
		t.Errorf("evil by address: %q, want 403", got["evil by address"])
	}
	if v := got["udp"]; v == "" || strings.Contains(v, "ping") {
		t.Errorf("udp: %q, want it dropped", v)
	}
	select {
	case <-udpSeen:
		t.Error("a UDP packet of the sandbox's reached the internet")
	default:
	}

	var ds []egress.Decision
	if err := fromInet(func() error { var err error; ds, _, _, err = ctl.Drain(ctx); return err }); err != nil {
		t.Fatal(err)
	}
	var okAPI, noEvil bool
	for _, d := range ds {
		okAPI = okAPI || (d.Allowed && d.Host == "api.company.com")
		noEvil = noEvil || (!d.Allowed && d.Host == "evil.example")
	}
	if !okAPI || !noEvil {
		t.Errorf("decisions: %+v", ds)
	}
	// What a drain costs the driver after every run (a connection, the challenge, one line each
	// way): logged, not asserted.
	var took []time.Duration
	for range 20 {
		start := time.Now()
		if err := fromInet(func() error { _, _, _, err := ctl.Drain(ctx); return err }); err != nil {
			t.Fatal(err)
		}
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	t.Logf("drain: p50 %v, max %v (20)", took[10], took[19])

	// A gateway that restarts enforces the policy set before at once (its state file), not
	// "block everything", not "anything"; the driver sees its boot ID change.
	gw.Process.Kill()
	gw.Wait()
	if err := pod.do(startGateway); err != nil {
		t.Fatal(err)
	}
	if b := waitGateway(); b == boot {
		t.Errorf("the restarted gateway has the same boot ID %s", b)
	}
	got = sandbox(`
fetch("api", "api.company.com", 80)
fetch("evil", "evil.example", 80)
`)
	if got["api"] != "api" || got["evil"] != "nxdomain" {
		t.Errorf("after a restart: %v", got)
	}
}

// wire joins pod and inet: pod eth0 10.99.0.2/24 ⇄ inet eth0 10.99.0.1/24, pod's default route
// through inet.
func wire(t *testing.T, pod, inet *nsThread) {
	t.Helper()
	err := pod.do(func() error {
		la := netlink.NewLinkAttrs()
		la.Name = "eth0"
		veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(inet.ns)}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, mustAddr("10.99.0.2/24")); err != nil {
			return err
		}
		lo, _ := netlink.LinkByName("lo")
		for _, l := range []netlink.Link{eth, lo} {
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.ParseIP("10.99.0.1")})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestNetinitBlock: without a gateway (a policy that blocks everything), a process of another
// uid (the sandbox's) gets a TCP connection out refused at once (a reset, not a drop it would
// wait on until its timeout), its UDP dropped; the pod's servers still answer from outside.
func TestNetinitBlock(t *testing.T) {
	if os.Geteuid() != 0 {
		need(t, errors.New("needs root (network namespaces, nftables, other uids)"))
	}
	const py = "/usr/bin/python3"
	_, err := os.Stat(py)
	need(t, err)
	pod, inet := newNSThread(t), newNSThread(t)
	wire(t, pod, inet)
	var tcpLn net.Listener
	var udp net.PacketConn
	err = inet.do(func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, mustAddr("10.99.0.1/24")); err != nil {
			return err
		}
		lo, _ := netlink.LinkByName("lo")
		for _, l := range []netlink.Link{eth, lo} {
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		if tcpLn, err = net.Listen("tcp4", "10.99.0.1:80"); err != nil {
			return err
		}
		udp, err = net.ListenPacket("udp4", "10.99.0.1:9999")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tcpLn.Close(); udp.Close() })
	accepted := make(chan struct{}, 10)
	go func() {
		for {
			c, err := tcpLn.Accept()
			if err != nil {
				return
			}
			c.Close()
			accepted <- struct{}{}
		}
	}()
	udpSeen := make(chan struct{}, 10)
	go func() {
		buf := make([]byte, 100)
		for {
			if _, _, err := udp.ReadFrom(buf); err != nil {
				return
			}
			udpSeen <- struct{}{}
		}
	}()
	var agentLn net.Listener
	if err := pod.do(func() error {
		if err := netRules([]uint16{7070}, 0); err != nil {
			return err
		}
		var err error
		agentLn, err = net.Listen("tcp4", "10.99.0.2:7070")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer agentLn.Close()
	go func() {
		for {
			c, err := agentLn.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "agent")
			c.Close()
		}
	}()

	// A timeout far above any reset's delay: "refused" can only be the reset.
	got := probeAs(t, pod, py, `
import time
t0 = time.monotonic()
try:
    socket.create_connection(("10.99.0.1", 80), timeout=60); out["tcp"] = "connected"
except ConnectionRefusedError:
    out["tcp"] = "refused"
except Exception as e:
    out["tcp"] = type(e).__name__
out["tcp seconds"] = "%.1f" % (time.monotonic() - t0)
attempt("udp", lambda: udp("10.99.0.1", 9999))
`)
	t.Logf("probe: %v", got)
	if got["tcp"] != "refused" {
		t.Errorf("tcp out: %q, want refused (a reset)", got["tcp"])
	}
	if v := got["udp"]; v == "" || strings.Contains(v, "ping") {
		t.Errorf("udp: %q, want it dropped", v)
	}
	select {
	case <-accepted:
		t.Error("a TCP connection of the sandbox's reached the outside")
	case <-udpSeen:
		t.Error("a UDP packet of the sandbox's reached the outside")
	default:
	}
	// The pod's server still answers from outside.
	var body []byte
	if err := inet.do(func() error {
		c, err := net.Dial("tcp4", "10.99.0.2:7070")
		if err != nil {
			return err
		}
		defer c.Close()
		body, err = io.ReadAll(c)
		return err
	}); err != nil || string(body) != "agent" {
		t.Errorf("the agent from outside: %q %v", body, err)
	}
}

// probeAs runs netProbe+code with python py as uid 10000 (the sandbox's) in pod and returns its
// outcomes.
func probeAs(t *testing.T, pod *nsThread, py, code string) map[string]string {
	t.Helper()
	var out []byte
	err := pod.do(func() error {
		cmd := exec.Command(py, "-c", netProbe+code)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 10000, Gid: 10000}}
		cmd.Dir = "/"
		var err error
		out, err = cmd.Output()
		return err
	})
	if err != nil {
		t.Fatalf("probe: %v: %s", err, out)
	}
	got := map[string]string{}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("probe output %q: %v", out, err)
	}
	return got
}

// netProbe is drivertest.NetProbe printing its outcomes as JSON at exit.
const netProbe = drivertest.NetProbe + "import atexit, json\natexit.register(lambda: print(json.dumps(out)))\n"

func mustAddr(s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		panic(err)
	}
	return a
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
