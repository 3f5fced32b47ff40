package worker

import (
	"bytes"
	"io"
	"io/fs"
	"sort"
	"sync"
	"time"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/sys"

	"github.com/sandboxd/sandboxd/internal/driver/wasm/protocol"
	"github.com/sandboxd/sandboxd/internal/pyrunner"
)

// runDir is one run's private directory, in memory: the runner's source to read, the run's
// header ("run": what the bootstrap waits for, see worker.go) and the user's code, the file
// the runner writes its report to, and the run's agent channel (pyrunner.AgentFile, agentChan).
// Each entry can be opened once: the bootstrap and the runner open all five before the user's
// code runs, so the code finds the directory empty (it can neither read the runner's input again
// nor forge its report, nor open a second agent channel). Nothing touches the disk.
//
// The directory exists before its run does (the instance is a standby, started ahead of the run):
// "run" and "code" are empty until deliver; a read of "run" blocks until then, so the guest
// waits in the bootstrap. cancel ends the wait with EOF instead (the standby exits unused).
type runDir struct {
	experimentalsys.UnimplementedFS
	mu      sync.Mutex
	entries map[string]*runEntry
	made    time.Time

	handed   chan struct{} // closed by deliver or cancel: "run" can be read
	handOnce sync.Once
	parked   chan struct{} // closed when the guest first reads "run" (it waits, or goes on)
	parkOnce sync.Once
	taken    chan struct{} // closed when the guest has read the run's header: the run is its own
	takeOnce sync.Once
	onTake   func()     // called once, by the guest's goroutine, when it takes the run
	agent    *agentChan // the run's agent channel, set by deliver
}

type runEntry struct {
	data   []byte // content to read (nil for the report)
	write  bool   // the report (or a context run's status): write-only
	max    int    // a write-only entry's cap, bytes (0: maxReport)
	wait   bool   // "run": reads wait for deliver or cancel
	agent  bool   // the agent channel: read-write, served by runDir.agent
	opened bool
	// onClose, if set, is called with what was written when the guest first closes the entry (a
	// code context's status: the end of its run).
	onClose func([]byte)
}

// newRunDir returns the directory for one run whose code and header come later (deliver).
// onTake, if not nil, is called when the guest reads the header.
func newRunDir(runner []byte, onTake func()) *runDir {
	return &runDir{made: time.Now(), onTake: onTake,
		handed: make(chan struct{}), parked: make(chan struct{}), taken: make(chan struct{}),
		entries: map[string]*runEntry{
			"runner":           {data: runner},
			"run":              {wait: true},
			"code":             {},
			"result":           {write: true},
			pyrunner.AgentFile: {agent: true},
		}}
}

// deliver hands the run to the guest: its header (what the bootstrap reads from "run"), its
// code and its agent channel. Only the first of deliver and cancel counts.
func (d *runDir) deliver(header, code []byte, agent *agentChan) {
	d.handOnce.Do(func() {
		d.mu.Lock()
		d.entries["run"].data = header
		d.entries["code"].data = code
		d.agent = agent
		d.mu.Unlock()
		close(d.handed)
	})
}

// cancel makes "run" read as empty: the bootstrap then exits without running anything.
func (d *runDir) cancel() { d.handOnce.Do(func() { close(d.handed) }) }

// took reports whether the guest has read the run's header.
func (d *runDir) took() bool { return isClosed(d.taken) }

// report returns what the runner wrote to "result".
func (d *runDir) report() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.entries["result"].data
}

func (d *runDir) String() string { return protocol.RunDir }

// maxReport bounds the report: the result's JSON (limited by the runner) plus the error's
// message and traceback (256 KiB each at most).
const maxReport = 64 << 20

