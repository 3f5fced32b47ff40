package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

const (
	maxRequestLine = 32 << 20         // a request line longer than this is refused
	requestTimeout = 10 * time.Second // to send the request line after connecting
	writeTimeout   = 60 * time.Second // per event written to the host
)

type agentServer struct {
	python string
	log    *slog.Logger
	pid1   bool
	reaper *reaper

	warmMu sync.Mutex
	warm   *proc // the next run's process, started and waiting (nil: none)

	contexts map[string]*pyContext // the code contexts by name (context.go); used by the serve loop only

	zyg       *zygote // forks the runs' processes once one has said hello (nil: the agent launches them)
	afterExit func()  // what the run just served left to do once its answer is sent (nil: nothing)

	runnerMu   sync.Mutex
	runnerCode []byte // the runner compiled by this Python (marshal), once a process has sent it
	dumping    bool   // a process is sending it

	ln connListener // the host's socket, inherited (agent.ListenFD), the broker's (broker.go), or TCP (tcp.go)

	// TCP mode (tcp.go): every connection proves it holds secret first; spawn is the sandbox's
	// allow_spawn (tcpSpawn), which a request cannot change.
	secret   []byte
	tcpSpawn bool
}

// connListener is what the agent accepts its connections from.
type connListener interface {
	Accept() (net.Conn, error)
}

func newAgent(python string, log *slog.Logger, tcp *tcpMode) (*agentServer, error) {
	a := &agentServer{
		python: python,
		log:    log,
		pid1:   os.Getpid() == 1,

		contexts: map[string]*pyContext{},
	}
	if a.pid1 {
		// Go would exit or crash on these when sent by another process; as PID 1 the agent
		// receives them only because Go installs handlers. Receive and drop them instead
		// (handled, not SIG_IGN, so children still start with default dispositions).
		sigs := make(chan os.Signal, 8)
		signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGILL, syscall.SIGTRAP,
			syscall.SIGABRT, syscall.SIGTERM, syscall.SIGSTKFLT, syscall.SIGSYS)
		go func() {
			for s := range sigs {
				log.Info("ignoring a signal", "signal", s)
			}
		}()
	} else if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		log.Warn("prctl(PR_SET_CHILD_SUBREAPER)", "err", err)
	}
	a.reaper = startReaper()
	listen := a.listen
	if tcp != nil {
		listen = func() error { return a.listenTCP(tcp) }
	}
	if err := listen(); err != nil {
		return nil, err
	}
	return a, nil
}

// listen takes the listening socket the host bound and passed as agent.ListenFD — or, under
// gVisor, the connected broker socket passed there instead (broker.go).
func (a *agentServer) listen() error {
	f := os.NewFile(agent.ListenFD, "agent socket")
	if f == nil {
		return fmt.Errorf("no descriptor %d: the host passes the agent's listening socket there", agent.ListenFD)
	}
	unix.CloseOnExec(agent.ListenFD)
	if listening, err := isListening(agent.ListenFD); err == nil && !listening {
		uc, err := unixConnOf(f)
		if err != nil {
			return fmt.Errorf("descriptor %d is not the agent's broker socket: %w", agent.ListenFD, err)
		}
		a.ln = &brokerListener{sock: uc}
		return nil
	}
	ln, err := unixListenerOf(f)
	if err != nil {
		return fmt.Errorf("descriptor %d is not the agent's listening socket: %w", agent.ListenFD, err)
	}
	a.ln = ln
	return nil
}

