package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxd/sandboxd/internal/hostfs"
)

// The files protocol: "sandbox-agent files" (a pod's files sidecar, cmd/sandbox-agent/files.go)
// serves a sandbox's read_only and read_write directories — each a directory of one volume the
// sidecar mounts whole — to the host over TCP, after the same mutual challenge as the agent
// (HostAuth/AgentAuth, on the same secret). Every path is resolved by package hostfs beneath its
// directory (openat2 RESOLVE_BENEATH): the sandbox, which can write those directories, cannot
// lead the sidecar outside them with a symlink or a race.
//
// After the challenge the host sends request lines (FileRequest, JSON) and the sidecar answers
// each with one line (FileAnswer, JSON; Error set on failure), in turn:
//
//	ping                 → {}
//	usage                → Size: the bytes the volume's files use
//	remove Dir Path      → {}
//	open Dir Path        → Info, and Entries for a directory; the file stays open for:
//	  read Offset Length   → Size: n, then n raw bytes of the opened file from Offset (n < Length
//	                         only at its end)
//	  sha256               → SHA256 of the opened file
//	write Dir Path Limit → the content follows as frames, each a 4-byte big-endian length and
//	                       that many bytes, ended by a frame of length 0; then the answer: Size
//	                       and SHA256 of what was stored. The sidecar may answer early (an error:
//	                       over Limit, disk full) and reads no more; the connection then ends.
//
// A connection ends when either side closes it; the sidecar closes it after a write's answer.

// Ops of a FileRequest.
const (
	FileOpPing   = "ping"
	FileOpUsage  = "usage"
	FileOpOpen   = "open"
	FileOpRead   = "read"
	FileOpSHA256 = "sha256"
	FileOpWrite  = "write"
	FileOpRemove = "remove"
)

// FileRequest is one request line of the files protocol.
type FileRequest struct {
	Op     string `json:"op"`
	Dir    string `json:"dir,omitempty"`  // the directory's name in the volume (one path element)
	Path   string `json:"path,omitempty"` // slash-separated, relative to Dir ("" is Dir itself)
	Limit  int64  `json:"limit,omitempty"`
	Offset int64  `json:"offset,omitempty"`
	Length int64  `json:"length,omitempty"`
}

// FileAnswer is one answer line of the files protocol.
type FileAnswer struct {
	Error   string        `json:"error,omitempty"` // a FileErr… code; Message says more
	Message string        `json:"message,omitempty"`
	Info    *hostfs.Info  `json:"info,omitempty"`
	Entries []hostfs.Info `json:"entries,omitempty"`
	Size    int64         `json:"size,omitempty"`
	SHA256  string        `json:"sha256,omitempty"`
}

// Error codes of a FileAnswer, each the wire form of one error kind of driver.Filer.
const (
	FileErrEscapes    = "escapes"
	FileErrNotRegular = "not_regular"
	FileErrTooLarge   = "too_large"
	FileErrIsDir      = "is_dir"
	FileErrNotDir     = "not_dir"
	FileErrNotEmpty   = "not_empty"
	FileErrRoot       = "root"
	FileErrNotExist   = "not_exist"
	FileErrNoSpace    = "no_space"
	FileErrInvalid    = "invalid" // a request the sidecar does not accept
	FileErrIO         = "io"      // anything else
)

var fileErrs = []struct {
	code string
	err  error
}{
	{FileErrTooLarge, hostfs.ErrTooLarge}, // before the others: a limit hit is that, whatever else
	{FileErrEscapes, hostfs.ErrEscapes},
	{FileErrNotRegular, hostfs.ErrNotRegular},
	{FileErrIsDir, hostfs.ErrIsDir},
	{FileErrNotDir, hostfs.ErrNotDir},
	{FileErrNotEmpty, hostfs.ErrNotEmpty},
	{FileErrRoot, hostfs.ErrRoot},
	{FileErrNotExist, fs.ErrNotExist},
	{FileErrNoSpace, unix.ENOSPC},
	{FileErrNoSpace, unix.EDQUOT},
	{FileErrNotDir, unix.ENOTDIR},
}

// FileErrorAnswer is the answer that carries err (the sidecar's side).
func FileErrorAnswer(err error) FileAnswer {
	for _, e := range fileErrs {
		if errors.Is(err, e.err) {
			return FileAnswer{Error: e.code, Message: err.Error()}
		}
	}
	return FileAnswer{Error: FileErrIO, Message: err.Error()}
}

// fileError is the error an answer carries (the host's side): the sentinel of its code, which
// errors.Is finds, with the sidecar's message.
func fileError(a FileAnswer) error {
	for _, e := range fileErrs {
		if e.code == a.Error {
			return fmt.Errorf("files sidecar: %s: %w", a.Message, e.err)
		}
	}
	return fmt.Errorf("files sidecar: %s: %s", a.Error, a.Message)
}

// MaxFileLine bounds a request or answer line of the files protocol (a directory's listing is one
// line: about 100 bytes an entry).
const MaxFileLine = 64 << 20

// MaxFileFrame bounds one frame of a write's content, and one read's Length.
const MaxFileFrame = 1 << 20

