package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/agent"
	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// filesCommand is "sandbox-agent files --listen ADDR --secret-file PATH --root DIR": a pod's files
// sidecar (the kubernetes driver's; a native sidecar, its own container, uid 10000 like the
// sandbox's code, no capabilities, read-only root). DIR is the pod's disk volume, mounted whole
// and writable here; each read_only and read_write path of the sandbox is one directory of it,
// which the sandbox's container mounts by itself (read-only for read_only paths). The sidecar
// serves the files protocol (package agent, files.go) on ADDR to the host: the connection from
// the pod itself is refused and every other must pass the sandbox's challenge, as the agent's
// (admitTCP). Every path of a request is resolved beneath its directory by package hostfs
// (openat2 RESOLVE_BENEATH): the sandbox writes those directories and may plant links or race;
// nothing of that leads the sidecar outside the directory (to its secret, to the volume's other
// directories, to its root). Writes go to DIR/.staging (no sandbox path) then are renamed in.
const filesCommand = "files"

// Timeouts of the sidecar's connections: waiting for a request line, and for each read of a
// write's content.
const (
	filesIdleTimeout = 2 * time.Minute
	filesReadTimeout = time.Minute
)

func filesMain(args []string) {
	fl := flag.NewFlagSet(filesCommand, flag.ContinueOnError)
	listen := fl.String("listen", "", "the TCP address to serve")
	secretFile := fl.String("secret-file", "", "the file of the sandbox's secret")
	root := fl.String("root", "", "the volume whose directories are served")
	if err := fl.Parse(args); err != nil || fl.NArg() != 0 || *listen == "" || *secretFile == "" || !filepath.IsAbs(*root) {
		fmt.Fprintln(os.Stderr, "usage: sandbox-agent files --listen ADDR --secret-file PATH --root DIR")
		os.Exit(2)
	}
	log := newLogger("files")
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		log.Warn("prctl(PR_SET_DUMPABLE, 0)", "err", err)
	}
	secret, err := readSecret(*secretFile)
	if err != nil {
		log.Error("cannot serve", "err", err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Error("cannot serve", "err", err)
		os.Exit(1)
	}
	s := &filesServer{root: filepath.Clean(*root), secret: secret, log: log}
	for {
		conn, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			log.Error("accept", "err", err)
			os.Exit(1)
		}
		go s.serve(conn)
	}
}

type filesServer struct {
	root   string
	secret []byte
	log    *slog.Logger
}

// serve admits a connection and serves its requests in turn.
func (s *filesServer) serve(conn net.Conn) {
	defer conn.Close()
	br := bufio.NewReaderSize(conn, 64<<10)
	if err := admitTCP(conn, br, s.secret); err != nil {
		s.log.Warn("refused a connection", "remote", conn.RemoteAddr().String(), "err", err)
		return
	}
	s.handle(conn, br)
}

