// Package pgtest starts throwaway PostgreSQL servers for tests: initdb into a temporary directory,
// postgres listening on a unix socket in that directory only (no TCP port), run as an
// unprivileged user (postgres refuses root: under root it runs as the "postgres" system user, or
// "nobody"), with durability off (fsync, synchronous_commit, full_page_writes) since nothing
// outlives the test.
//
// Shared returns the test process's server, started on first use; the package's TestMain calls
// Main so that it is stopped, and its directory removed, when the tests end. Start gives a test a
// server of its own, stopped when the test ends (to stop it midway: connection-loss tests).
//
// Without PostgreSQL's binaries (Debian's postgresql-15: scripts/install-deps.sh) the tests that
// ask for a server skip, except when the environment variable CI is set: then they fail.
package pgtest

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver

	"github.com/sandboxd/sandboxd/internal/deathsig"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// startWait bounds how long a server may take to accept connections (a loaded CI host).
const startWait = 2 * time.Minute

// Server is a running throwaway PostgreSQL server.
type Server struct {
	dir    string // the temporary directory: data/, the socket, the log
	cmd    *exec.Cmd
	exited chan struct{} // closed when the postmaster has exited
	dbs    atomic.Int64
	log    *bytes.Buffer
	// Initdb and Startup are how long initdb and the start of the server (until it accepted a
	// connection) took.
	Initdb, Startup time.Duration
	stopOnce        sync.Once
}

var (
	sharedOnce sync.Once
	shared     *Server
	sharedErr  error
)

// Shared returns the test process's server, starting it on first use. It skips t (fails it under
// CI) when PostgreSQL is not installed.
func Shared(t testing.TB) *Server {
	t.Helper()
	bin := binDir(t)
	sharedOnce.Do(func() {
		shared, sharedErr = start(bin)
		if sharedErr == nil {
			t.Logf("pgtest: initdb %v, server start %v", shared.Initdb.Round(time.Millisecond), shared.Startup.Round(time.Millisecond))
		}
	})
	if sharedErr != nil {
		t.Fatalf("pgtest: %v", sharedErr)
	}
	return shared
}

// Start starts a server of t's own, stopped when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := start(binDir(t))
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Main runs the tests and then stops the shared server, if it was started; call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	StopShared()
	os.Exit(code)
}

// StopShared stops the shared server, if it was started (for a TestMain that does more than Main).
func StopShared() {
	if shared != nil {
		shared.Stop()
	}
}

// binDir returns the directory of PostgreSQL's server binaries, the newest version installed;
// it skips t (fails it under CI) when there is none.
func binDir(t testing.TB) string {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return version(b) - version(a) })
	if p, err := exec.LookPath("postgres"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			dirs = append(dirs, filepath.Dir(r))
		}
	}
	for _, d := range dirs {
		if isFile(filepath.Join(d, "postgres")) && isFile(filepath.Join(d, "initdb")) {
			return d
		}
	}
	const why = "PostgreSQL is not installed (no postgres and initdb; scripts/install-deps.sh installs postgresql)"
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set but %s", why)
	}
	t.Skip(why)
	return ""
}

// version is the major version in a /usr/lib/postgresql/<version>/bin path (0 if none).
func version(dir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return v
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// credential is the user the server runs as: nil (this process's) unless this process is root.
func credential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 == nil && err2 == nil {
			return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
		}
	}
	return nil, errors.New("running as root and there is no postgres or nobody user to run the server as")
}

func start(bin string) (*Server, error) {
	cred, err := credential()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "sandboxd-pg-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, exited: make(chan struct{}), log: &bytes.Buffer{}}
	fail := func(err error) (*Server, error) {
		s.Stop()
		return nil, fmt.Errorf("%w\n%s", err, s.log.String())
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return fail(err)
		}
	}
	prep := func(c *exec.Cmd) {
		c.Stdout, c.Stderr = s.log, s.log
		// Setpgid: a ^C to the test does not reach the server before Stop does; Pdeathsig: a
		// test process that dies takes the server with it.
		c.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
		c.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
		c.Dir = dir
	}
	t0 := time.Now()
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", filepath.Join(dir, "data"), "-U", "postgres",
		"-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
	prep(initdb)
	if err := initdb.Run(); err != nil {
		return fail(fmt.Errorf("initdb: %w", err))
	}
	s.Initdb = time.Since(t0)
	t1 := time.Now()
	s.cmd = exec.Command(filepath.Join(bin, "postgres"), "-D", filepath.Join(dir, "data"), "-k", dir,
		"-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=300", "-c", "shared_buffers=32MB")
	prep(s.cmd)
	if err := deathsig.Start(s.cmd); err != nil {
		close(s.exited)
		return fail(fmt.Errorf("postgres: %w", err))
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	db, err := sql.Open("pgx", s.url("postgres"))
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	ready := waitfor.Until(startWait, func() bool {
		select {
		case <-s.exited:
			return true
		default:
		}
		if _, err := os.Stat(filepath.Join(dir, ".s.PGSQL.5432")); err != nil {
			return false
		}
		return db.Ping() == nil
	})
	select {
	case <-s.exited:
		return fail(errors.New("postgres exited while starting"))
	default:
	}
	if !ready {
		return fail(fmt.Errorf("postgres did not accept connections within %v", startWait))
	}
	s.Startup = time.Since(t1)
	return s, nil
}

// url is the URL of database name on s, over its unix socket.
func (s *Server) url(name string) string {
	u := url.URL{Scheme: "postgres", User: url.User("postgres"), Path: "/" + name,
		RawQuery: url.Values{"host": {s.dir}, "sslmode": {"disable"}}.Encode()}
	return u.String()
}

// NewDatabase creates a new, empty database on s and returns its URL.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("t%d", s.dbs.Add(1))
	db, err := sql.Open("pgx", s.url("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	return s.url(name)
}

// Stop stops the server (fast shutdown: sessions are ended), waits for it, and removes its
// directory. Idempotent.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		if s.cmd != nil && s.cmd.Process != nil {
			_ = s.cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-s.exited:
			case <-time.After(30 * time.Second):
				_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
				<-s.exited
			}
		}
		os.RemoveAll(s.dir)
	})
}