// FilesClient is the host's client of a files sidecar; dial makes authenticated connections to
// it (TCPDial).
type FilesClient struct {
	Dial Dial
}

// call sends req on a new connection and reads its answer; the connection is returned open.
func (c FilesClient) call(ctx context.Context, req FileRequest) (net.Conn, *bufio.Reader, FileAnswer, error) {
	conn, err := c.Dial(ctx)
	if err != nil {
		return nil, nil, FileAnswer{}, fmt.Errorf("files sidecar: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	br := bufio.NewReaderSize(conn, 64<<10)
	a, err := roundTrip(conn, br, req)
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, nil, FileAnswer{}, fmt.Errorf("files sidecar: %s: %w", req.Op, err)
	}
	if a.Error != "" {
		conn.Close()
		return nil, nil, a, fileError(a)
	}
	return conn, br, a, nil
}

func roundTrip(conn net.Conn, br *bufio.Reader, req FileRequest) (FileAnswer, error) {
	if err := writeFileLine(conn, req); err != nil {
		return FileAnswer{}, err
	}
	return readFileAnswer(br)
}

func writeFileLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

func readFileAnswer(br *bufio.Reader) (FileAnswer, error) {
	line, err := ReadLine(br, MaxFileLine)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return FileAnswer{}, fmt.Errorf("reading the answer: %w", err)
	}
	var a FileAnswer
	if err := json.Unmarshal(line, &a); err != nil {
		return FileAnswer{}, fmt.Errorf("bad answer: %w", err)
	}
	return a, nil
}

// Ping returns nil once the sidecar answers.
func (c FilesClient) Ping(ctx context.Context) error {
	conn, _, _, err := c.call(ctx, FileRequest{Op: FileOpPing})
	if err == nil {
		conn.Close()
	}
	return err
}

// Usage returns the bytes the volume's files use.
func (c FilesClient) Usage(ctx context.Context) (int64, error) {
	conn, _, a, err := c.call(ctx, FileRequest{Op: FileOpUsage})
	if err != nil {
		return 0, err
	}
	conn.Close()
	return a.Size, nil
}

// Remove removes path of dir.
func (c FilesClient) Remove(ctx context.Context, dir, path string) error {
	conn, _, _, err := c.call(ctx, FileRequest{Op: FileOpRemove, Dir: dir, Path: path})
	if err == nil {
		conn.Close()
	}
	return err
}

// Write stores r as path of dir (at most limit bytes) and returns its size and SHA-256. The
// content goes as it is read; an early answer (an error) stops it.
func (c FilesClient) Write(ctx context.Context, dir, path string, r io.Reader, limit int64) (int64, string, error) {
	conn, err := c.Dial(ctx)
	if err != nil {
		return 0, "", fmt.Errorf("files sidecar: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := writeFileLine(conn, FileRequest{Op: FileOpWrite, Dir: dir, Path: path, Limit: limit}); err != nil {
		return 0, "", writeErr(ctx, err)
	}
	// The content is sent while the answer is awaited: the sidecar answers early when it stops
	// reading (over the limit, the disk full), and the sending must then end.
	var wg sync.WaitGroup
	var sendErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		if sendErr = sendFrames(conn, r); errors.As(sendErr, new(bodyError)) {
			// No end frame: the sidecar sees the content end early and stores nothing.
			if cw, ok := conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			} else {
				conn.Close()
			}
		}
	}()
	a, err := readFileAnswer(bufio.NewReader(conn))
	conn.Close() // ends the sending if the answer came early
	wg.Wait()
	if be := (bodyError{}); errors.As(sendErr, &be) {
		return 0, "", fmt.Errorf("files sidecar: write: %w", be.err) // the caller's reader failed
	}
	if err != nil {
		if sendErr != nil && !errors.Is(sendErr, net.ErrClosed) {
			err = fmt.Errorf("%w (sending: %v)", err, sendErr)
		}
		return 0, "", writeErr(ctx, err)
	}
	if a.Error != "" {
		return 0, "", fileError(a)
	}
	return a.Size, a.SHA256, nil
}

func writeErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return fmt.Errorf("files sidecar: write: %w", err)
}

// bodyError is an error reading the content to send (not the connection's).
type bodyError struct{ err error }

func (e bodyError) Error() string { return "reading the content: " + e.err.Error() }
func (e bodyError) Unwrap() error { return e.err }