// handle serves the requests of an admitted connection, whose reader is br.
func (s *filesServer) handle(conn net.Conn, br *bufio.Reader) {
	var open *hostfs.File // the file of the connection's open request
	defer func() {
		if open != nil {
			open.Close()
		}
	}()
	answer := func(a agent.FileAnswer) bool {
		b, _ := json.Marshal(a)
		conn.SetWriteDeadline(time.Now().Add(filesReadTimeout))
		_, err := conn.Write(append(b, '\n'))
		return err == nil
	}
	for {
		conn.SetReadDeadline(time.Now().Add(filesIdleTimeout))
		line, err := agent.ReadLine(br, 64<<10)
		if err != nil {
			return
		}
		var req agent.FileRequest
		dec := json.NewDecoder(strings.NewReader(string(line)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			answer(agent.FileAnswer{Error: agent.FileErrInvalid, Message: "bad request: " + err.Error()})
			return
		}
		switch req.Op {
		case agent.FileOpPing:
			if !answer(agent.FileAnswer{}) {
				return
			}
		case agent.FileOpUsage:
			var st unix.Statfs_t
			if err := unix.Statfs(s.root, &st); err != nil {
				answer(agent.FileErrorAnswer(err))
				return
			}
			if !answer(agent.FileAnswer{Size: int64(st.Blocks-st.Bfree) * st.Bsize}) {
				return
			}
		case agent.FileOpRemove:
			err := s.withDir(req.Dir, func(d *hostfs.Dir) error { return d.Remove(req.Path) })
			a := agent.FileAnswer{}
			if err != nil {
				a = agent.FileErrorAnswer(err)
			}
			if !answer(a) {
				return
			}
		case agent.FileOpOpen:
			if open != nil {
				answer(agent.FileAnswer{Error: agent.FileErrInvalid, Message: "a file is open on this connection already"})
				return
			}
			var a agent.FileAnswer
			err := s.withDir(req.Dir, func(d *hostfs.Dir) error {
				f, err := d.OpenFile(req.Path)
				if err != nil {
					return err
				}
				a.Info = &f.Info
				if f.Info.Type == "dir" {
					a.Entries, err = f.ReadDir()
					f.Close()
					return err
				}
				open = f
				return nil
			})
			if err != nil {
				answer(agent.FileErrorAnswer(err))
				return
			}
			if !answer(a) {
				return
			}
		case agent.FileOpRead:
			if open == nil || req.Offset < 0 || req.Length <= 0 || req.Length > agent.MaxFileFrame {
				answer(agent.FileAnswer{Error: agent.FileErrInvalid, Message: "read: no open file, or a bad offset or length"})
				return
			}
			buf := make([]byte, req.Length)
			n, err := open.ReadAt(buf, req.Offset)
			if err != nil && !errors.Is(err, io.EOF) {
				answer(agent.FileErrorAnswer(err))
				return
			}
			if !answer(agent.FileAnswer{Size: int64(n)}) {
				return
			}
			if _, err := conn.Write(buf[:n]); err != nil {
				return
			}
		case agent.FileOpSHA256:
			if open == nil {
				answer(agent.FileAnswer{Error: agent.FileErrInvalid, Message: "sha256: no open file"})
				return
			}
			sum, err := open.SHA256()
			if err != nil {
				answer(agent.FileErrorAnswer(err))
				return
			}
			if !answer(agent.FileAnswer{SHA256: sum}) {
				return
			}
		case agent.FileOpWrite:
			s.write(conn, br, req, answer)
			return
		default:
			answer(agent.FileAnswer{Error: agent.FileErrInvalid, Message: fmt.Sprintf("unknown op %q", req.Op)})
			return
		}
	}
}

// write stores the content that follows req on the connection, answers, and leaves the
// connection to be closed: after an early answer it reads and drops what the host still sends,
// so that the host reads the answer rather than a reset.
func (s *filesServer) write(conn net.Conn, br *bufio.Reader, req agent.FileRequest, answer func(agent.FileAnswer) bool) {
	body := &agent.FrameReader{R: deadlineReader{conn: conn, r: br}}
	var size int64
	var sum string
	err := s.withDir(req.Dir, func(d *hostfs.Dir) error {
		if req.Limit < 0 {
			return fmt.Errorf("a negative limit: %w", errInvalid)
		}
		var err error
		size, sum, err = d.Write(req.Path, body, req.Limit)
		return err
	})
	if err != nil {
		answer(agent.FileErrorAnswer(err))
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		io.CopyN(io.Discard, br, 1<<30) // until the host closes (it does on the answer)
		return
	}
	answer(agent.FileAnswer{Size: size, SHA256: sum})
}

var errInvalid = errors.New("invalid request")

// withDir runs fn on directory name of the volume (one path element, not hidden).
func (s *filesServer) withDir(name string, fn func(*hostfs.Dir) error) error {
	if name == "" || strings.ContainsRune(name, '/') || strings.HasPrefix(name, ".") || strings.ContainsRune(name, 0) {
		return fmt.Errorf("directory %q is not one of the volume's: %w", name, hostfs.ErrEscapes)
	}
	d, err := hostfs.Open(filepath.Join(s.root, name), filepath.Join(s.root, ".staging"))
	if err != nil {
		return err
	}
	defer d.Close()
	return fn(d)
}

// deadlineReader reads conn (through r), each read within filesReadTimeout.
type deadlineReader struct {
	conn net.Conn
	r    io.Reader
}

func (d deadlineReader) Read(p []byte) (int, error) {
	d.conn.SetReadDeadline(time.Now().Add(filesReadTimeout))
	return d.r.Read(p)
}