func (d *runDir) OpenFile(p string, flag experimentalsys.Oflag, _ fs.FileMode) (experimentalsys.File, experimentalsys.Errno) {
	rel, errno := cleanRel(p)
	if errno != 0 {
		return nil, errno
	}
	if rel == "" {
		if flag&writeFlags != 0 {
			return nil, experimentalsys.EISDIR
		}
		return &runDirFile{d: d}, 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[rel]
	if e == nil || e.opened {
		if flag&experimentalsys.O_CREAT != 0 {
			return nil, experimentalsys.EACCES
		}
		return nil, experimentalsys.ENOENT
	}
	acc := flag & (experimentalsys.O_RDONLY | experimentalsys.O_RDWR | experimentalsys.O_WRONLY)
	if e.agent {
		if acc != experimentalsys.O_RDWR || flag&experimentalsys.O_DIRECTORY != 0 || d.agent == nil {
			return nil, experimentalsys.EACCES
		}
		e.opened = true
		return &agentFile{c: d.agent}, 0
	}
	if e.write != (acc == experimentalsys.O_WRONLY) || flag&experimentalsys.O_DIRECTORY != 0 {
		return nil, experimentalsys.EACCES
	}
	e.opened = true
	return &memFile{d: d, e: e, name: rel}, 0
}

func (d *runDir) stat(rel string) (sys.Stat_t, experimentalsys.Errno) {
	if rel == "" {
		return sys.Stat_t{Mode: fs.ModeDir | 0o500, Nlink: 2, Ino: 1, Mtim: d.made.UnixNano()}, 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[rel]
	if e == nil || e.opened {
		return sys.Stat_t{}, experimentalsys.ENOENT
	}
	return e.stat(d.made), 0
}

func (e *runEntry) stat(t time.Time) sys.Stat_t {
	mode := fs.FileMode(0o400)
	if e.write {
		mode = 0o200
	}
	return sys.Stat_t{Mode: mode, Nlink: 1, Size: int64(len(e.data)), Mtim: t.UnixNano(), Atim: t.UnixNano(), Ctim: t.UnixNano()}
}

func (d *runDir) Stat(p string) (sys.Stat_t, experimentalsys.Errno) {
	rel, errno := cleanRel(p)
	if errno != 0 {
		return sys.Stat_t{}, errno
	}
	return d.stat(rel)
}

func (d *runDir) Lstat(p string) (sys.Stat_t, experimentalsys.Errno) { return d.Stat(p) }

// runDirFile is the directory itself (listing what is still unopened).
type runDirFile struct {
	experimentalsys.UnimplementedFile
	d    *runDir
	done bool
}

func (f *runDirFile) Stat() (sys.Stat_t, experimentalsys.Errno) { return f.d.stat("") }
func (f *runDirFile) Ino() (sys.Inode, experimentalsys.Errno)   { return 1, 0 }
func (f *runDirFile) IsDir() (bool, experimentalsys.Errno)      { return true, 0 }
func (f *runDirFile) IsAppend() bool                            { return false }
func (f *runDirFile) SetAppend(bool) experimentalsys.Errno      { return experimentalsys.EISDIR }
func (f *runDirFile) Read([]byte) (int, experimentalsys.Errno)  { return 0, experimentalsys.EISDIR }
func (f *runDirFile) Write([]byte) (int, experimentalsys.Errno) { return 0, experimentalsys.EISDIR }
func (f *runDirFile) Pread([]byte, int64) (int, experimentalsys.Errno) {
	return 0, experimentalsys.EISDIR
}
func (f *runDirFile) Pwrite([]byte, int64) (int, experimentalsys.Errno) {
	return 0, experimentalsys.EISDIR
}
func (f *runDirFile) Truncate(int64) experimentalsys.Errno { return experimentalsys.EISDIR }

func (f *runDirFile) Seek(off offset, whence int) (int64, experimentalsys.Errno) {
	if off != 0 || whence != io.SeekStart {
		return 0, experimentalsys.EINVAL
	}
	f.done = false
	return 0, 0
}

func (f *runDirFile) Readdir(n int) ([]experimentalsys.Dirent, experimentalsys.Errno) {
	if f.done {
		return nil, 0
	}
	f.d.mu.Lock()
	var names []string
	for name, e := range f.d.entries {
		if !e.opened {
			names = append(names, name)
		}
	}
	f.d.mu.Unlock()
	sort.Strings(names)
	f.done = true
	out := make([]experimentalsys.Dirent, 0, len(names))
	for i, name := range names {
		out = append(out, experimentalsys.Dirent{Name: name, Ino: uint64(i + 2)})
	}
	return out, 0
}

// memFile is an opened entry: a reader of its data, or the writer of the report.
type memFile struct {
	experimentalsys.UnimplementedFile
	d      *runDir
	e      *runEntry
	name   string
	off    int64
	closed bool
}

func (f *memFile) Stat() (sys.Stat_t, experimentalsys.Errno) {
	f.d.mu.Lock()
	defer f.d.mu.Unlock()
	return f.e.stat(f.d.made), 0
}

func (f *memFile) IsDir() (bool, experimentalsys.Errno) { return false, 0 }

func (f *memFile) Read(buf []byte) (int, experimentalsys.Errno) {
	n, errno := f.Pread(buf, f.off)
	f.off += int64(n)
	return n, errno
}

func (f *memFile) Pread(buf []byte, off int64) (int, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	if f.e.write {
		return 0, experimentalsys.EBADF
	}
	if off < 0 {
		return 0, experimentalsys.EINVAL
	}
	if f.e.wait {
		// The guest waits here for its run (its goroutine blocks; nothing else does).
		f.d.parkOnce.Do(func() { close(f.d.parked) })
		<-f.d.handed
		if len(f.e.data) > 0 {
			f.d.takeOnce.Do(func() {
				if f.d.onTake != nil {
					f.d.onTake()
				}
				close(f.d.taken)
			})
		}
	}
	if off >= int64(len(f.e.data)) {
		return 0, 0
	}
	return copy(buf, f.e.data[off:]), 0
}

func (f *memFile) Seek(off offset, whence int) (int64, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	var base int64
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		base = f.off
	case io.SeekEnd:
		f.d.mu.Lock()
		base = int64(len(f.e.data))
		f.d.mu.Unlock()
	default:
		return 0, experimentalsys.EINVAL
	}
	if base+off < 0 {
		return 0, experimentalsys.EINVAL
	}
	f.off = base + off
	return f.off, 0
}

func (f *memFile) Write(buf []byte) (int, experimentalsys.Errno) {
	if f.closed {
		return 0, experimentalsys.EBADF
	}
	if !f.e.write {
		return 0, experimentalsys.EBADF
	}
	f.d.mu.Lock()
	defer f.d.mu.Unlock()
	limit := f.e.max
	if limit == 0 {
		limit = maxReport
	}
	if len(f.e.data)+len(buf) > limit {
		return 0, experimentalsys.EIO
	}
	f.e.data = append(f.e.data, buf...)
	return len(buf), 0
}

func (f *memFile) Close() experimentalsys.Errno {
	if f.closed {
		return 0
	}
	f.closed = true
	if f.e.onClose != nil {
		f.d.mu.Lock()
		fn, data := f.e.onClose, bytes.Clone(f.e.data)
		f.e.onClose = nil
		f.d.mu.Unlock()
		fn(data)
	}
	return 0
}
