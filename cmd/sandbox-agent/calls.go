package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// lineReader reads '\n'-terminated lines of at most max bytes (the newline excluded) from r. Unlike
// bufio.Reader.ReadSlice it does not wait for more bytes once it holds more than max without a
// newline: a run that writes a line too long and then waits for the answer gets it.
type lineReader struct {
	r     io.Reader
	max   int
	buf   []byte // what was read and not yet returned
	next0 int    // where to look for the newline from
}

var errLineTooLong = errors.New("line too long")

// next returns the next line (without its newline); the line is valid until the next call.
func (lr *lineReader) next() ([]byte, error) {
	for {
		if i := bytes.IndexByte(lr.buf[lr.next0:], '\n'); i >= 0 {
			end := lr.next0 + i
			if end > lr.max {
				return nil, errLineTooLong
			}
			line := lr.buf[:end:end]
			lr.buf, lr.next0 = lr.buf[end+1:], 0
			return line, nil
		}
		lr.next0 = len(lr.buf)
		if len(lr.buf) > lr.max {
			return nil, errLineTooLong
		}
		if cap(lr.buf)-len(lr.buf) < 64<<10 {
			grown := make([]byte, len(lr.buf), 2*cap(lr.buf)+64<<10)
			copy(grown, lr.buf)
			lr.buf = grown
		}
		n, err := lr.r.Read(lr.buf[len(lr.buf):cap(lr.buf)])
		lr.buf = lr.buf[:len(lr.buf)+n]
		if n == 0 && err != nil {
			return nil, err
		}
	}
}

// agentChannel makes a run process's agent channel (package agent, "Agent calls"): a unix
// socketpair whose first end the agent keeps (non-blocking, so that closing it ends a read or
// write in progress) and whose second, blocking, becomes the run's pyrunner.AgentFD.
func agentChannel() (mine, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("agent channel: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "agent channel"), os.NewFile(uintptr(fds[1]), "agent channel (run)"), nil
}

// serveCalls serves a run's agent channel ch until the run ends (end closes, then the caller
// closes ch), the channel ends, or the host goes away: it writes the run's hello, then reads the
// run's requests one at a time; each is sent to the host as a "call" event and the host's answer
// (from answers) written back. What the run's code writes is untrusted: a line that is not JSON
// is answered with an error; one over pyrunner.MaxAgentRequest too, after which the channel is
// shut (its framing is lost); every request past pyrunner.MaxAgentForwards is refused without the
// host.
func (a *agentServer) serveCalls(ch *os.File, info pyrunner.AgentInfo, s *sender, answers <-chan []byte, end <-chan struct{}) {
	reply := func(line []byte) bool {
		_, err := ch.Write(append(line[:len(line):len(line)], '\n'))
		return err == nil
	}
	if _, err := ch.Write(pyrunner.AgentHello(info)); err != nil {
		return
	}
	lr := &lineReader{r: ch, max: pyrunner.MaxAgentRequest}
	for n := 1; ; n++ {
		line, err := lr.next()
		if errors.Is(err, errLineTooLong) {
			reply(pyrunner.AgentTooLong())
			sc, err := ch.SyscallConn()
			if err == nil {
				sc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
			}
			return
		}
		if err != nil {
			return // the run closed its end, or ended
		}
		ans, forward := pyrunner.AgentLocalAnswer(n, line)
		if forward {
			s.send(&agent.Event{Type: "call", Call: line})
			select {
			case ans = <-answers:
			case <-s.gone:
				return
			case <-s.broken:
				return
			case <-end:
				return
			}
		}
		if !reply(ans) {
			return
		}
	}
}
