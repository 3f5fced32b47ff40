# shellcheck shell=bash
# Sourced by the scripts that build an artefact into sandboxd's cache outside the repository
# (build-runsc.sh, build-python-wasm.sh): messages, the recipe key, the artefact's directory, one
# build at a time, and the rename that makes a build visible only once complete.
#
# The artefact of a recipe is CACHE_DIR/SUBDIR/NAME, NAME holding the recipe key (cache_key), and
# is used only with its .complete file, written last. A build goes into NAME.tmp.<pid>, renamed
# at the end: a killed build never leaves a half artefact (the next build removes its tmp).

# log, die: messages on stderr, named after the script (build-runsc: …).
log() { echo "$(basename "$0" .sh): $*" >&2; }
die() { log "$*"; exit 1; }

cache_scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# cache_key FILE...: the recipe key of FILEs (paths below scripts/): the first 12 hex digits of the
# SHA-256 of their `sha256sum` lines, each file's lines that start with "cache_adopt " left out
# (they name keys, and cannot name their own). A change to any other line is a new recipe.
cache_key() {
  local f
  (cd "$cache_scripts" && for f in "$@"; do
    [ -f "$f" ] || die "cache_key: no $cache_scripts/$f"
    printf '%s  %s\n' "$(grep -v '^cache_adopt ' "$f" | sha256sum | cut -d' ' -f1)" "$f"
  done) | sha256sum | cut -c1-12
}

# cache_open CACHE_DIR SUBDIR NAME [FILE]: sets base (CACHE_DIR/SUBDIR, made; CACHE_DIR empty:
# ${SANDBOXD_CACHE:-~/.cache/sandboxd}) and dir (base/NAME). A complete dir: prints dir[/FILE]
# and exits 0. Otherwise it takes the cache's lock (fd 9: a second caller waits for the first
# build, then finds its artefact), checks again, and removes what killed builds left; the caller
# builds, holding the lock until it exits.
cache_open() {
  local cache=${1:-${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}}
  mkdir -p "$cache/$2"
  base=$(cd "$cache/$2" && pwd)
  dir="$base/$3"
  cache_out=$dir${4:+/$4}
  if [ -f "$dir/.complete" ]; then echo "$cache_out"; exit 0; fi
  exec 9>"$base/.lock"
  flock -n 9 || { log "waiting for another build in $base"; flock 9; }
  if [ -f "$dir/.complete" ]; then echo "$cache_out"; exit 0; fi
  rm -rf "$base"/*.tmp.*   # left by killed builds (we hold the lock)
}

# cache_adopt FORMER NAME: when the artefact being built is base/NAME and base/FORMER is complete,
# NAME is FORMER's recipe under another key (a change of no line that decides what is built, such
# as the move of this boilerplate out of the script): dir becomes a copy of FORMER (hard links;
# FORMER stays for the checkouts still on its key), its BUILDINFO saying so; prints dir[/FILE]
# and exits 0. Otherwise nothing. After cache_open.
cache_adopt() {
  [ "$dir" = "$base/$2" ] && [ -f "$base/$1/.complete" ] || return 0
  local t="$dir.tmp.$$"
  rm -rf "$t"
  cp -al "$base/$1" "$t"
  { grep -v '^recipe_hash=' "$base/$1/BUILDINFO" || true; echo "recipe_hash=${2##*-}"; echo "adopted_from=$1"; } >"$t/BUILDINFO.new"
  mv "$t/BUILDINFO.new" "$t/BUILDINFO"   # a file of its own: FORMER's is not written
  rm -rf "$dir"; mv "$t" "$dir"
  log "$dir: the artefact of $1 (the same recipe)"
  echo "$cache_out"
  exit 0
}

# cache_tmp: makes tmp (dir.tmp.<pid>, empty), where the build writes its artefact; it is removed
# if the script exits before cache_commit.
cache_tmp() {
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
}

# cache_commit: marks tmp complete and renames it to dir.
cache_commit() {
  touch "$tmp/.complete"
  rm -rf "$dir"; mv "$tmp" "$dir"
  trap - EXIT
}
