package netsetup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
)

// slots are the /30s in use, per pool, for every manager of the process, and where the next
// search starts: allocation goes round the pool (from a random point) rather than reusing the
// lowest free slot, so that
// a new sandbox seldom inherits an address the kernel still has state for (conntrack entries,
// the ICMP rate limit of a peer).
var slots = struct {
	sync.Mutex
	used map[netip.Prefix]map[int]bool
	next map[netip.Prefix]int
}{used: map[netip.Prefix]map[int]bool{}, next: map[netip.Prefix]int{}}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func addrOf(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// slot returns the i-th /30 of pool with its gateway (.1) and sandbox (.2) addresses.
func slot(pool netip.Prefix, i int) (p netip.Prefix, gw, addr netip.Addr) {
	base := u32(pool.Addr()) + uint32(i)*4
	return netip.PrefixFrom(addrOf(base), 30), addrOf(base + 1), addrOf(base + 2)
}

// slot6 returns the IPv6 /126 of a sandbox whose IPv4 /30 is p: fd5b:d000::<p's address>, with
// the gateway at +1 and the sandbox at +2 (IPv6 is only routed to the host, to be refused there).
func slot6(p netip.Prefix) (prefix netip.Prefix, gw, addr netip.Addr) {
	var b [16]byte
	b[0], b[1], b[2], b[3] = 0xfd, 0x5b, 0xd0, 0x00
	a := p.Addr().As4()
	copy(b[12:], a[:])
	base := netip.AddrFrom16(b)
	return netip.PrefixFrom(base, 126), base.Next(), base.Next().Next()
}

// allocate takes the next free /30 of the pool that neither this process nor an address on the host
// uses.
func (m *Manager) allocate() (int, error) {
	busy := map[int]bool{}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return m.nl.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil { // (partial results would let a /30 in use look free)
		return 0, fmt.Errorf("netsetup: list the host's addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && m.pool.Contains(ip.Unmap()) {
			busy[int((u32(ip.Unmap())-u32(m.pool.Addr()))/4)] = true
		}
	}
	n := 1 << (32 - m.pool.Bits() - 2)
	slots.Lock()
	defer slots.Unlock()
	used := slots.used[m.pool]
	if used == nil {
		used = map[int]bool{}
		slots.used[m.pool] = used
	}
	start, ok := slots.next[m.pool]
	if !ok {
		// A random start: two processes using one pool by mistake seldom pick the same /30 at the
		// same moment (the host-address check above cannot see a concurrent choice).
		start = rand.IntN(n)
	}
	for k := 0; k < n; k++ {
		i := (start + k) % n
		if !used[i] && !busy[i] {
			used[i] = true
			slots.next[m.pool] = (i + 1) % n
			return i, nil
		}
	}
	return -1, errors.New("the address pool " + m.pool.String() + " is exhausted")
}

func freeSlot(pool netip.Prefix, i int) {
	slots.Lock()
	defer slots.Unlock()
	delete(slots.used[pool], i)
}
