package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/sandboxd/sandboxd/internal/egress"
	"github.com/sandboxd/sandboxd/internal/egressctl"
)

// egressCommand is "sandbox-agent egress …": the egress gateway of a pod (the kubernetes driver's
// native sidecar), as a uid of its own (neither the sandbox's nor root), without capabilities,
// on a read-only root. It shares the pod's network namespace, where netinit's rules redirect the
// sandbox's DNS to its DNS port and the sandbox's other TCP to its transparent port (both on
// 127.0.0.1; the HTTP proxy is there too) and let only its uid send packets out of the pod. It
// enforces "block everything" until the driver sets the sandbox's policy over the control
// channel (package egressctl, on --control, authenticated with the secret in --secret-file,
// refusing connections from the pod itself as the agent does), and keeps its decisions there
// until the driver drains them. The policy set last is kept in --state (an emptyDir of this
// container alone), so a restarted gateway enforces it at once. It resolves names from its --host
// records or with the --upstream server, never with the pod's resolv.conf (the kubernetes driver
// makes it name 127.0.0.1: the gateway's DNS port).
const egressCommand = "egress"

// Loopback ports of the pod's gateway (above 1023: it has no capability to bind lower ones).
const (
	podDNSPort         = 15053
	podProxyPort       = 3128
	podTransparentPort = 15001
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, " ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func egressMain(args []string) {
	fs := flag.NewFlagSet("egress", flag.ContinueOnError)
	control := fs.String("control", "", "the control channel's TCP address")
	secretFile := fs.String("secret-file", "", "the file of the gateway's secret")
	state := fs.String("state", "", "the file that keeps the policy set last")
	var deny, hosts listFlag
	fs.Var(&deny, "deny", "a prefix no policy opens (repeatable): the cluster's own addresses")
	fs.Var(&hosts, "host", "NAME=ADDR[,ADDR…]: resolve only from these records (repeatable)")
	upstream := fs.String("upstream", "", "IP[:PORT]: the DNS server the gateway resolves with (the cluster's; not with --host)")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 || *control == "" || *secretFile == "" || (len(hosts) > 0) == (*upstream != "") {
		fmt.Fprintln(os.Stderr, "usage: sandbox-agent egress --control ADDR --secret-file PATH [--state PATH] [--deny PREFIX]… (--host NAME=ADDR,… … | --upstream IP[:PORT])")
		os.Exit(2)
	}
	log := newLogger("egress")
	if err := runEgress(*control, *secretFile, *state, deny, hosts, *upstream, log.Info); err != nil {
		log.Error("egress gateway", "err", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runEgress(control, secretFile, state string, deny, hosts []string, upstream string, logf func(string, ...any)) error {
	secret, err := os.ReadFile(secretFile)
	if err != nil {
		return fmt.Errorf("the gateway's secret: %w", err)
	}
	cfg := egress.Config{Ports: [3]uint16{podDNSPort, podProxyPort, podTransparentPort}}
	for _, d := range deny {
		p, err := netip.ParsePrefix(d)
		if err != nil {
			return fmt.Errorf("--deny %s: %w", d, err)
		}
		cfg.Denied = append(cfg.Denied, p)
	}
	if len(hosts) > 0 {
		static := egress.StaticResolver{}
		for _, h := range hosts {
			name, addrs, ok := strings.Cut(h, "=")
			name = strings.ToLower(strings.TrimSuffix(name, "."))
			if !ok || name == "" {
				return fmt.Errorf("--host %s: want NAME=ADDR[,ADDR…]", h)
			}
			for _, a := range strings.Split(addrs, ",") {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					return fmt.Errorf("--host %s: %w", h, err)
				}
				static[name] = append(static[name], ip)
			}
		}
		cfg.Resolver = static
	} else {
		r, err := upstreamResolver(upstream)
		if err != nil {
			return err
		}
		cfg.Resolver = r
	}
	rec := &egressctl.Recorder{}
	cfg.OnDecision = rec.Record
	gw, err := egress.NewGateway(cfg)
	if err != nil {
		return err
	}
	defer gw.Close()
	const id = "pod"
	// Block everything until the driver says otherwise.
	if err := gw.Attach(id, netip.MustParseAddr("127.0.0.1"), egress.Policy{BlockOutbound: true}); err != nil {
		return err
	}
	srv := &egressctl.Server{
		Secret:    bytes.TrimSpace(secret),
		SetPolicy: func(p egress.Policy) error { return gw.SetPolicy(id, p) },
		Recorder:  rec,
		StateFile: state,
		Admit:     admitFromOutside,
		Log:       logf,
	}
	if ok, err := srv.Restore(); err != nil {
		return fmt.Errorf("restoring the policy: %w", err)
	} else if ok {
		logf("restored the policy set before this gateway restarted")
	}
	ln, err := net.Listen("tcp", control)
	if err != nil {
		return fmt.Errorf("control channel: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logf("serving", "control", ln.Addr().String(), "boot", srv.Boot())
	return srv.Serve(ctx, ln)
}

// upstreamResolver resolves with the DNS server at addr (IP or IP:PORT, port 53 by default)
// only. The gateway never uses the pod's resolv.conf: it names the gateway itself (127.0.0.1,
// where the sandbox's DNS is redirected; the gateway's own packets are not).
func upstreamResolver(addr string) (*net.Resolver, error) {
	if addr == "" {
		return nil, fmt.Errorf("no resolver: --host records or an --upstream server")
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		ip, perr := netip.ParseAddr(addr)
		if perr != nil {
			return nil, fmt.Errorf("--upstream %s: want IP or IP:PORT", addr)
		}
		ap = netip.AddrPortFrom(ip, 53)
	}
	if ap.Port() == 0 {
		return nil, fmt.Errorf("--upstream %s: port 0", addr)
	}
	server := ap.String()
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, server)
	}}, nil
}

// admitFromOutside refuses a connection from the pod itself: the sandbox's code connects from
// the pod's addresses (see admitTCP).
func admitFromOutside(c net.Conn) error {
	remote, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return fmt.Errorf("not a TCP connection")
	}
	own, err := ownAddress(remote.IP)
	if err != nil {
		return err
	}
	if own {
		return fmt.Errorf("a connection from inside the pod (%s)", remote.IP)
	}
	return nil
}
