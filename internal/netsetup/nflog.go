package netsetup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/egress"
)

// nfnetlink_log (NFLOG) protocol: linux/netfilter/nfnetlink_log.h. Spoken directly over
// mdlayher/netlink: it is small, and go-nflog is not on the module proxy here.
const (
	nfulnlMsgPacket = 0
	nfulnlMsgConfig = 1

	nfulaCfgCmd  = 1
	nfulaCfgMode = 2
	nfulaCfgQthr = 5

	nfulnlCfgCmdBind = 1
	nfulnlCopyPacket = 2

	nfulaIfindexIndev = 4
	nfulaPayload      = 9
	nfulaPrefix       = 10
)

// loggedPacket is what a refused packet's log message tells.
type loggedPacket struct {
	indev  int
	prefix string
	proto  string // "tcp", "udp", "icmp", "ipv6", "ip"
	dst    netip.Addr
	dport  uint16
}

type nflogReader struct {
	group uint16
	conn  *netlink.Conn
	done  chan struct{}
	once  sync.Once
}

// openNflog binds the first free NFLOG group from first on (trying up to n) and delivers every
// packet logged to it to fn, from one goroutine, until close.
func openNflog(first uint16, n int, fn func(loggedPacket)) (*nflogReader, error) {
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("nflog: %w", err)
	}
	_ = conn.SetReadBuffer(1 << 20)
	var group uint16
	for i := 0; i < n; i++ {
		g := first + uint16(i)
		err = nflogConfig(conn, g, netlink.Attribute{Type: nfulaCfgCmd, Data: []byte{nfulnlCfgCmdBind}})
		if err == nil {
			group = g
			break
		}
		// Another socket holds the group: EPERM (EBUSY on older kernels). Try the next one.
		if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EBUSY) {
			break
		}
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nflog: bind a group from %d on: %w", first, err)
	}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, logSnaplen)
	mode[4] = nfulnlCopyPacket
	if err := nflogConfig(conn, group, netlink.Attribute{Type: nfulaCfgMode, Data: mode},
		netlink.Attribute{Type: nfulaCfgQthr, Data: binary.BigEndian.AppendUint32(nil, 1)}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nflog: configure group %d: %w", group, err)
	}
	r := &nflogReader{group: group, conn: conn, done: make(chan struct{})}
	go r.loop(fn)
	return r, nil
}

func nflogConfig(conn *netlink.Conn, group uint16, attrs ...netlink.Attribute) error {
	ad, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return err
	}
	hdr := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0}
	binary.BigEndian.PutUint16(hdr[2:], group)
	_, err = conn.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8 | nfulnlMsgConfig),
			Flags: netlink.Request | netlink.Acknowledge,
		},
		Data: append(hdr, ad...),
	})
	return err
}

func (r *nflogReader) loop(fn func(loggedPacket)) {
	defer close(r.done)
	for {
		msgs, err := r.conn.Receive()
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				continue // the kernel dropped messages: we were too slow; go on
			}
			return // closed
		}
		for _, m := range msgs {
			if m.Header.Type != netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8|nfulnlMsgPacket) || len(m.Data) < 4 {
				continue
			}
			if p, ok := parsePacket(m.Data[4:]); ok {
				fn(p)
			}
		}
	}
}

func (r *nflogReader) close() error {
	var err error
	r.once.Do(func() {
		// Closing the socket unbinds the group (the kernel drops a released socket's instances).
		err = r.conn.Close()
		<-r.done
	})
	return err
}

func parsePacket(b []byte) (loggedPacket, bool) {
	var p loggedPacket
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return p, false
	}
	ad.ByteOrder = binary.BigEndian
	var payload []byte
	for ad.Next() {
		switch ad.Type() {
		case nfulaIfindexIndev:
			p.indev = int(ad.Uint32())
		case nfulaPrefix:
			p.prefix = strings.TrimRight(ad.String(), "\x00")
		case nfulaPayload:
			payload = ad.Bytes()
		}
	}
	if ad.Err() != nil || len(payload) < 1 {
		return p, false
	}
	switch payload[0] >> 4 {
	case 4:
		if len(payload) < 20 {
			return p, false
		}
		p.dst = netip.AddrFrom4([4]byte(payload[16:20]))
		ihl := int(payload[0]&0x0f) * 4
		proto := payload[9]
		p.proto = protoName(proto)
		if (proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_UDP) && len(payload) >= ihl+4 {
			p.dport = binary.BigEndian.Uint16(payload[ihl+2:])
		}
	case 6:
		if len(payload) < 40 {
			return p, false
		}
		p.dst = netip.AddrFrom16([16]byte(payload[24:40]))
		p.proto = "ipv6"
		if nh := payload[6]; (nh == unix.IPPROTO_TCP || nh == unix.IPPROTO_UDP) && len(payload) >= 44 {
			p.dport = binary.BigEndian.Uint16(payload[42:])
		}
	default:
		return p, false
	}
	return p, true
}

