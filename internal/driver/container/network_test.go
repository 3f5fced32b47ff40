package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/sandboxd/sandboxd/internal/driver"
	"github.com/sandboxd/sandboxd/internal/driver/drivertest"
	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/fakeinet"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// The fake internet of these tests: a network namespace of the test's own behind the veth
// sbxdt-inet (10.216.255.1/30 on the host's side, .2 on the other), holding 198.51.100.10
// ("api.company.com") and .20 ("evil.example") with an HTTP server each and a UDP echo server on
// .20:9999; the host routes 198.51.100.0/24 there (TEST-NET-2: nobody's real network, and not a
// range the gateway treats as private, so names resolving there are reachable when allowed; no
// address of it is the host's, which other packages' tests running at the same time rely on).
// Everything a sandbox of these tests sends outside goes to 198.51.100.0/24 or to the
// always-denied set, which never leaves the host.
const (
	inetLink = "sbxdt-inet"
	linkHost = "10.216.255.1"
	linkPeer = "10.216.255.2"
	apiIP    = "198.51.100.10"
	evilIP   = "198.51.100.20"
	echoPort = 9999
)

var (
	inetOnce sync.Once
	inet     *fakeinet.Net
	inetErr  error
)

// fakeInternet starts the fake internet once for the test binary (TestMain stops it).
func fakeInternet(t testing.TB) *fakeinet.Net {
	t.Helper()
	drivertest.Need(t, "the container driver's tests", setupErr)
	inetOnce.Do(func() {
		inet, inetErr = fakeinet.Start(fakeinet.Config{
			Link: inetLink, HostAddr: linkHost, PeerAddr: linkPeer, Routed: netip.MustParsePrefix("198.51.100.0/24"),
			HTTP:    map[string]string{apiIP + ":80": "hello from api", evilIP + ":80": "evil"},
			UDPEcho: fmt.Sprintf("%s:%d", evilIP, echoPort),
		})
	})
	if inetErr != nil {
		t.Fatalf("fake internet: %v", inetErr)
	}
	return inet
}

