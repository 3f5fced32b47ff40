#!/usr/bin/env bash
# Builds CPython 3.11 for wasm32-wasi (python.wasm and its standard library) for sandboxd's WASM
# driver, from Debian bookworm's source packages with Debian's own WASI toolchain, and caches it
# outside the repository.
#
# Usage: scripts/build-python-wasm.sh [CACHE_DIR]   (default: ${SANDBOXD_CACHE:-~/.cache/sandboxd})
# Prints the output directory as its last line of stdout; everything else goes to stderr, so
#   dir=$(scripts/build-python-wasm.sh)
# works. Rebuilds only when the recipe changes: this file, scripts/wasm/sqlite-wasi-shim.h and
# scripts/lib/cache.sh (the cache's boilerplate, shared with build-runsc.sh), whose hash names the
# output directory (lines starting "cache_adopt " aside: see there). A build takes about 4 min on
# 2 cores (make -j2).
# Needs root (or sudo) only to install missing packages or to add deb-src entries.
#
# Inputs, all from Debian bookworm on deb.debian.org (versions pinned below, .dsc sha256 checked):
#   source packages (apt-get source; downloaded once into CACHE_DIR/python-wasm/sources/):
#     python3.11 3.11.2-6+deb12u8  CPython 3.11.2 with Debian's patches (its security fixes)
#     zlib       1:1.2.13.dfsg-1   compiled to wasm32 as libz.a (the zlib module)
#     sqlite3    3.40.1-2+deb12u2  amalgamation made with tclsh, compiled to wasm32 as libsqlite3.a
#                                  (the _sqlite3 module) with scripts/wasm/sqlite-wasi-shim.h
#   toolchain (apt-get install, only what is missing): clang-14, lld-14 (wasm-ld-14), llvm-14
#     (llvm-ar/ranlib/strip-14), wasi-libc, libclang-rt-14-dev-wasm32 (compiler-rt builtins);
#     for the native "build python" and the tools: build-essential, pkg-config, dpkg-dev
#     (dpkg-source, dpkg-parsechangelog), tcl (tclsh), xz-utils, bzip2.
#   Pin only versions whose files are really served: in Nov 2026 bookworm-security's Sources index
#   listed python3.11 3.11.2-6+deb12u9, but its files answered 404; u8 (bookworm) is served.
#
# Output: CACHE_DIR/python-wasm/python-3.11-wasi-<recipe hash>/
#   python.wasm         the interpreter, a WASI preview1 command module, without debug info
#                       (llvm-strip-14 --strip-debug; function names kept for trap traces).
#                       Linear memory: the C stack first (8 MiB at addresses 0..8 MiB, growing
#                       down, so an overflow traps instead of overwriting data), then the static
#                       data, then the heap; 14 MiB initial; __stack_pointer exported; default
#                       recursion limit 1000 (see WASM_STACK_SIZE below)
#   lib/python3.11/     the standard library, unzipped: .py plus __pycache__/*.cpython-311.pyc
#                       (unchecked-hash pycs: valid without source mtimes, on a read-only mount),
#                       _sysconfigdata__wasi_wasm32-wasi.py and a copy under Debian's name
#                       _sysconfigdata__wasm32-wasi.py; without test suites, idlelib, tkinter,
#                       turtledemo, ensurepip, venv, ctypes, curses, msilib, pydoc_data
#   BUILDINFO           key=value: source and toolchain versions, recipe hash, stack size,
#                       initial memory, recursion limit, build seconds
#   .complete           written last; a directory without it is never used
# A failed build leaves its step logs in CACHE_DIR/python-wasm/python-3.11-wasi-<hash>.logs/.
# The guest sees <dir>/lib read-only at /usr/local/lib and runs with PYTHONHOME=/usr/local:
# Python then takes prefix /usr/local and finds its library at /usr/local/lib/python3.11.
# Built in: json, sqlite3, zlib, csv, datetime, decimal, math, pyexpat, hashlib (no OpenSSL),
# unicodedata. Not available in WASI: threads, subprocess, sockets (only stubs), ssl, ctypes,
# mmap, bz2, lzma.
set -euo pipefail