func protoName(p byte) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_ICMP:
		return "icmp"
	}
	return "ip"
}

// reasonOf is the audit text of a refused packet.
func reasonOf(code, proto string) string {
	switch code {
	case codeGateway:
		return "only the gateway's DNS (53) and proxy ports (3128, 15001) are reachable on the gateway address"
	case codeIPv6:
		return "IPv6 is not routed out of sandboxes"
	case codeDoT:
		return "DNS over TLS (port 853) is always denied"
	case codeDenied:
		return "destination is always denied (host, loopback, private, link-local/metadata, multicast or another sandbox)"
	case codeUDP:
		return "udp is only allowed to the sandbox's DNS"
	case codeICMP:
		return "icmp is not allowed out of the sandbox"
	case codeTCP:
		return "tcp must go through the egress gateway"
	case codeBlocked:
		return "outbound connections are blocked (the sandbox's allow list is empty)"
	case codeSpoof:
		return "source address is not the sandbox's"
	}
	return proto + " is not allowed out of the sandbox"
}

// reporter passes refusals on, at most perSec per sandbox and second one by one, and a summary of
// the rest once a second. Allowed flows pass straight on (the kernel's log limit bounds them; the
// service aggregates them per host).
type reporter struct {
	perSec int
	fn     func(egress.Decision)
	mu     sync.Mutex
	state  map[string]*rate
	stop   chan struct{}
	done   chan struct{}
}

type rate struct {
	window     time.Time
	seen       time.Time
	n          int
	suppressed int
	last       egress.Decision
}

func newReporter(perSec int, fn func(egress.Decision)) *reporter {
	r := &reporter{perSec: perSec, fn: fn, state: map[string]*rate{}, stop: make(chan struct{}), done: make(chan struct{})}
	go r.tick()
	return r
}

func (r *reporter) report(d egress.Decision) {
	if r.fn == nil {
		return
	}
	if d.Allowed {
		r.fn(d)
		return
	}
	now := time.Now()
	r.mu.Lock()
	st := r.state[d.SandboxID]
	if st == nil {
		st = &rate{window: now}
		r.state[d.SandboxID] = st
	}
	var summary *egress.Decision
	if now.Sub(st.window) >= time.Second {
		summary = st.summary()
		st.window, st.n = now, 0
	}
	st.seen = now
	send := st.n < r.perSec
	if send {
		st.n++
	} else {
		st.suppressed++
		st.last = d
	}
	r.mu.Unlock()
	if summary != nil {
		r.fn(*summary)
	}
	if send {
		r.fn(d)
	}
}

// summary returns the summary decision of the window that ends, if any was suppressed.
func (st *rate) summary() *egress.Decision {
	if st.suppressed == 0 {
		return nil
	}
	d := egress.Decision{SandboxID: st.last.SandboxID, Proto: st.last.Proto, Count: st.suppressed,
		Reason: fmt.Sprintf("%d more refused packets within a second not reported one by one (last: %s to %s)",
			st.suppressed, st.last.Proto, st.last.Addr)}
	st.suppressed = 0
	return &d
}

// tick flushes summaries of windows that ended and forgets quiet sandboxes.
func (r *reporter) tick() {
	defer close(r.done)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case now := <-t.C:
			r.flush(now, false)
		}
	}
}

func (r *reporter) flush(now time.Time, all bool) {
	var out []egress.Decision
	r.mu.Lock()
	for id, st := range r.state {
		if all || now.Sub(st.window) >= time.Second {
			if s := st.summary(); s != nil {
				out = append(out, *s)
			}
			st.window, st.n = now, 0
		}
		if all || now.Sub(st.seen) >= 10*time.Second {
			delete(r.state, id)
		}
	}
	r.mu.Unlock()
	for _, d := range out {
		r.fn(d)
	}
}

func (r *reporter) close() {
	select {
	case <-r.stop:
		return
	default:
	}
	close(r.stop)
	<-r.done
	if r.fn != nil {
		r.flush(time.Now(), true)
	}
}
