package kubernetes

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/egressctl"
	"github.com/sandboxd/sandboxd/internal/fakeinet"
	"github.com/sandboxd/sandboxd/internal/k8stest"
)

// The fake internet of these tests (package fakeinet): a network namespace of the test's own
// behind the veth sbxk8s-inet (10.218.255.1/30 on the host's side, .2 on the other), holding
// 203.0.113.241 ("api.company.com", HTTP on 80 and 8080) and .242 ("evil.example", HTTP on 80,
// UDP echo on 9999); the host routes 203.0.113.240/28 there and the namespace routes everything
// back to the host, which forwards to the pods' bridge. TEST-NET-3 is nobody's real network and
// not a range the gateway treats as private; the e2e tests route all of 203.0.113.0/24 to their
// own namespace and use .10 and .20: this /28 is more specific, so both can run at once (the
// container driver's tests use TEST-NET-2; TEST-NET-1 is this CI machine's own network). The
// pods' gateways resolve only from static records (Options.Resolver), so no test sends a DNS
// query or a packet beyond the host.
const (
	k8sInetLink = "sbxk8s-inet"
	k8sLinkHost = "10.218.255.1"
	k8sLinkPeer = "10.218.255.2"
	k8sInetNet  = k8stest.FakeInternetRoute // the pods route it to the host
	k8sAPIIP    = "203.0.113.241"
	k8sEvilIP   = "203.0.113.242"
	k8sEchoPort = 9999
)

var (
	inetOnce sync.Once
	inet     *fakeinet.Net
	inetErr  error
)

func fakeInternet(t testing.TB) *fakeinet.Net {
	t.Helper()
	inetOnce.Do(func() {
		inet, inetErr = fakeinet.Start(fakeinet.Config{
			Link: k8sInetLink, HostAddr: k8sLinkHost, PeerAddr: k8sLinkPeer, Routed: netip.MustParsePrefix(k8sInetNet),
			HTTP:      map[string]string{k8sAPIIP + ":80": "hello from api", k8sAPIIP + ":8080": "api 8080", k8sEvilIP + ":80": "evil"},
			UDPEcho:   fmt.Sprintf("%s:%d", k8sEvilIP, k8sEchoPort),
			RouteBack: true, // the pods are behind the host's bridge
		})
	})
	if inetErr != nil {
		t.Fatalf("fake internet: %v", inetErr)
	}
	return inet
}

// decisions collects what a driver reports to Options.OnNetwork.
type decisions struct {
	mu sync.Mutex
	ds []egress.Decision
}

func (c *decisions) add(d egress.Decision) {
	c.mu.Lock()
	c.ds = append(c.ds, d)
	c.mu.Unlock()
}

// of returns (and forgets) the decisions of sandbox id so far.
func (c *decisions) of(id string) []egress.Decision {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out, rest []egress.Decision
	for _, d := range c.ds {
		if d.SandboxID == id {
			out = append(out, d)
		} else {
			rest = append(rest, d)
		}
	}
	c.ds = rest
	return out
}

var seen decisions

// egressDriver is a driver whose gateways resolve api.company.com and evil.example to the fake
// internet and report to seen.
func egressDriver(t *testing.T) *Driver {
	t.Helper()
	e := setup(t)
	fakeInternet(t)
	return drivers.Get(t, "egress", func() (*Driver, error) {
		o := e.opts
		o.Replica = "egress"
		o.Resolver = egress.StaticResolver{
			"api.company.com": {netip.MustParseAddr(k8sAPIIP)},
			"evil.example":    {netip.MustParseAddr(k8sEvilIP)},
		}
		o.OnNetwork = seen.add
		return Open(o)
	})
}

