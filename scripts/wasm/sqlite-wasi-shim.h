/*
 * Force-included (clang -include) when scripts/build-python-wasm.sh compiles SQLite 3.40 for
 * wasm32-wasi against Debian's wasi-libc (0.0~git20220510). wasi-libc hides what WASI cannot do:
 * POSIX record locks and file ownership/permissions. SQLite's os_unix.c still names them, so:
 *   - the F_* lock constants are defined with musl's values so os_unix.c compiles; they are never
 *     passed to fcntl() because the default VFS is "unix-none" (SQLITE_DEFAULT_UNIX_VFS), which
 *     takes no locks (WASI has none; one sandbox runs one Python process, so none are needed);
 *   - fchmod/fchown/geteuid become no-ops (WASI has no owners or modes): SQLite uses them only to
 *     give journal files the database file's owner and mode.
 */
#ifndef SANDBOXD_SQLITE_WASI_SHIM_H
#define SANDBOXD_SQLITE_WASI_SHIM_H

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef F_RDLCK
#define F_RDLCK 0
#endif
#ifndef F_WRLCK
#define F_WRLCK 1
#endif
#ifndef F_UNLCK
#define F_UNLCK 2
#endif
#ifndef F_GETLK
#define F_GETLK 5
#endif
#ifndef F_SETLK
#define F_SETLK 6
#endif
#ifndef F_SETLKW
#define F_SETLKW 7
#endif

static int sandboxd_wasi_fchmod(int fd, mode_t mode) { (void)fd; (void)mode; return 0; }
static int sandboxd_wasi_fchown(int fd, uid_t uid, gid_t gid) { (void)fd; (void)uid; (void)gid; return 0; }
static uid_t sandboxd_wasi_geteuid(void) { return 0; }
#define fchmod sandboxd_wasi_fchmod
#define fchown sandboxd_wasi_fchown
#define geteuid sandboxd_wasi_geteuid

#endif
