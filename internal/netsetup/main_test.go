package netsetup

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The tests need root. They run in a network and mount namespace of their own (TestMain
// re-executes the test binary with CLONE_NEWNET|CLONE_NEWNS): the "host" the manager plumbs is
// that namespace, whose only way out is a fake internet (198.51.100.0/24, another namespace of the
// test's): no packet of a test can reach a real network, and no test disturbs the real host's
// links or rules. Without root they skip, except when $CI is set: then they fail.

const (
	isolatedEnv = "NETSETUP_TEST_ISOLATED"
	helperEnv   = "NETSETUP_TEST_HELPER"
)

var setupErr error

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(helperEnv) != "":
		os.Exit(helper(os.Getenv(helperEnv)))
	case os.Geteuid() != 0:
		setupErr = errors.New("needs root")
	case os.Getenv(isolatedEnv) == "":
		cmd := exec.Command(os.Args[0], os.Args[1:]...)
		cmd.Env = append(os.Environ(), isolatedEnv+"=1")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
		runtime.LockOSThread() // Pdeathsig follows the starting thread
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			os.Exit(ee.ExitCode())
		}
		if err == nil {
			os.Exit(0)
		}
		setupErr = fmt.Errorf("re-execute in a network namespace of its own: %v", err)
	default:
		if lo, err := netlink.LinkByName("lo"); err != nil {
			setupErr = err
		} else if err := netlink.LinkSetUp(lo); err != nil {
			setupErr = err
		}
	}
	os.Exit(m.Run())
}

// need skips (or, under CI, fails) a test that needs root.
func need(t testing.TB) {
	t.Helper()
	if setupErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("netsetup tests must run under CI: %v", setupErr)
		}
		t.Skipf("netsetup tests need root: %v", setupErr)
	}
}

// helper runs in a child process: "nft-eperm <nspath>" joins the namespace, becomes uid 10000
// without capabilities, and tries to change the namespace's rules and links, which must fail
// with EPERM. Exit 0 when every attempt was refused.
func helper(arg string) int {
	what, nsPath, _ := strings.Cut(arg, " ")
	if what != "nft-eperm" {
		fmt.Fprintln(os.Stderr, "unknown helper", what)
		return 2
	}
	runtime.LockOSThread()
	ns, err := netns.GetFromPath(nsPath)
	if err == nil {
		err = netns.Set(ns)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "join namespace:", err)
		return 2
	}
	if err := syscall.Setgroups(nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if err := syscall.Setgid(10000); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if err := syscall.Setuid(10000); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var capHdr = unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&capHdr, &caps[0]); err != nil || caps[0].Effective != 0 || caps[0].Permitted != 0 {
		fmt.Fprintf(os.Stderr, "still has capabilities: %+v %v\n", caps, err)
		return 2
	}
	failed := false
	c, err := nftables.New()
	if err == nil {
		c.FlushRuleset()
		err = c.Flush()
	}
	fmt.Printf("nft flush ruleset: %v\n", err)
	if !errors.Is(err, unix.EPERM) {
		failed = true
	}
	c2, _ := nftables.New()
	c2.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "sandbox"})
	err = c2.Flush()
	fmt.Printf("nft delete table: %v\n", err)
	if !errors.Is(err, unix.EPERM) {
		failed = true
	}
	if l, lerr := netlink.LinkByName(peerName); lerr == nil {
		err = netlink.LinkSetDown(l)
		fmt.Printf("link down: %v\n", err)
		if !errors.Is(err, unix.EPERM) {
			failed = true
		}
		err = netlink.AddrAdd(l, &netlink.Addr{IPNet: ipnet(netip.MustParseAddr("10.99.0.2"), 24)})
		fmt.Printf("addr add: %v\n", err)
		if !errors.Is(err, unix.EPERM) {
			failed = true
		}
	} else {
		fmt.Println("no eth0:", lerr)
		failed = true
	}
	if failed {
		return 1
	}
	return 0
}

// inNS runs fn on a thread inside the network namespace at path. The thread is never given back
// to the runtime (it dies with the goroutine), so no other goroutine ends up in that namespace.
func inNS(t testing.TB, path string, fn func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.GetFromPath(path)
		if err == nil {
			err = netns.Set(ns)
			ns.Close()
		}
		if err != nil {
			errc <- err
			return
		}
		defer func() { errc <- nil }()
		fn()
	}()
	if err := <-errc; err != nil {
		t.Fatalf("enter %s: %v", path, err)
	}
}