func policy(t *testing.T, block bool, allow ...string) egress.Policy {
	t.Helper()
	p, err := egress.ParsePolicy(block, allow)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// egressProbe is drivertest.NetProbe with its outcomes as the run's result.
const egressProbe = drivertest.NetProbe + "result = out\n"

func egressRun(t *testing.T, d driver.Driver, id, code string) map[string]string {
	t.Helper()
	res := drivertest.Exec(t, d, id, egressProbe+code, 3*time.Minute)
	if res.Status != driver.StatusCompleted {
		t.Fatalf("probe: %s: %s %+v", res.Status, res.Stderr, res.Error)
	}
	var got map[string]string
	if err := json.Unmarshal(res.Result, &got); err != nil {
		t.Fatalf("probe result %s: %v", res.Result, err)
	}
	return got
}

func expect(t *testing.T, got map[string]string, want map[string]func(string) bool, what map[string]string) {
	t.Helper()
	for k, ok := range want {
		if !ok(got[k]) {
			t.Errorf("%s: %q, want %s", k, got[k], what[k])
		}
	}
}

func is(s string) func(string) bool { return func(v string) bool { return v == s } }
func hasPrefix(s string) func(string) bool {
	return func(v string) bool { return strings.HasPrefix(v, s) }
}
func refusedish(v string) bool {
	return v == "refused" || v == "timeout" || v == "ConnectionResetError"
}
func notReached(bad string) func(string) bool {
	return func(v string) bool { return v != "" && !strings.Contains(v, bad) }
}

// TestEgressAllowList: a sandbox allowed api.company.com:80 reaches it through the pod's gateway —
// by the proxy of its environment, and by a plain socket (DNS and TCP redirected to the gateway)
// — and nothing else: not a denied name, not an address directly (not even with an allowed Host),
// not another port of the allowed address, not UDP but DNS, not the node (kubelet), another pod,
// the kubernetes service, the gateway's own ports on loopback, its control channel; it cannot
// become the gateway's uid, read its secret or open a raw socket. Its DNS to an outside server
// (an address of the fake internet, which serves no DNS there: the pods have no default route)
// is answered by the gateway. Every decision reaches Options.OnNetwork as the sandbox's. Then
// SetNetwork re-targets it.
func TestEgressAllowList(t *testing.T) {
	d := egressDriver(t)
	f := fakeInternet(t)
	spec := testSpec()
	spec.Network = policy(t, true, "api.company.com:80")
	id := sandbox(t, d, spec)
	other := sandbox(t, d, testSpec())
	ob, err := d.lookup(context.Background(), other)
	if err != nil {
		t.Fatal(err)
	}
	otherIP, _, _ := net.SplitHostPort(ob.addr)
	seen.of(id) // what Create's start decided (nothing yet)
	udpBefore := f.UDPCount()

	got := egressRun(t, d, id, fmt.Sprintf(`
import os
own = socket.gethostbyname(socket.gethostname())
urlget("proxy allowed", "http://api.company.com/")
urlget("proxy denied", "http://evil.example/")
fetch("socket allowed", "api.company.com", 80)
fetch("socket denied name", "evil.example", 80)
fetch("address of the denied name", %[1]q, 80, "evil.example")
fetch("denied address, allowed Host", %[1]q, 80, "api.company.com")
fetch("allowed address, other port", %[2]q, 8080)
fetch("kubelet", %[3]q, 10250)
fetch("kubelet http", %[3]q, 80)
fetch("other pod's agent", %[4]q, %[5]d)
fetch("kubernetes service", "10.96.0.1", 443)
fetch("transparent port directly", "127.0.0.1", 15001)
fetch("control port from inside", own, %[6]d)
attempt("resolve allowed", lambda: socket.gethostbyname("api.company.com"))
attempt("udp echo", lambda: udp(%[1]q, %[7]d))
attempt("dns to an outside server", lambda: dns_a("api.company.com", %[1]q))
attempt("setuid gateway", lambda: os.setuid(%[8]d))
attempt("gateway secret", lambda: os.listdir("/.sandbox/egress"))
attempt("raw socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("ipv6", lambda: socket.create_connection(("2001:db8::1", 80), timeout=3))
`, k8sEvilIP, k8sAPIIP, env.c.NodeIP, otherIP, AgentPort, ControlPort, k8sEchoPort, GatewayUID))

	want := map[string]func(string) bool{
		"proxy allowed":                is("hello from api"),
		"proxy denied":                 hasPrefix("403"),
		"socket allowed":               is("hello from api"),
		"socket denied name":           is("nxdomain"),
		"address of the denied name":   hasPrefix("403"),
		"denied address, allowed Host": notReached("evil"),
		"allowed address, other port":  refusedish,
		"kubelet":                      refusedish,
		"kubelet http":                 hasPrefix("403"),
		"other pod's agent":            refusedish,
		"kubernetes service":           refusedish,
		"transparent port directly":    refusedish,
		"control port from inside":     refusedish,
		"resolve allowed":              is("ok " + k8sAPIIP),
		"udp echo":                     notReached("ping"),
		"dns to an outside server":     is("ok " + k8sAPIIP),
		"setuid gateway":               is("EPERM"),
		"gateway secret":               is("ENOENT"),
		"raw socket":                   is("EPERM"),
		"ipv6":                         notReached("ok"),
	}
	what := map[string]string{"proxy allowed": "the api's body", "socket allowed": "the api's body", "proxy denied": "403",
		"denied address, allowed Host": "anything but evil's body", "udp echo": "no echo", "ipv6": "a failure"}
	expect(t, got, want, what)
	if n := f.UDPCount() - udpBefore; n != 0 {
		t.Errorf("the fake internet got %d UDP packets", n)
	}

	// Every decision reached the audit, as the sandbox's.
	ds := seen.of(id)
	// The node and the service IP are routed in the test cluster's pods: refused by the gateway's
	// decision, not by a missing route.
	var allowedAPI, deniedEvil, deniedKubelet, deniedService bool
	for _, x := range ds {
		switch {
		case x.Allowed && x.Host == "api.company.com":
			allowedAPI = true
		case !x.Allowed && x.Host == "evil.example":
			deniedEvil = true
		case !x.Allowed && x.Addr.String() == env.c.NodeIP:
			deniedKubelet = true
		case !x.Allowed && x.Addr.String() == "10.96.0.1":
			deniedService = true
		}
	}
	if !allowedAPI || !deniedEvil || !deniedKubelet || !deniedService {
		t.Errorf("decisions (api allowed %v, evil denied %v, kubelet denied %v, service denied %v): %+v", allowedAPI, deniedEvil, deniedKubelet, deniedService, ds)
	}

	// The control channel: nobody without the gateway's own secret — not the agent's, which the
	// sandbox can read.
	ctx := context.Background()
	b, err := d.lookup(ctx, id)
	if err != nil || b.gw == nil {
		t.Fatalf("lookup: %+v %v", b, err)
	}
	for name, key := range map[string][]byte{"agent's secret": b.secret, "another sandbox's": ob.secret, "random": []byte(fmt.Sprintf("%x", agent.MakeSecret()))} {
		c := egressctl.Client{Addr: b.gw.Addr, Secret: key}
		if _, err := c.SetPolicy(ctx, policy(t, false)); !errors.Is(err, agent.ErrAuth) {
			t.Errorf("control channel with the %s: %v, want ErrAuth", name, err)
		}
	}

	// Re-targeted: evil.example only.
	if err := d.SetNetwork(ctx, id, policy(t, true, "evil.example")); err != nil {
		t.Fatal(err)
	}
	got = egressRun(t, d, id, `
fetch("api", "api.company.com", 80)
fetch("evil", "evil.example", 80)
`)
	expect(t, got, map[string]func(string) bool{"api": is("nxdomain"), "evil": is("evil")}, nil)

	// A sandbox made without a gateway takes no allow list.
	if err := d.SetNetwork(ctx, other, policy(t, true, "api.company.com")); err == nil {
		t.Error("a sandbox without a gateway took an allow list")
	}
	if err := d.SetNetwork(ctx, other, policy(t, true)); err != nil {
		t.Errorf("block everything, again: %v", err)
	}
}

// TestEgressOpen: block_outbound false goes through the gateway too: any name and public
// address, but never the always-denied set (the node, other pods, private ranges, loopback).
func TestEgressOpen(t *testing.T) {
	d := egressDriver(t)
	spec := testSpec()
	spec.Network = policy(t, false)
	id := sandbox(t, d, spec)
	other := sandbox(t, d, testSpec())
	ob, err := d.lookup(context.Background(), other)
	if err != nil {
		t.Fatal(err)
	}
	otherIP, _, _ := net.SplitHostPort(ob.addr)
	got := egressRun(t, d, id, fmt.Sprintf(`
fetch("name", "evil.example", 80)
fetch("address", %q, 8080)
fetch("kubelet", %q, 10250)
fetch("other pod", %q, %d)
fetch("private", "10.96.0.1", 443)
`, k8sAPIIP, env.c.NodeIP, otherIP, AgentPort))
	expect(t, got, map[string]func(string) bool{
		"name": is("evil"), "address": is("api 8080"),
		"kubelet": refusedish, "other pod": refusedish, "private": refusedish,
	}, nil)
	ds := seen.of(id)
	var found, deniedKubelet, deniedService bool
	for _, x := range ds {
		switch {
		case x.Allowed && x.Host == "evil.example":
			found = true
		case !x.Allowed && x.Addr.String() == env.c.NodeIP:
			deniedKubelet = true
		case !x.Allowed && x.Addr.String() == "10.96.0.1":
			deniedService = true
		}
	}
	if !found || !deniedKubelet || !deniedService {
		t.Errorf("decisions (evil.example allowed %v, kubelet denied %v, service denied %v): %+v", found, deniedKubelet, deniedService, ds)
	}
}
