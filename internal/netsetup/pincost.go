package netsetup

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"

	"github.com/sandboxd/sandboxd/internal/egress"
)

// PinCosts is what pinning DNS answers costs (MeasurePins, for sandboxd bench), one sample per
// answer of each kind.
type PinCosts struct {
	Fresh    []time.Duration // an answer of an address not pinned yet: one element added
	Again    []time.Duration // the same answer again: already in place, no netlink round trip
	Renew    []time.Duration // an answer for longer than its pin has left: delete and add
	Baseline []time.Duration // one element of the same key added to a plain set, in a transaction of its own
}

// MeasurePins sets up sandbox id with a policy that pins (a name allowed on a port), pins n
// answers, each of a new address, with Pin three ways (new, again, renewed), and between them adds
// an element of the same key type to a plain set of a scratch table: what the kernel's transaction
// alone costs (`nft add element`), over a connection kept open as Pin's is. The pins set grows to
// n elements, the plain set too. Everything it made is removed before it returns. n is at most
// maxPinElems.
func (m *Manager) MeasurePins(ctx context.Context, id string, n int) (_ PinCosts, err error) {
	if n <= 0 || n > maxPinElems {
		return PinCosts{}, fmt.Errorf("netsetup: measure pins: n %d outside 1..%d", n, maxPinElems)
	}
	p, err := egress.ParsePolicy(true, []string{"*.pin.bench.invalid:5432"})
	if err != nil {
		return PinCosts{}, err
	}
	sb, err := m.Setup(ctx, id, p)
	if err != nil {
		return PinCosts{}, err
	}
	defer func() { err = errors.Join(err, m.Teardown(id)) }()
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return PinCosts{}, fmt.Errorf("netsetup: measure pins: %w", err)
	}
	defer c.CloseLasting()
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "sandboxd_pinbench_" + m.tag})
	set := &nftables.Set{Table: tbl, Name: "plain", KeyType: ifDstPortType, Concatenation: true}
	if err := c.AddSet(set, nil); err != nil {
		return PinCosts{}, fmt.Errorf("netsetup: measure pins: %w", err)
	}
	if err := c.Flush(); err != nil {
		return PinCosts{}, fmt.Errorf("netsetup: measure pins: scratch table: %w", err)
	}
	defer func() {
		c.DelTable(tbl)
		err = errors.Join(err, c.Flush())
	}()
	var pc PinCosts
	timed := func(to *[]time.Duration, f func() error) error {
		t0 := time.Now()
		err := f()
		*to = append(*to, time.Since(t0))
		return err
	}
	for i := range n {
		addr := netip.AddrFrom4([4]byte{198, 51, byte(100 + i/250), byte(i % 250)})
		a := egress.Answer{Name: fmt.Sprintf("n%d.pin.bench.invalid", i), Addrs: []netip.Addr{addr}, Ports: []uint16{5432}, TTL: time.Hour}
		pin := func() error { return m.Pin(id, a) }
		err := errors.Join(
			timed(&pc.Baseline, func() error {
				if err := c.SetAddElements(set, []nftables.SetElement{pinKey{addr.As4(), 5432}.elem(sb.HostIf, 0)}); err != nil {
					return err
				}
				return c.Flush()
			}),
			timed(&pc.Fresh, pin),
			timed(&pc.Again, pin))
		a.TTL = 2 * time.Hour // longer than the element lives: replaced
		if err = errors.Join(err, timed(&pc.Renew, pin)); err != nil {
			return PinCosts{}, fmt.Errorf("netsetup: measure pins: %w", err)
		}
	}
	return pc, nil
}