PY_VER=3.11.2-6+deb12u8
PY_DSC_SHA256=197fa19ab45f41c820f40f6d9ead671c2ea29ddc53ba9424b36f1bf58458a10e
ZLIB_VER=1:1.2.13.dfsg-1
ZLIB_DSC_SHA256=3fa1e6b2fc525062aa88207dda52fed8e045373c809d362fe8a2bfbf7cf515a8
SQLITE_VER=3.40.1-2+deb12u2
SQLITE_DSC_SHA256=ee3459ae9d00939741c7708fc1b8ce1bde12d8c3fb1dfa005bbbc8651d884e23
# Debian packages the build uses; their installed versions are recorded in BUILDINFO.
TOOL_PKGS=(clang-14 lld-14 llvm-14 wasi-libc libclang-rt-14-dev-wasm32)
HOST_PKGS=(build-essential pkg-config dpkg-dev tcl xz-utils bzip2)
# SQLite as Debian builds it (pragma compile_options of bookworm's libsqlite3), changed for WASI:
# no threads, no WAL (it needs shared memory), no mmap, the lock-free "unix-none" VFS (WASI has no
# file locks), no extension loading (no dlopen), temp files in memory (a sandbox may have no
# writable /tmp). The shared-cache API stays: Python's _sqlite3 needs it.
SQLITE_CFLAGS=(
  -DSQLITE_THREADSAFE=0 -DSQLITE_OMIT_WAL -DSQLITE_MAX_MMAP_SIZE=0
  '-DSQLITE_DEFAULT_UNIX_VFS="unix-none"' -DSQLITE_OMIT_LOAD_EXTENSION -DSQLITE_TEMP_STORE=2
  -D_WASI_EMULATED_GETPID
  -DSQLITE_SECURE_DELETE -DSQLITE_ENABLE_COLUMN_METADATA -DSQLITE_ENABLE_FTS3
  -DSQLITE_ENABLE_FTS3_PARENTHESIS -DSQLITE_ENABLE_FTS3_TOKENIZER=1 -DSQLITE_ENABLE_FTS4
  -DSQLITE_ENABLE_FTS5 -DSQLITE_ENABLE_RTREE=1 -DSQLITE_SOUNDEX=1 -DSQLITE_ENABLE_UNLOCK_NOTIFY
  -DSQLITE_OMIT_LOOKASIDE=1 -DSQLITE_ENABLE_DBSTAT_VTAB -DSQLITE_ALLOW_ROWID_IN_VIEW
  -DSQLITE_ENABLE_UPDATE_DELETE_LIMIT=1 -DSQLITE_ENABLE_JSON1 -DSQLITE_LIKE_DOESNT_MATCH_BLOBS
  -DSQLITE_USE_URI=1 -DSQLITE_MAX_SCHEMA_RETRY=25 -DSQLITE_ENABLE_PREUPDATE_HOOK
  -DSQLITE_ENABLE_SESSION -DSQLITE_ENABLE_STMTVTAB -DSQLITE_MAX_VARIABLE_NUMBER=250000
  -DSQLITE_ENABLE_MATH_FUNCTIONS -DSQLITE_MAX_DEFAULT_PAGE_SIZE=32768
)
# The interpreter's C stack (the "shadow stack" clang keeps in linear memory for address-taken
# locals; everything else lives on the runtime's own stack). CPython 3.11.2's configure links
# WASI with `-z stack-size=524288 -Wl,--stack-first -Wl,--initial-memory=10485760` and, for that
# 512 KiB stack, lowers the default recursion limit to 600 (pycore_ceval.h). Stack-first already
# puts the stack at linear address 0, growing down, below the static data: an overflow goes below
# address 0 and traps (out of bounds memory access); it cannot run into the data or the heap.
# What the 512 KiB stack did not give is depth: Python recursion through a C call (map, sorted's
# key, __repr__, __eq__, ...) overflowed it at about 930 levels. 8 MiB (a native process's
# default `ulimit -s`) with the default recursion limit of native CPython, 1000; the stack pages
# are touched only as deep as a run recurses. The initial memory is the stack, the static data
# (3.4 MiB) and room for start-up's heap; it must stay within the smallest memory a sandbox may
# have (16 MiB). __stack_pointer is exported so that the WASM driver can tell a trap caused by a
# stack overflow from other traps (RATIONALE.md, 2026-12-05).
WASM_STACK_SIZE=8388608
WASM_INITIAL_MEMORY=14680064
PY_RECURSION_LIMIT=1000
# Parts of the standard library left out: test suites, GUI, packaging, and what needs a C module
# WASI cannot have (_ctypes, _curses, Windows' _msi); pydoc_data is 0.7 MB of help() topics.
# Every test/ and tests/ directory goes too (unittest/test, lib2to3/tests, distutils/tests).
STDLIB_OMIT=(test idlelib tkinter turtledemo turtle.py ensurepip venv ctypes curses msilib pydoc_data)

