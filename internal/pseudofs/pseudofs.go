// Package pseudofs reads the small files of the kernel's pseudo-filesystems — /proc,
// the cgroup filesystem — on paths taken for every run (the agent's and the container driver's
// per-run checks), in as few system calls as the kernel allows.
//
// Why not os.ReadFile: os.Open hands every file to the runtime's poller (fcntl F_GETFL/F_SETFL
// O_NONBLOCK, epoll_ctl, refused with EPERM for these files, fcntl back) and ReadFile asks fstat
// for a size these files do not have: about ten system calls a file where open, read, read and
// close do (on the paravirtualised VMs sandboxd runs on, each costs ~1.3 µs).
//
// ReadFile reads until a read returns 0, never stopping at a short read: a seq_file (most of
// /proc, every cgroup file) returns at most one page per read, and a file of many records
// (cgroup.procs of a large group, /proc/<pid>/smaps) comes in several short reads. Errors are
// *fs.PathError as os returns them (errors.Is(err, fs.ErrNotExist) holds for a missing file).
package pseudofs

import (
	"io/fs"

	"golang.org/x/sys/unix"
)

// bufSize is ReadFile's first buffer: one page, what one read of a seq_file returns at most.
const bufSize = 4096

// ReadFile returns the content of file name: open, read until a read returns 0, close.
func ReadFile(name string) ([]byte, error) {
	fd, err := open(name, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, bufSize)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := unix.Read(fd, b[len(b):cap(b)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			unix.Close(fd)
			return nil, &fs.PathError{Op: "read", Path: name, Err: err}
		}
		if n == 0 {
			break
		}
		b = b[:len(b)+n]
	}
	if err := unix.Close(fd); err != nil {
		return nil, &fs.PathError{Op: "close", Path: name, Err: err}
	}
	return b, nil
}

func open(name string, mode int) (int, error) {
	for {
		fd, err := unix.Open(name, mode|unix.O_CLOEXEC, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: name, Err: err}
		}
		return fd, nil
	}
}