// internet is a fake internet: a namespace behind the veth inet0 (198.51.100.1 on our side, the
// default route), with 198.51.100.10, .20 and .100-.131, a UDP echo server on
// 198.51.100.20:9999, TCP servers on every address's tcpPorts (they greet with "hello from
// <address:port>", then echo) and an HTTP server on port 80 (it answers "hello <Host> from
// <address:port>").
type internet struct {
	ns   netns.NsHandle
	mu   sync.Mutex
	seen []netip.AddrPort // sources of the datagrams the echo server got
}

const (
	inetIf   = "inet0"
	inetHost = "198.51.100.1"
	inetAPI  = "198.51.100.10"
	inetEvil = "198.51.100.20"
	echoPort = 9999
)

// tcpPorts are the fake internet's TCP ports besides 80.
var tcpPorts = []uint16{5432, 5433, 6543, 7000, 7001}

// inetMany returns the i-th of the fake internet's extra addresses (198.51.100.100 + i, i < 32).
func inetMany(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 51, 100, byte(100 + i)}) }

var (
	inetOnce sync.Once
	inet     *internet
	inetErr  error
)

// fakeInternet starts the fake internet once for the test binary.
func fakeInternet(t testing.TB) *internet {
	t.Helper()
	need(t)
	inetOnce.Do(func() { inet, inetErr = startInternet() })
	if inetErr != nil {
		t.Fatalf("fake internet: %v", inetErr)
	}
	return inet
}

func startInternet() (*internet, error) {
	in := &internet{}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // this thread stays in the new namespace and dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		ns, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		in.ns = ns
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return nil, err
	}
	la := netlink.NewLinkAttrs()
	la.Name = inetIf
	la.Flags = net.FlagUp
	veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(in.ns), PeerTxQLen: -1}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, err
	}
	if err := netlink.AddrAdd(veth, &netlink.Addr{IPNet: ipnet(netip.MustParseAddr(inetHost), 24)}); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandleAt(in.ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	addrs := []netip.Addr{netip.MustParseAddr("198.51.100.254"), netip.MustParseAddr(inetAPI), netip.MustParseAddr(inetEvil)}
	for i := range 32 {
		addrs = append(addrs, inetMany(i))
	}
	for _, a := range addrs {
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(a, 24)}); err != nil {
			return nil, err
		}
	}
	lo, _ := h.LinkByName("lo")
	for _, l := range []netlink.Link{eth, lo} {
		if err := h.LinkSetUp(l); err != nil {
			return nil, err
		}
	}
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: veth.Index, Gw: net.ParseIP("198.51.100.254")}); err != nil {
		return nil, fmt.Errorf("default route: %w", err)
	}
	// The servers, made inside the namespace (a socket keeps the namespace it was made in).
	type sockets struct {
		pc  net.PacketConn
		lns []net.Listener
	}
	connc := make(chan sockets, 1)
	errc2 := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(in.ns); err != nil {
			errc2 <- err
			return
		}
		var sk sockets
		var err error
		if sk.pc, err = net.ListenPacket("udp4", fmt.Sprintf("%s:%d", inetEvil, echoPort)); err != nil {
			errc2 <- err
			return
		}
		for _, p := range append([]uint16{80}, tcpPorts...) {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", p))
			if err != nil {
				errc2 <- err
				return
			}
			sk.lns = append(sk.lns, ln)
		}
		connc <- sk
	}()
	var sk sockets
	select {
	case err := <-errc2:
		return nil, err
	case sk = <-connc:
	}
	pc := sk.pc
	go http.Serve(sk.lns[0], http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s from %s", r.Host, r.Context().Value(http.LocalAddrContextKey))
	}))
	for _, ln := range sk.lns[1:] {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					fmt.Fprintf(c, "hello from %s\n", c.LocalAddr())
					_, _ = io.Copy(c, c)
				}()
			}
		}()
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			in.mu.Lock()
			in.seen = append(in.seen, from.(*net.UDPAddr).AddrPort())
			in.mu.Unlock()
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	return in, nil
}

func (in *internet) received() []netip.AddrPort {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]netip.AddrPort(nil), in.seen...)
}
