package hostfs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// policies are the two resolve policies every attack runs against.
var policies = []struct {
	name string
	how  Resolve
}{{"beneath", Beneath}, {"in-root", InRoot}}

// escaped stands for the escape error (ErrEscapes and EACCES) in the tables.
var escaped = errors.New("escape")

// attackTree makes base/root, the directory under attack, and base/outside, what must never be
// reached: a secret file and an empty directory b. root holds a file, a FIFO, and symlinks
// inside, out (absolute and relative), chained, and absolute to inside. It returns base and an
// O_PATH descriptor of root.
func attackTree(t *testing.T) (string, int) {
	t.Helper()
	base := t.TempDir()
	root, out := filepath.Join(base, "root"), filepath.Join(base, "outside")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "sub"), 0o755))
	must(os.MkdirAll(filepath.Join(out, "b"), 0o755))
	must(os.WriteFile(filepath.Join(out, "secret"), []byte("secret"), 0o600))
	must(os.WriteFile(filepath.Join(root, "a.txt"), []byte("a"), 0o644))
	must(unix.Mkfifo(filepath.Join(root, "fifo"), 0o644))
	for link, target := range map[string]string{
		"abs-out":  out,             // absolute, out
		"rel-out":  "../outside",    // relative, out
		"chain":    "hop",           // chain: chain → hop → sub/hop → out
		"hop":      "sub/hop",       //
		"sub/hop":  "../../outside", //
		"chain-in": "sub/in",        // chain that stays inside
		"sub/in":   "../a.txt",      //
		"abs-in":   "/sub",          // absolute, meant for InRoot
		"dangling": "nothing",       //
	} {
		must(os.Symlink(target, filepath.Join(root, link)))
	}
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(err)
	t.Cleanup(func() { unix.Close(fd) })
	return base, fd
}

// forPolicies runs attack in a subtest per policy, on a fresh attackTree, with the policy's
// expectation, and checks afterwards that nothing outside changed.
func forPolicies[W any](t *testing.T, name string, beneath, inRoot W, attack func(t *testing.T, base string, root int, how Resolve, want W)) {
	for _, p := range policies {
		t.Run(p.name+"/"+name, func(t *testing.T) {
			base, root := attackTree(t)
			want := beneath
			if p.how == InRoot {
				want = inRoot
			}
			attack(t, base, root, p.how, want)
			outsideUntouched(t, base)
		})
	}
}