// serve serves the connections' requests one at a time. Each connection's first line is read
// by a goroutine of its own, so a connection slow to say what it wants (the zygote's, which the
// host makes before the zygote's Python has started) holds up no other.
func (a *agentServer) serve() {
	a.log.Info("serving", "pid", os.Getpid(), "uid", os.Getuid(), "python", a.python)
	reqs := make(chan request)
	go func() {
		for {
			conn, err := a.ln.Accept()
			if _, broker := a.ln.(*brokerListener); err != nil && broker {
				a.log.Error("the host's broker is gone: exiting", "err", err)
				os.Exit(1)
			}
			if err != nil {
				a.log.Warn("accept", "err", err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			go a.readRequest(conn, reqs)
		}
	}()
	for r := range reqs {
		a.handle(r)
	}
}

// request is a connection and its first line (or the error reading it).
type request struct {
	conn net.Conn
	br   *bufio.Reader
	line []byte
	err  error
}

// readRequest reads conn's first line and passes it on to the serve loop; it drops a connection
// from inside the sandbox (none can reach the unix socket; checked all the same; in TCP mode:
// tcp.go), one that fails TCP mode's challenge, and one closed before it said anything.
func (a *agentServer) readRequest(conn net.Conn, reqs chan<- request) {
	br := bufio.NewReaderSize(conn, 64<<10)
	if a.secret != nil {
		if err := a.admitTCP(conn, br); err != nil {
			a.log.Warn("refusing a connection", "remote", conn.RemoteAddr().String(), "err", err)
			conn.Close()
			return
		}
	} else if uc, ok := conn.(*net.UnixConn); ok && a.pid1 {
		if pid, err := peerPID(uc); err != nil {
			a.log.Warn("refusing a connection: SO_PEERCRED", "err", err)
			conn.Close()
			return
		} else if pid != 0 {
			a.log.Warn("refusing a connection from inside the sandbox", "pid", pid)
			conn.Close()
			return
		}
	}
	conn.SetReadDeadline(time.Now().Add(requestTimeout))
	line, err := agent.ReadLine(br, maxRequestLine)
	if err != nil && len(line) == 0 && errors.Is(err, io.EOF) {
		conn.Close() // a client that gave up before asking
		return
	}
	conn.SetReadDeadline(time.Time{})
	reqs <- request{conn: conn, br: br, line: line, err: err}
}

// handle serves one request: runs it, writes events, closes. A zygote's hello instead makes the
// connection the agent's line to its zygote.
func (a *agentServer) handle(r request) {
	conn, br, line := r.conn, r.br, r.line
	keep := false
	defer func() {
		if !keep {
			conn.Close()
		}
	}()
	if err := r.err; err != nil {
		a.log.Warn("reading request", "err", err)
		s := newSender(conn, nil, a.log)
		s.exit(&agent.RunResult{ExitCode: -1, AgentError: "reading request: " + err.Error()})
		return
	}
	if string(line) == agent.Ping {
		newSender(conn, nil, a.log).send(&agent.Event{Type: "ready"})
		return
	}
	if uc, ok := conn.(*net.UnixConn); ok && string(line) == zygoteHello && a.secret == nil {
		keep = true
		a.adoptZygote(newZygote(uc, br, a.log))
		return
	}
	var req agent.RunRequest
	if err := json.Unmarshal(line, &req); err != nil {
		s := newSender(conn, nil, a.log)
		s.exit(&agent.RunResult{ExitCode: -1, AgentError: "bad request: " + err.Error()})
		return
	}
	if a.secret != nil {
		req.AllowSpawn = a.tcpSpawn // the sandbox's, fixed at its start
	}

	// After the request line the host sends only answers to the run's agent calls (see package
	// agent); EOF or an error means the host went away.
	gone := make(chan struct{})
	answers := make(chan []byte, 1)
	go func() {
		for {
			line, err := agent.ReadLine(br, pyrunner.MaxAgentAnswerLine)
			if err != nil {
				close(gone)
				return
			}
			select {
			case answers <- line:
			default:
				a.log.Warn("an answer from the host that no agent call waits for: dropped")
			}
		}
	}()
	s := newSender(conn, gone, a.log)
	oomBefore := int64(-1)
	if a.secret != nil { // TCP mode: the host cannot see the sandbox's cgroup
		oomBefore = oomKills()
	}
	var res *agent.RunResult
	switch {
	case req.Op != "":
		res = a.handleContext(&req)
	case req.Context != "":
		res = a.runInContext(&req, s, answers)
	default:
		res = a.run(&req, s, answers)
	}
	res.ContextPIDs = a.contextPIDs()
	res.OOMKill = oomBefore >= 0 && oomKills() > oomBefore
	s.exit(res)
	if f := a.afterExit; f != nil {
		a.afterExit = nil
		f()
	}
}

func peerPID(conn *net.UnixConn) (int32, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	return cred.Pid, nil
}

// sender writes events to the host, one JSON line each. After a failed write it writes nothing
// more and closes broken.
type sender struct {
	conn   net.Conn
	gone   <-chan struct{} // closed when the host went away (read side); nil: never
	broken chan struct{}   // closed on the first failed write
	log    *slog.Logger
	mu     sync.Mutex
	failed bool
}

func newSender(conn net.Conn, gone <-chan struct{}, log *slog.Logger) *sender {
	return &sender{conn: conn, gone: gone, broken: make(chan struct{}), log: log}
}

func (s *sender) send(ev *agent.Event) {
	b, err := encodeEvent(ev)
	if err != nil && ev.Result != nil && ev.Result.Result != nil {
		// Only an invalid result could do this; drop it rather than the whole event.
		s.log.Warn("encoding the exit event failed: its result is dropped", "err", err)
		ev.Result.Result = nil
		b, err = encodeEvent(ev)
	}
	if err == nil && len(b) > agent.MaxEventLine+1 && ev.Result != nil {
		// The host would refuse the line (a service failure the code caused): the parts the
		// code controls go, biggest first, until it fits.
		s.log.Warn("the exit event is over the line limit: the report's parts are dropped", "bytes", len(b))
		r := ev.Result
		for _, drop := range []func(){
			func() { r.Rich = pyrunner.Rich{Truncated: true} },
			func() { r.Result = nil },
			func() { r.Error = nil },
		} {
			drop()
			if b, err = encodeEvent(ev); err != nil || len(b) <= agent.MaxEventLine+1 {
				break
			}
		}
	}
	if err != nil {
		s.log.Error("encoding an event", "event", ev.Type, "err", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed {
		return
	}
	s.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if _, err := s.conn.Write(b); err != nil {
		s.failed = true
		close(s.broken)
	}
}

// encodeEvent is ev's line, '\n' included. It is not HTML-escaped: the runner's report (result,
// display, outputs) passes through verbatim, so `<`, `>` and `&` take one byte each, not six.
func encodeEvent(ev *agent.Event) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(ev); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (s *sender) output(typ string, data []byte) {
	s.send(&agent.Event{Type: typ, Data: data})
}

func (s *sender) exit(res *agent.RunResult) {
	s.send(&agent.Event{Type: "exit", Result: res})
}
