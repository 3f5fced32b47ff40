// Package disk gives every sandbox a disk of its own: a sparse ext4 image of the sandbox's size,
// loop-mounted by sandboxd. Everything a sandbox can write — its read_write paths, its /tmp, the
// files uploaded into it — lives on that file system, so the size bounds every byte it writes: a
// full disk is ENOSPC inside (never an OOM: nothing of it is in memory but the page cache, which
// the kernel can write back), and one sandbox's disk cannot touch another's or the host's.
//
// An image is a copy of a template formatted once per size with mkfs.ext4 (no journal: a
// sandbox's disk never outlives a crash of sandboxd; uninitialised inode tables, which the kernel
// is told not to zero: noinit_itable), copied sparsely (~0.5 ms), attached to a free loop device
// with LOOP_CONFIGURE (autoclear: the device goes when the file system does; direct I/O: the
// image's pages are not cached twice) and mounted nodev, nosuid. RATIONALE.md compares this with
// btrfs qgroups and says why XFS and ext4 project quotas are not used.
//
// The images live in a directory of the caller's (the data directory: that is where the space
// is), the mounts where the caller says (a directory of package mountns: private to sandboxd's
// mount namespace, so a crash unmounts them). The image is sparse: the host's free space must
// cover what sandboxes write, which is why the service refuses creates below a free-space floor.
package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// MinSize is the smallest disk: ext4 needs room for its own metadata.
const MinSize = 16 << 20

// mountOptions are the ext4 options of every disk: inode tables are never zeroed in the
// background (they are uninitialised, which ext4 records), errors make it read-only.
const mountOptions = "noinit_itable,errors=remount-ro"

// Manager makes and removes disks. It is safe for concurrent use.
type Manager struct {
	templates string // directory of the formatted templates, one per size
	mkfs      string

	mu   sync.Mutex
	made map[int64]*template
}

type template struct {
	once sync.Once
	path string
	err  error
}

// NewManager returns a Manager that keeps its templates in dir (created; a directory on the
// file system of the images, for cheap copies). It fails with the fix when mkfs.ext4 or the loop
// devices are missing.
func NewManager(dir string) (*Manager, error) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		if _, serr := os.Stat("/sbin/mkfs.ext4"); serr == nil {
			mkfs, err = "/sbin/mkfs.ext4", nil
		}
	}
	if err != nil {
		return nil, errors.New("disk: mkfs.ext4 not found (install e2fsprogs: scripts/install-deps.sh)")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return nil, fmt.Errorf("disk: no loop devices (/dev/loop-control: %v): load the loop module (modprobe loop)", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("disk: %w", err)
	}
	return &Manager{templates: dir, mkfs: mkfs, made: map[int64]*template{}}, nil
}

// Create makes a disk of size bytes: the image file img (which must not exist) and the file
// system mounted at mnt (created, mode 0711; its root is root's, mode 0711). On error nothing is
// left.
func (m *Manager) Create(img, mnt string, size int64) (err error) {
	if size < MinSize {
		return fmt.Errorf("disk of %d bytes: at least %d", size, MinSize)
	}
	size = size &^ 4095
	tmpl, err := m.template(size)
	if err != nil {
		return err
	}
	if err := sparseCopy(tmpl, img); err != nil {
		os.Remove(img)
		return fmt.Errorf("disk image: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(img)
		}
	}()
	if err := os.Mkdir(mnt, 0o711); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("disk mount point: %w", err)
	}
	dev, loop, err := attach(img)
	if err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	// Until the mount holds the device, this descriptor does; closing it after a failed mount
	// detaches the device (autoclear).
	defer loop.Close()
	if err := unix.Mount(dev, mnt, "ext4", unix.MS_NODEV|unix.MS_NOSUID, mountOptions); err != nil {
		return fmt.Errorf("disk: mount %s: %w", dev, err)
	}
	if err := os.Chmod(mnt, 0o711); err != nil {
		unix.Unmount(mnt, unix.MNT_DETACH)
		return fmt.Errorf("disk: %w", err)
	}
	return nil
}

// Remove unmounts the disk at mnt (lazily: a process that still holds a descriptor in it keeps
// the file system until it closes it; the loop device goes with the file system) and removes
// img. A disk that is not there is no error.
func Remove(img, mnt string) error {
	var errs []error
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount disk %s: %w", mnt, err))
	}
	if err := os.Remove(mnt); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if err := os.Remove(img); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Usage returns the bytes used on the disk mounted at mnt and its size (what statfs says: the
// file system's own metadata counts in both).
func Usage(mnt string) (used, size int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		return 0, 0, fmt.Errorf("disk usage: %w", err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		return 0, 0, fmt.Errorf("disk usage: %s is not a mounted disk", mnt)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize, int64(st.Blocks) * st.Bsize, nil
}

// template returns the path of the formatted template of size, making it the first time.
func (m *Manager) template(size int64) (string, error) {
	m.mu.Lock()
	t := m.made[size]
	if t == nil {
		t = &template{path: filepath.Join(m.templates, "ext4-"+strconv.FormatInt(size, 10)+".img")}
		m.made[size] = t
	}
	m.mu.Unlock()
	t.once.Do(func() { t.err = m.format(t.path, size) })
	return t.path, t.err
}

// format makes the template at path (kept from an earlier process if it is there).
func (m *Manager) format(path string, size int64) error {
	if st, err := os.Stat(path); err == nil && st.Size() == size {
		return nil
	}
	tmp := path + ".tmp"
	os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("disk template: %w", err)
	}
	err = f.Truncate(size)
	f.Close()
	if err == nil {
		// 4 KiB blocks (the loop device's block size: direct I/O); -m 0: no blocks reserved for root
		// (nothing in a sandbox is root); no journal.
		cmd := exec.Command(m.mkfs, "-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal",
			"-E", "lazy_itable_init=1,nodiscard,root_owner=0:0", tmp)
		cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true} // signals for sandboxd's group are not its
		out, cerr := cmd.CombinedOutput()
		if cerr != nil {
			err = fmt.Errorf("mkfs.ext4: %w: %s", cerr, out)
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("disk template of %d bytes: %w", size, err)
	}
	return nil
}

// sparseCopy copies src to the new file dst, data extents only (SEEK_DATA/SEEK_HOLE).
func sparseCopy(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(st.Size()); err != nil {
		return err
	}
	fd := int(in.Fd())
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return out.Close()
}

// attach attaches img to a free loop device (autoclear, direct I/O when the backing file system
// allows it) and returns the device's path and an open descriptor of it.
func attach(img string) (string, *os.File, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	defer ctl.Close()
	backing, err := os.OpenFile(img, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	defer backing.Close()
	for try := 0; ; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("free loop device: %w", err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		loop, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", nil, err
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: 4096}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_DIRECT_IO
		err = loopConfigure(loop, &cfg)
		if errors.Is(err, unix.EINVAL) {
			// No direct I/O on this backing file system: cached I/O then.
			cfg.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
			err = loopConfigure(loop, &cfg)
		}
		if err == nil {
			return dev, loop, nil
		}
		loop.Close()
		if !errors.Is(err, unix.EBUSY) || try > 100 {
			return "", nil, fmt.Errorf("configure %s: %w", dev, err)
		}
		// Another create took the device between GET_FREE and here: the next free one.
	}
}

func loopConfigure(loop *os.File, cfg *unix.LoopConfig) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, loop.Fd(), unix.LOOP_CONFIGURE, uintptr(unsafe.Pointer(cfg)))
	if e != 0 {
		return e
	}
	return nil
}