# shellcheck source=lib/cache.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/cache.sh"
here=$cache_scripts
recipe_hash=$(cache_key build-python-wasm.sh wasm/sqlite-wasi-shim.h lib/cache.sh)
# One build at a time per cache; a second caller waits, then finds the finished directory.
cache_open "${1:-}" python-wasm "python-3.11-wasi-$recipe_hash"
# The recipe as it was before its key covered lib/cache.sh (2026-12-06): the same lines build it.
cache_adopt python-3.11-wasi-e1338e3297f8 python-3.11-wasi-08af5bada37d

# shellcheck source=/dev/null
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] ||
  die "the pinned packages are Debian 12 (bookworm)'s; this is ${PRETTY_NAME:-unknown}"
sudo=
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
as_root() {
  [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to run: $*"
  $sudo env DEBIAN_FRONTEND=noninteractive "$@"
}

# --- packages: install only what is missing -------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
missing=()
for p in "${HOST_PKGS[@]}" "${TOOL_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -q >&2
  as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  for p in "${missing[@]}"; do installed "$p" || die "$p still missing after apt-get install"; done
fi
rt_builtins=(/usr/lib/llvm-14/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a)
if [ ! -f /usr/lib/wasm32-wasi/libc.a ] || [ ! -f "${rt_builtins[0]}" ]; then
  die "wasi-libc or compiler-rt for wasm32 incomplete"
fi

# --- source packages: pinned, fetched once ---------------------------------------------------
srcdir="$base/sources"
have_deb_src() {
  grep -qsE '^[[:space:]]*(Types:.*[[:space:]]deb-src([[:space:]]|$)|Types:[[:space:]]*deb-src|deb-src[[:space:]])' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
}
apt_updated=
# ensure_src_index PACKAGE VERSION: makes apt know the source package, adding deb-src entries
# (only if there are none) and running apt-get update (once) when it does not.
ensure_src_index() {
  # (grep without -q reads all: an early exit would SIGPIPE apt-cache and fail the pipeline.)
  apt-cache showsrc "$1" 2>/dev/null | grep -x "Version: $2" >/dev/null && return 0
  [ -z "$apt_updated" ] || return 0  # apt-get source will say what is wrong
  if ! have_deb_src; then
    log "no deb-src entry in /etc/apt: adding /etc/apt/sources.list.d/sandboxd-src.sources"
    as_root tee /etc/apt/sources.list.d/sandboxd-src.sources >/dev/null <<EOF
# Added by sandboxd's scripts/build-python-wasm.sh: Debian source packages (apt-get source).
Types: deb-src
URIs: ${DEBIAN_MIRROR:-http://deb.debian.org/debian}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  log "apt-get update (source indexes)"
  as_root apt-get update -q >&2
  apt_updated=1
}
# fetch PACKAGE VERSION DSC_SHA256: leaves the package's files in $srcdir/PACKAGE_VERSION/.
fetch() {
  local pkg=$1 ver=$2 sum=$3
  local d="$srcdir/${pkg}_${ver#*:}" dsc="${pkg}_${ver#*:}.dsc"
  if [ -f "$d/$dsc" ] && echo "$sum  $d/$dsc" | sha256sum -c --status; then return 0; fi
  ensure_src_index "$pkg" "$ver"
  log "apt-get source $pkg=$ver"
  rm -rf "$d.part"; mkdir -p "$d.part"
  local sandbox=()
  [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)  # _apt cannot write root's dirs
  if ! (cd "$d.part" && apt-get source -q --download-only "${sandbox[@]}" "$pkg=$ver") >&2; then
    rm -rf "$d.part"
    die "cannot fetch $pkg=$ver: the archive does not serve it (any more). apt's source index lists:" \
      "$(apt-cache showsrc "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | sort -u | paste -sd' ')" \
      "(a listed version can still answer 404). Fix: pin one that downloads in" \
      "$here/build-python-wasm.sh (its *_VER and *_DSC_SHA256 lines; the recipe hash changes, so the next" \
      "run rebuilds), check the traps noted there still hold; or put the old files from" \
      "snapshot.debian.org into $d/."
  fi
  echo "$sum  $d.part/$dsc" | sha256sum -c --status ||
    die "$dsc does not match its pinned sha256 $sum (the archive republished it?): review, then update the pin"
  rm -rf "$d"; mv "$d.part" "$d"
}
t_fetch=$SECONDS
fetch python3.11 "$PY_VER" "$PY_DSC_SHA256"
fetch zlib "$ZLIB_VER" "$ZLIB_DSC_SHA256"
fetch sqlite3 "$SQLITE_VER" "$SQLITE_DSC_SHA256"
log "sources ready in $((SECONDS - t_fetch))s"

# --- build -----------------------------------------------------------------------------------
t_build=$SECONDS
cache_tmp
w="$tmp/build"          # sources and build trees, removed before the rename
logs="$base/python-3.11-wasi-$recipe_hash.logs"
rm -rf "$logs"; mkdir -p "$w" "$logs"

# step NAME FUNCTION: runs FUNCTION with its output in $logs/NAME.log. It runs as a background
# job and is waited for, so that `set -e` holds inside it (it would not inside `if`/`||`).
step() {
  local name=$1 t=$SECONDS; shift
  log "$name"
  ( "$@" ) >"$logs/$name.log" 2>&1 &
  if ! wait $!; then
    tail -n 30 "$logs/$name.log" >&2
    die "$name failed; full logs in $logs/"
  fi
  log "$name: done in $((SECONDS - t))s"
}

# Reproducibility: no build paths, dates or hash seeds in the output.
export PYTHONHASHSEED=0 LC_ALL=C TZ=UTC
prefix_map="-ffile-prefix-map=$w=/build"

unpack() {
  dpkg-source -x "$srcdir/python3.11_${PY_VER#*:}/python3.11_${PY_VER#*:}.dsc" "$w/python"
  dpkg-source -x "$srcdir/zlib_${ZLIB_VER#*:}/zlib_${ZLIB_VER#*:}.dsc" "$w/zlib"
  dpkg-source -x "$srcdir/sqlite3_${SQLITE_VER#*:}/sqlite3_${SQLITE_VER#*:}.dsc" "$w/sqlite"
  # Keep a pristine copy of the library: building writes __pycache__ into the source Lib/.
  cp -a "$w/python/Lib" "$w/Lib.pristine"
}
step unpack unpack

# clang-14 --target=wasm32-wasi with Debian's default sysroot (/) also searches /usr/include and
# /usr/local/include, so host headers leak into configure's tests and pyconfig.h. A sysroot made
# only of symlinks to wasi-libc's multiarch dirs sees nothing else.
sysroot="$w/sysroot"
mkdir -p "$sysroot/include" "$sysroot/lib"
ln -s /usr/include/wasm32-wasi "$sysroot/include/wasm32-wasi"
ln -s /usr/lib/wasm32-wasi "$sysroot/lib/wasm32-wasi"
wcc="clang-14 --target=wasm32-wasi --sysroot=$sysroot"
deps="$w/deps"          # wasm32 zlib and sqlite3: include/, lib/, lib/pkgconfig/
mkdir -p "$deps/include" "$deps/lib/pkgconfig"

build_zlib() {
  cd "$w/zlib"
  CC="$wcc" AR=llvm-ar-14 RANLIB=llvm-ranlib-14 CFLAGS="-O2 $prefix_map" ./configure --static --prefix="$deps"
  make -j2 libz.a
  make install
}
step zlib build_zlib

build_sqlite() {
  # The amalgamation (sqlite3.c) is generated by native tools (lemon, mkkeywordhash, tclsh).
  mkdir -p "$w/sqlite-native" && cd "$w/sqlite-native"
  "$w/sqlite/configure" --disable-tcl --disable-readline
  make -j2 sqlite3.c
  $wcc -O2 "$prefix_map" -include "$here/wasm/sqlite-wasi-shim.h" "${SQLITE_CFLAGS[@]}" -c sqlite3.c -o sqlite3.o
  llvm-ar-14 rcs "$deps/lib/libsqlite3.a" sqlite3.o
  cp sqlite3.h sqlite3ext.h "$deps/include/"
  cat >"$deps/lib/pkgconfig/sqlite3.pc" <<EOF
prefix=$deps
libdir=\${prefix}/lib
includedir=\${prefix}/include
Name: SQLite
Description: SQL database engine (wasm32-wasi)
Version: $(cat "$w/sqlite/VERSION")
Libs: -L\${libdir} -lsqlite3
Libs.private: -lwasi-emulated-getpid
Cflags: -I\${includedir}
EOF
}
step sqlite3 build_sqlite

# The date of the Debian upload stands for the build date: in sys.version (Debian's
# reproducible-buildinfo patch reads BUILD_DATE/BUILD_TIME) and as the files' mtimes.
SOURCE_DATE_EPOCH=$(date -u +%s -d "$(dpkg-parsechangelog -l "$w/python/debian/changelog" -S Date)")
BUILD_DATE=$(date -u +'%b %e %Y' -d "@$SOURCE_DATE_EPOCH")
BUILD_TIME=$(date -u +'%H:%M:%S' -d "@$SOURCE_DATE_EPOCH")
export SOURCE_DATE_EPOCH BUILD_DATE BUILD_TIME

build_native() {
  # The "build python" runs the cross build's code generators (freeze, deepfreeze, sysconfig)
  # and compiles the bytecode, so it must be this very source. It needs its simple shared
  # extension modules too (compileall imports _struct; -j needs _multiprocessing,
  # _posixsubprocess), but none that wrap a host library (whatever -dev packages this host has)
  # or that are big and unused here: those are marked n/a for configure.
  local na=() m
  for m in _ssl _hashlib _sqlite3 zlib _bz2 _lzma _uuid _dbm _gdbm nis _tkinter _crypt _decimal \
           _codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr _codecs_tw _multibytecodec \
           pyexpat _elementtree _xxsubinterpreters ossaudiodev spwd; do
    na+=("py_cv_module_$m=n/a")
  done
  mkdir -p "$w/native" && cd "$w/native"
  env "${na[@]}" ../python/configure -q --prefix=/nonexistent --without-ensurepip --disable-test-modules
  make -j2
}
step native-python build_native

build_wasi() {
  # configure by a relative path: its srcdir ends up in python.wasm (getpath's VPATH).
  mkdir -p "$w/wasi" && cd "$w/wasi"
  # config.site-wasm32-wasi: what configure cannot detect for WASI. clock_nanosleep is hidden
  # because Python would sleep with TIMER_ABSTIME, which wazero rejects (plain nanosleep is
  # relative). pkg-config sees only the wasm32 deps, never the host's .pc files.
  CONFIG_SITE="$w/python/Tools/wasm/config.site-wasm32-wasi" \
  CC="$wcc" CPP="$wcc -E" AR=llvm-ar-14 RANLIB=llvm-ranlib-14 \
  CFLAGS="$prefix_map -DPy_DEFAULT_RECURSION_LIMIT=$PY_RECURSION_LIMIT" \
  PKG_CONFIG_PATH='' PKG_CONFIG_LIBDIR="$deps/lib/pkgconfig" \
  ac_cv_func_clock_nanosleep=no ac_cv_lib_rt_clock_nanosleep=no \
    ../python/configure --host=wasm32-unknown-wasi --build="$(../python/config.guess)" \
      --with-build-python="$w/native/python" --prefix=/usr/local \
      --disable-test-modules --without-ensurepip
  for m in zlib _sqlite3 _json _decimal _datetime _csv math; do
    grep -q "^MODULE_${m^^}_STATE=yes" Makefile || { echo "module $m not enabled" >&2; exit 1; }
  done
  # The stack's size and the initial memory: configure's are replaced where it put them.
  local cf='-z stack-size=524288 -Wl,--stack-first -Wl,--initial-memory=10485760'
  grep -q -- "^CONFIGURE_LDFLAGS_NODIST=.*$cf" Makefile || { echo "configure's WASI link flags not found" >&2; exit 1; }
  sed -i "s/$cf/-z stack-size=$WASM_STACK_SIZE -Wl,--stack-first -Wl,--initial-memory=$WASM_INITIAL_MEMORY -Wl,--export=__stack_pointer/" Makefile
  make -j2
  # The layout: the stack first (the static data begins where it ends), the initial memory.
  llvm-readobj-14 --sections python.wasm >layout.txt
  [ "$(grep -m1 -A3 'Segments \[' layout.txt | sed -n 's/^ *Offset: //p')" = "$WASM_STACK_SIZE" ] ||
    { echo "python.wasm: the static data does not begin at $WASM_STACK_SIZE (stack not first?)" >&2; exit 1; }
  [ "$(sed -n 's/^ *MinPages: //p' layout.txt)" = "$((WASM_INITIAL_MEMORY / 65536))" ] ||
    { echo "python.wasm: initial memory is not $WASM_INITIAL_MEMORY" >&2; exit 1; }
}
step wasi-python build_wasi

assemble() {
  local out="$tmp" lib="$tmp/lib/python3.11" sysdata
  # Debug info goes (-13 MB); the 0.2 MB "name" section stays, so that a trap's stack trace
  # from wazero names the C functions.
  llvm-strip-14 --strip-debug -o "$out/python.wasm" "$w/wasi/python.wasm"
  mkdir -p "$tmp/lib"
  cp -a "$w/Lib.pristine" "$lib"
  for p in "${STDLIB_OMIT[@]}"; do rm -rf "${lib:?}/$p"; done
  find "$lib" -depth -type d \( -name test -o -name tests -o -name __pycache__ \) -exec rm -rf {} +
  sysdata="$w/wasi/$(cat "$w/wasi/pybuilddir.txt")/_sysconfigdata__wasi_wasm32-wasi.py"
  sed "s|$w|/build|g" "$sysdata" >"$lib/_sysconfigdata__wasi_wasm32-wasi.py"
  # Debian's sysconfig.py looks the data up without MACHDEP (its sysconfigdata-name patch).
  cp "$lib/_sysconfigdata__wasi_wasm32-wasi.py" "$lib/_sysconfigdata__wasm32-wasi.py"
  # Bytecode for a read-only library: unchecked-hash pycs need no source mtimes to be trusted;
  # the recorded file names are the guest's (/usr/local/lib/...).
  # (Not -E: PYTHONHASHSEED=0 must hold, or frozenset constants come out in random order.)
  env -u PYTHONPATH -u PYTHONHOME -u PYTHONSTARTUP "$w/native/python" -m compileall -q -j 2 \
    --invalidation-mode unchecked-hash -s "$tmp/lib" -p /usr/local/lib "$lib"
  # Deterministic timestamps for the tree (the content is what matters).
  find "$tmp/lib" "$out/python.wasm" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}
step assemble assemble

py_version=$(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)"/\1/p' "$w/python/Include/patchlevel.h")
rm -rf "$w"
{
  echo "recipe_hash=$recipe_hash"
  echo "python_version=$py_version"
  echo "source.python3.11=$PY_VER"
  echo "source.zlib=$ZLIB_VER"
  echo "source.sqlite3=$SQLITE_VER"
  for p in "${TOOL_PKGS[@]}"; do echo "tool.$p=$(dpkg-query -W -f='${Version}' "$p")"; done
  echo "stack_size=$WASM_STACK_SIZE"
  echo "initial_memory=$WASM_INITIAL_MEMORY"
  echo "recursion_limit=$PY_RECURSION_LIMIT"
  echo "python_wasm_sha256=$(sha256sum "$tmp/python.wasm" | cut -d' ' -f1)"
  echo "fetch_seconds=$((t_build - t_fetch))"
  echo "build_seconds=$((SECONDS - t_build))"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$tmp/BUILDINFO"
cache_commit
rm -rf "$logs"
log "built $dir in $((SECONDS - t_build))s (python.wasm $(du -h "$dir/python.wasm" | cut -f1), lib $(du -sh "$dir/lib" | cut -f1))"
echo "$dir"