// sendFrames sends r as frames and the end frame.
func sendFrames(w io.Writer, r io.Reader) error {
	buf := make([]byte, 4+256<<10)
	for {
		n, err := r.Read(buf[4:])
		if n > 0 {
			binary.BigEndian.PutUint32(buf, uint32(n))
			if _, werr := w.Write(buf[:4+n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			_, werr := w.Write([]byte{0, 0, 0, 0})
			return werr
		}
		if err != nil {
			return bodyError{err}
		}
	}
}

// FrameReader reads the content of a write as its frames carry it, up to the end frame (then
// io.EOF); a connection that ends before it is io.ErrUnexpectedEOF.
type FrameReader struct {
	R    io.Reader
	left uint32
	done bool
}

func (f *FrameReader) Read(p []byte) (int, error) {
	for f.left == 0 {
		if f.done {
			return 0, io.EOF
		}
		var hdr [4]byte
		if _, err := io.ReadFull(f.R, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		f.left = binary.BigEndian.Uint32(hdr[:])
		if f.left == 0 {
			f.done = true
			return 0, io.EOF
		}
		if f.left > MaxFileFrame {
			return 0, fmt.Errorf("a frame of %d bytes, over %d", f.left, MaxFileFrame)
		}
	}
	if uint32(len(p)) > f.left {
		p = p[:f.left]
	}
	n, err := f.R.Read(p)
	f.left -= uint32(n)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// Open opens path of dir for reading: a file (read through the returned RemoteFile) or a
// directory (its entries in RemoteFile.Entries).
func (c FilesClient) Open(ctx context.Context, dir, path string) (*RemoteFile, error) {
	conn, br, a, err := c.call(ctx, FileRequest{Op: FileOpOpen, Dir: dir, Path: path})
	if err != nil {
		return nil, err
	}
	if a.Info == nil {
		conn.Close()
		return nil, errors.New("files sidecar: open: no info in the answer")
	}
	return &RemoteFile{conn: conn, br: br, Info: *a.Info, Entries: a.Entries}, nil
}

// RemoteFile is a file or directory a files sidecar holds open. Its reads are requests of at
// most MaxFileFrame bytes each on the connection. Not safe for concurrent use.
type RemoteFile struct {
	Info    hostfs.Info
	Entries []hostfs.Info // a directory's

	conn   net.Conn
	br     *bufio.Reader
	pos    int64 // where the next Read reads
	remain int64 // bytes of the last read's answer not yet consumed (they are at pos)
	err    error // the connection failed: every later call fails
}

// ioTimeout bounds each exchange on an open file's connection.
const ioTimeout = time.Minute

func (f *RemoteFile) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	if f.Info.Type != "file" {
		return 0, fmt.Errorf("files sidecar: read: %s: %w", f.Info.Name, hostfs.ErrIsDir)
	}
	if len(p) == 0 {
		return 0, nil
	}
	f.conn.SetDeadline(time.Now().Add(ioTimeout))
	if f.remain == 0 {
		if f.pos >= f.Info.Size {
			return 0, io.EOF // the size it had when opened: what callers were told
		}
		a, err := roundTrip(f.conn, f.br, FileRequest{Op: FileOpRead, Offset: f.pos, Length: min(MaxFileFrame, f.Info.Size-f.pos)})
		if err == nil && a.Error != "" {
			err = fileError(a)
		}
		if err != nil {
			f.err = fmt.Errorf("files sidecar: read: %w", err)
			return 0, f.err
		}
		if a.Size == 0 {
			return 0, io.EOF // the file shrank
		}
		f.remain = a.Size
	}
	n, err := f.br.Read(p[:min(int64(len(p)), f.remain)])
	f.pos += int64(n)
	f.remain -= int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		f.err = fmt.Errorf("files sidecar: read: %w", err)
		return n, f.err
	}
	return n, nil
}

// Seek sets where the next Read reads (io.SeekEnd: from the size the file had when opened).
func (f *RemoteFile) Seek(offset int64, whence int) (int64, error) {
	var to int64
	switch whence {
	case io.SeekStart:
		to = offset
	case io.SeekCurrent:
		to = f.pos + offset
	case io.SeekEnd:
		to = f.Info.Size + offset
	default:
		return 0, errors.New("seek: bad whence")
	}
	if to < 0 {
		return 0, errors.New("seek: negative position")
	}
	if to != f.pos {
		f.drain()
	}
	f.pos = to
	return to, nil
}

// drain consumes what the last read's answer still brings (the next answer comes after it); the
// next Read asks again from pos.
func (f *RemoteFile) drain() {
	if f.remain > 0 && f.err == nil {
		f.conn.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := io.CopyN(io.Discard, f.br, f.remain); err != nil {
			f.err = fmt.Errorf("files sidecar: %w", err)
		}
	}
	f.remain = 0
}

// SHA256 returns the hex SHA-256 of the opened file.
func (f *RemoteFile) SHA256() (string, error) {
	if f.err != nil {
		return "", f.err
	}
	if f.drain(); f.err != nil {
		return "", f.err
	}
	f.conn.SetDeadline(time.Now().Add(ioTimeout))
	a, err := roundTrip(f.conn, f.br, FileRequest{Op: FileOpSHA256})
	if err == nil && a.Error != "" {
		err = fileError(a)
	}
	if err != nil {
		return "", fmt.Errorf("files sidecar: sha256: %w", err)
	}
	return a.SHA256, nil
}

// ReadDir returns a directory's entries (sorted by name, not followed).
func (f *RemoteFile) ReadDir() ([]hostfs.Info, error) {
	if f.Info.Type != "dir" {
		return nil, fmt.Errorf("files sidecar: %s: %w", f.Info.Name, hostfs.ErrNotDir)
	}
	return f.Entries, nil
}

// Close ends the connection (the sidecar closes the file).
func (f *RemoteFile) Close() error { return f.conn.Close() }