// assertNetworkGone checks (after the background part of Destroy) that sandbox id has no veth,
// namespace file or mount, and no rules in the host table.
func assertNetworkGone(t *testing.T, d *Driver, id string) {
	t.Helper()
	if err := d.net.Wait(); err != nil {
		t.Errorf("network teardown: %v", err)
	}
	veth := d.net.HostIfName(id)
	if _, err := netlink.LinkByName(veth); err == nil {
		t.Errorf("veth %s of %s is still there", veth, id)
	}
	if _, err := os.Lstat(d.net.NSPath(id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("network namespace file of %s: %v", id, err)
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chains {
		if ch.Table.Name == d.net.Table() && strings.HasSuffix(ch.Name, veth) {
			t.Errorf("chain %s of %s is still in table %s", ch.Name, id, ch.Table.Name)
		}
	}
}

// egressProbe runs inside a sandbox that allows api.company.com only; it prints what each
// attempt gave ("ok:…" or "err:<exception>:…") and how long it took.
const egressProbe = `
import json, os, socket, time, urllib.request
out = {}
def check(name, f):
    t0 = time.monotonic()
    try:
        out[name] = "ok:" + str(f())
    except Exception as e:
        out[name] = "err:%s:%s" % (type(e).__name__, str(e)[:160])
    out[name + "_s"] = round(time.monotonic() - t0, 3)
def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
def raw(ip, host):
    s = socket.create_connection((ip, 80), timeout=5)
    s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode())
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    s.close()
    if not data:
        raise ConnectionResetError("closed without an answer")
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return head.split("\r\n")[0] + " | " + body.strip()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((EVIL, 9999))
    s.send(b"x")
    return s.recv(100)
check("proxy_env", lambda: os.environ["HTTP_PROXY"] + " " + os.environ["NO_PROXY"])
check("api", lambda: get("http://api.company.com/"))
check("evil", lambda: get("http://evil.example/"))
check("metadata", lambda: get("http://169.254.169.254/latest/meta-data/"))
check("host_spoof", lambda: raw(EVIL, "api.company.com"))
check("raw_evil", lambda: raw(EVIL, "evil.example"))
check("raw_metadata", lambda: raw("169.254.169.254", "169.254.169.254"))
check("dns_api", lambda: socket.getaddrinfo("api.company.com", 80, socket.AF_INET)[0][4][0])
check("dns_evil", lambda: socket.getaddrinfo("evil.example", 80, socket.AF_INET)[0][4][0])
check("udp", udp)
print(json.dumps(out))
`

func TestEgress(t *testing.T) {
	in := fakeInternet(t)
	for _, name := range testRuntimes {
		t.Run(name, func(t *testing.T) {
			base := openDriver(t, name) // skips when the runtime is missing
			var mu sync.Mutex
			var decisions []egress.Decision
			d, err := Open(driver.Options{
				StateDir: filepath.Join(stateDir, "egress-"+name), AgentBin: agentBin, Runtime: base.rt.name, RunscBin: runscBin, NetworkPool: testPool,
				Resolver: egress.StaticResolver{
					"api.company.com": {netip.MustParseAddr(apiIP)},
					"evil.example":    {netip.MustParseAddr(evilIP)},
				},
				OnNetwork: func(x egress.Decision) {
					mu.Lock()
					decisions = append(decisions, x)
					mu.Unlock()
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			policy, err := egress.ParsePolicy(true, []string{"api.company.com"})
			if err != nil {
				t.Fatal(err)
			}
			spec := baseSpec(t)
			spec.Network = policy
			id := harness.Sandbox(t, d, spec)
			udpBefore := in.UDPCount()
			out := drivertest.MustExec(t, d, id, "EVIL = "+fmt.Sprintf("%q", evilIP)+"\n"+egressProbe)
			var got map[string]any
			if err := json.Unmarshal([]byte(out), &got); err != nil {
				t.Fatalf("probe output %q: %v", out, err)
			}
			for k, v := range got {
				if !strings.HasSuffix(k, "_s") {
					t.Logf("%-13s %v (%vs)", k, v, got[k+"_s"])
				}
			}
			str := func(k string) string { s, _ := got[k].(string); return s }
			secs := func(k string) float64 { f, _ := got[k+"_s"].(float64); return f }
			want := func(k, prefix string) {
				t.Helper()
				if !strings.HasPrefix(str(k), prefix) {
					t.Errorf("%s: %q, want %q…", k, str(k), prefix)
				}
			}
			wantFastErr := func(k string) {
				t.Helper()
				if !strings.HasPrefix(str(k), "err:") {
					t.Errorf("%s: %q, want a failure", k, str(k))
				}
				if k == "udp" && d.rt.gvisor() {
					// gVisor's netstack does not report the host's ICMP "administratively
					// prohibited" to a connected UDP socket: the datagram is refused all the same
					// (the fake internet's count below), but the probe waits for its timeout.
					return
				}
				if secs(k) > 1 {
					t.Errorf("%s failed after %.2fs, want fast", k, secs(k))
				}
			}
			b, _ := d.lookup(id)
			want("proxy_env", "ok:http://"+b.Gateway+":3128 localhost,127.0.0.1")
			want("api", "ok:hello from api")
			want("dns_api", "ok:"+apiIP)
			want("host_spoof", "ok:HTTP/1.1 200 OK | hello from api")
			for _, k := range []string{"evil", "metadata", "dns_evil", "udp"} {
				wantFastErr(k)
			}
			// A direct connection is answered by the transparent proxy: 403 with the reason.
			for _, k := range []string{"raw_evil", "raw_metadata"} {
				if !strings.HasPrefix(str(k), "ok:HTTP/1.1 403") || !strings.Contains(str(k), "denied") || secs(k) > 1 {
					t.Errorf("%s: %q after %.2fs, want a fast 403 with the reason", k, str(k), secs(k))
				}
			}
			want("evil", "err:HTTPError:HTTP Error 403")
			want("metadata", "err:HTTPError:HTTP Error 403")
			want("dns_evil", "err:gaierror")
			if n := in.UDPCount() - udpBefore; n != 0 {
				t.Errorf("the fake internet received %d datagrams", n)
			}
			// Decisions: allowed api.company.com; denied evil.example, the metadata address, UDP.
			has := func(what string, f func(egress.Decision) bool) {
				t.Helper()
				ok := waitfor.Until(2*time.Second, func() bool {
					mu.Lock()
					defer mu.Unlock()
					return slices.ContainsFunc(decisions, func(x egress.Decision) bool { return x.SandboxID == id && f(x) })
				})
				if !ok {
					mu.Lock()
					t.Errorf("no decision %s among %+v", what, decisions)
					mu.Unlock()
				}
			}
			has("allowed api.company.com", func(x egress.Decision) bool { return x.Allowed && x.Host == "api.company.com" })
			has("denied evil.example", func(x egress.Decision) bool { return !x.Allowed && x.Host == "evil.example" })
			has("denied 169.254.169.254", func(x egress.Decision) bool {
				return !x.Allowed && x.Addr == netip.MustParseAddr("169.254.169.254")
			})
			has("denied udp", func(x egress.Decision) bool {
				return !x.Allowed && x.Proto == "udp" && x.Addr == netip.MustParseAddr(evilIP) && x.Port == echoPort
			})

			if err := d.Destroy(context.Background(), id); err != nil {
				t.Fatal(err)
			}
			assertGone(t, d, id, b.Pid)
		})
	}
}

// TestSetNetwork: a sandbox made with one allow list enforces another after SetNetwork (how the
// service hands a warm sandbox to its owner): what the old list allowed — names it answered,
// addresses it pinned — is refused, what the new one allows works; a policy of another shape is
// refused.
func TestSetNetwork(t *testing.T) {
	fakeInternet(t)
	base := openDriver(t, "crun")
	d, err := Open(driver.Options{
		StateDir: filepath.Join(stateDir, "setnetwork"), AgentBin: agentBin, Runtime: base.rt.name, RunscBin: runscBin, NetworkPool: testPool,
		Resolver: egress.StaticResolver{
			"api.company.com": {netip.MustParseAddr(apiIP)},
			"evil.example":    {netip.MustParseAddr(evilIP)},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	old, _ := egress.ParsePolicy(true, []string{"evil.example"})
	spec := baseSpec(t)
	spec.Network = old
	id := harness.Sandbox(t, d, spec)
	if out := drivertest.MustExec(t, d, id, "import socket\nprint(socket.getaddrinfo('evil.example', 80, socket.AF_INET)[0][4][0])"); strings.TrimSpace(out) != evilIP {
		t.Fatalf("under the first policy evil.example resolves to %q", out)
	}
	for _, p := range []egress.Policy{{BlockOutbound: false}, {BlockOutbound: true}} {
		if err := d.SetNetwork(context.Background(), id, p); err == nil {
			t.Fatalf("SetNetwork took a policy of another shape: %+v", p)
		}
	}
	policy, _ := egress.ParsePolicy(true, []string{"api.company.com"})
	if err := d.SetNetwork(context.Background(), id, policy); err != nil {
		t.Fatal(err)
	}
	out := drivertest.MustExec(t, d, id, "EVIL = "+fmt.Sprintf("%q", evilIP)+"\n"+egressProbe)
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("probe output %q: %v", out, err)
	}
	for k, want := range map[string]string{
		"api": "ok:hello from api", "dns_api": "ok:" + apiIP, "evil": "err:HTTPError:HTTP Error 403",
		"dns_evil": "err:gaierror", "raw_evil": "ok:HTTP/1.1 403", "host_spoof": "ok:HTTP/1.1 200 OK | hello from api",
	} {
		if s, _ := got[k].(string); !strings.HasPrefix(s, want) {
			t.Errorf("%s: %q, want %q…", k, s, want)
		}
	}
	if err := d.SetNetwork(context.Background(), "sbx_nosuchsandbox", policy); err == nil {
		t.Error("SetNetwork of an unknown sandbox succeeded")
	}
}