// outsideUntouched fails t when base/outside holds anything but the secret and an empty b.
func outsideUntouched(t *testing.T, base string) {
	t.Helper()
	var got []string
	filepath.WalkDir(filepath.Join(base, "outside"), func(p string, _ fs.DirEntry, err error) error {
		if err == nil {
			got = append(got, p[len(base):])
		}
		return err
	})
	sort.Strings(got)
	if want := []string{"/outside", "/outside/b", "/outside/secret"}; !equal(got, want) {
		t.Errorf("outside changed: %v", got)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// checkErr fails t unless err is want: nil, escaped, or an errno inside a *fs.PathError.
func checkErr(t *testing.T, err, want error) {
	t.Helper()
	var pe *fs.PathError
	switch {
	case want == nil && err != nil:
		t.Errorf("err %v, want success", err)
	case want == nil:
	case !errors.As(err, &pe):
		t.Errorf("err %v (%T), want a *fs.PathError", err, err)
	case want == escaped:
		if !errors.Is(err, ErrEscapes) || !errors.Is(err, unix.EACCES) {
			t.Errorf("err %v, want ErrEscapes and EACCES", err)
		}
	case !errors.Is(err, want) || errors.Is(err, ErrEscapes):
		t.Errorf("err %v, want %v", err, want)
	}
}

// sameFile fails t unless fd is the file at path p.
func sameFile(t *testing.T, fd int, p string) {
	t.Helper()
	var a, b unix.Stat_t
	if err := unix.Fstat(fd, &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lstat(p, &b); err != nil {
		t.Fatal(err)
	}
	if a.Dev != b.Dev || a.Ino != b.Ino {
		t.Errorf("opened another file than %s", p)
	}
}

func TestOpenAtAttacks(t *testing.T) {
	type want struct {
		at  string // the file it opens, relative to root ("." the root)
		err error
	}
	for _, tc := range []struct {
		rel             string
		flags           uint64
		how             Resolve // added to the policy
		beneath, inRoot want
	}{
		{rel: "a.txt", beneath: want{at: "a.txt"}, inRoot: want{at: "a.txt"}},
		{rel: "", beneath: want{at: "."}, inRoot: want{at: "."}},
		{rel: "sub/in", beneath: want{at: "a.txt"}, inRoot: want{at: "a.txt"}},
		{rel: "chain-in", beneath: want{at: "a.txt"}, inRoot: want{at: "a.txt"}},
		{rel: "../outside/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "sub/../../outside/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "$BASE/outside/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "/a.txt", beneath: want{err: escaped}, inRoot: want{at: "a.txt"}},
		{rel: "abs-out/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "rel-out/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "chain/secret", beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "abs-in", beneath: want{err: escaped}, inRoot: want{at: "sub"}},
		{rel: "sub/in", how: NoSymlinks, beneath: want{err: unix.ELOOP}, inRoot: want{err: unix.ELOOP}},
		{rel: "chain-in", how: NoSymlinks, beneath: want{err: unix.ELOOP}, inRoot: want{err: unix.ELOOP}},
		// The mode goes with O_CREAT only (openat2 refuses it otherwise: every row passes one).
		{rel: "sub/created", flags: unix.O_CREAT | unix.O_WRONLY, beneath: want{at: "sub/created"}, inRoot: want{at: "sub/created"}},
		// Creating through a link out: nothing is made outside.
		{rel: "rel-out/new", flags: unix.O_CREAT | unix.O_WRONLY, beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		{rel: "abs-out/new", flags: unix.O_CREAT | unix.O_WRONLY, beneath: want{err: escaped}, inRoot: want{err: unix.ENOENT}},
		// A FIFO opened O_PATH or O_NONBLOCK does not wait for a writer (a block would hang the test).
		{rel: "fifo", beneath: want{at: "fifo"}, inRoot: want{at: "fifo"}},
		{rel: "fifo", flags: unix.O_RDONLY | unix.O_NONBLOCK, beneath: want{at: "fifo"}, inRoot: want{at: "fifo"}},
	} {
		forPolicies(t, tc.rel, tc.beneath, tc.inRoot, func(t *testing.T, base string, root int, how Resolve, w want) {
			flags := tc.flags
			if flags == 0 {
				flags = unix.O_PATH
			}
			fd, err := OpenAt(root, strings.ReplaceAll(tc.rel, "$BASE", base), flags, 0o600, how|tc.how)
			checkErr(t, err, w.err)
			if err == nil {
				sameFile(t, fd, filepath.Join(base, "root", w.at))
				unix.Close(fd)
			}
		})
	}
}

// Magic links are never followed, also when a plain symlink (/proc/self) leads to them, and
// InRoot does not cross into another mount.
func TestOpenAtMagicLinks(t *testing.T) {
	proc, err := unix.Open("/proc", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(proc)
	slash, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(slash)
	for _, tc := range []struct {
		dir             int
		rel             string
		beneath, inRoot error
	}{
		{proc, "self/root", unix.ELOOP, unix.ELOOP},
		{proc, "self/root/etc/passwd", unix.ELOOP, unix.ELOOP},
		{proc, "thread-self/cwd", unix.ELOOP, unix.ELOOP},
		{proc, "self/fd/" + strconv.Itoa(proc), unix.ELOOP, unix.ELOOP},
		{slash, "proc/self/root", unix.ELOOP, escaped}, // InRoot stops at the mount first
	} {
		for _, p := range policies {
			t.Run(p.name+"/"+tc.rel, func(t *testing.T) {
				want := tc.beneath
				if p.how == InRoot {
					want = tc.inRoot
				}
				fd, err := OpenAt(tc.dir, tc.rel, unix.O_PATH, 0, p.how)
				if err == nil {
					unix.Close(fd)
				}
				checkErr(t, err, want)
			})
		}
	}
}

// A Resolve that is neither policy never opens anything unconfined.
func TestOpenAtNeedsAPolicy(t *testing.T) {
	_, root := attackTree(t)
	for _, how := range []Resolve{0, NoSymlinks, Beneath | InRoot, unix.RESOLVE_NO_MAGICLINKS} {
		fd, err := OpenAt(root, "a.txt", unix.O_PATH, 0, how)
		if err == nil {
			unix.Close(fd)
		}
		checkErr(t, err, unix.EINVAL)
	}
}

func TestMkdirAllAtAttacks(t *testing.T) {
	uid, gid := -1, -1
	if os.Getuid() == 0 {
		uid, gid = 4242, 4343
	}
	for _, tc := range []struct {
		rel             string
		beneath, inRoot error
		made            string // the directory it makes, relative to root, when it succeeds
	}{
		{rel: "new/deep/er", made: "new/deep/er"},
		{rel: "sub/x/", made: "sub/x"},
		{rel: "", made: "."},
		{rel: "new/../other", made: "other"},
		{rel: "../x", beneath: escaped, made: "x"},
		{rel: "/abs/dir", beneath: escaped, made: "abs/dir"},
		{rel: "abs-in/x", beneath: escaped, made: "sub/x"},
		{rel: "abs-out/b/x", beneath: escaped, inRoot: unix.ENOENT},
		{rel: "rel-out/b/x", beneath: escaped, inRoot: unix.ENOENT},
		{rel: "chain/b/x", beneath: escaped, inRoot: unix.ENOENT},
		{rel: "rel-out", beneath: escaped, inRoot: unix.ENOENT},
		{rel: "dangling/x", beneath: unix.ENOENT, inRoot: unix.ENOENT},
		{rel: "a.txt/x", beneath: unix.ENOTDIR, inRoot: unix.ENOTDIR},
		{rel: "fifo", beneath: unix.ENOTDIR, inRoot: unix.ENOTDIR},
	} {
		forPolicies(t, tc.rel, tc.beneath, tc.inRoot, func(t *testing.T, base string, root int, how Resolve, want error) {
			err := MkdirAllAt(root, tc.rel, 0o755, uid, gid, how)
			checkErr(t, err, want)
			if err != nil || tc.made == "." {
				return
			}
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(base, "root", tc.made), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
				t.Fatalf("%s: not a directory (%v)", tc.made, err)
			}
			if uid != -1 && (int(st.Uid) != uid || int(st.Gid) != gid) {
				t.Errorf("%s: owner %d:%d, want %d:%d", tc.made, st.Uid, st.Gid, uid, gid)
			}
		})
	}
}

// While MkdirAllAt walks a/b/cN, another goroutine keeps swapping directory a for a symlink to
// outside (absolute, then relative; outside has a b too): whatever the interleaving, nothing is
// ever made outside.
func TestMkdirAllAtSymlinkSwapRace(t *testing.T) {
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			base, root := attackTree(t)
			rootDir := filepath.Join(base, "root")
			if err := os.MkdirAll(filepath.Join(rootDir, "a", "b"), 0o755); err != nil {
				t.Fatal(err)
			}
			alts := []string{"alt-abs", "alt-rel"}
			if err := os.Symlink(filepath.Join(base, "outside"), filepath.Join(rootDir, "alt-abs")); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink("../outside", filepath.Join(rootDir, "alt-rel")); err != nil {
				t.Fatal(err)
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					// Two exchanges: a is the symlink in between, the directory after.
					for range 2 {
						if err := unix.Renameat2(root, "a", root, alts[i%2], unix.RENAME_EXCHANGE); err != nil {
							t.Error(err)
							return
						}
					}
				}
			}()
			made := 0
			const n = 3000
			for i := range n {
				err := MkdirAllAt(root, "a/b/c"+strconv.Itoa(i), 0o755, -1, -1, p.how)
				switch {
				case err == nil:
					made++
				case errors.Is(err, ErrEscapes), errors.Is(err, unix.ENOENT):
				default:
					t.Errorf("unexpected error: %v", err)
				}
			}
			close(stop)
			wg.Wait()
			outsideUntouched(t, base)
			t.Logf("%d of %d made inside", made, n)
		})
	}
}
