#!/usr/bin/env bash
# Builds gVisor's runsc, the OCI runtime the container driver can run sandboxes with instead of
# crun (`--runtime runsc`, or `runtime: runsc` per image), statically from the gvisor.dev/gvisor Go
# module at a pinned pseudo-version, and caches it outside the repository (neither runsc's sources
# nor its binary are in the repo).
#
# Usage: scripts/build-runsc.sh [CACHE_DIR]   (default: ${SANDBOXD_CACHE:-~/.cache/sandboxd})
# Prints the binary's path, CACHE_DIR/runsc/<version>-<recipe hash>/runsc, as its last line of
# stdout (progress on stderr), so that
#   SANDBOXD_RUNSC=$(scripts/build-runsc.sh)
# works. A no-op when cached: rebuilds only when this file (the recipe: the pin, the flags) or
# scripts/lib/cache.sh changes. Builds in a temporary directory renamed at the end, so a killed
# build never leaves a half cache; one build at a time per cache (a second caller waits for the
# first): scripts/lib/cache.sh.
#
# Inputs: the module gvisor.dev/gvisor at GVISOR_VERSION through the Go module proxy (go mod
# download; its go.sum pins every dependency; the module's own hash is checked against
# GVISOR_SUM below, and by the checksum database), and the Go toolchain on PATH (the module says
# go 1.26.3 or newer). gVisor publishes no tagged Go module releases: the "go" branch of its
# repository is what `@latest` resolves to, a pseudo-version. Pin a newer one by replacing both
# lines (go mod download -json gvisor.dev/gvisor@latest prints Version and Sum).
#
# Why static (CGO_ENABLED=0): a dynamic runsc fails at run time here (FINDINGS.md); runsc
# re-executes itself for its sandbox and gofer processes, which must not depend on the host's libc.
# Cost (this 2-core machine): ~2.5 min of compiling when the machine is otherwise idle (both
# cores), ~100 MB of binary; the module and its dependencies ~60 MB in the Go module cache.
set -euo pipefail

GVISOR_VERSION=v0.0.0-20260905035102-160fafc42237
GVISOR_SUM=h1:AU5+CtCvnBnxdZRNcZt1NfSLqgkXZVT3N/u6u1aXg44=

# shellcheck source=lib/cache.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/cache.sh"
recipe_hash=$(cache_key build-runsc.sh lib/cache.sh)
cache_open "${1:-}" runsc "$GVISOR_VERSION-$recipe_hash" runsc
# The recipe as it was before its key covered lib/cache.sh (2026-12-06): the same lines build it.
cache_adopt v0.0.0-20260905035102-160fafc42237-f7ee4bad8578 v0.0.0-20260905035102-160fafc42237-95cb7aacfe1d

command -v go >/dev/null || die "go is not on PATH (scripts/install-deps.sh installs it)"
t_fetch=$SECONDS
log "go mod download gvisor.dev/gvisor@$GVISOR_VERSION"
info=$(cd / && GOFLAGS=-mod=mod go mod download -json "gvisor.dev/gvisor@$GVISOR_VERSION") ||
  die "cannot download gvisor.dev/gvisor@$GVISOR_VERSION: $info"
field() { sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}$/\1/p" <<<"$info"; }
src=$(field Dir)
sum=$(field Sum)
[ "$sum" = "$GVISOR_SUM" ] || die "gvisor.dev/gvisor@$GVISOR_VERSION has sum $sum, pinned $GVISOR_SUM"
[ -f "$src/runsc/main.go" ] || die "no runsc/main.go in $src"

t_build=$SECONDS
cache_tmp
logf="$base/$GVISOR_VERSION-$recipe_hash.log"
log "go build ./runsc (about 2.5 min on 2 idle cores; log: $logf)"
# In the module's own directory (read-only in the module cache: only GOCACHE is written), so that
# its go.mod and go.sum decide every dependency.
if ! (cd "$src" && CGO_ENABLED=0 GOFLAGS='-buildvcs=false -mod=readonly' \
    go build -trimpath -ldflags='-s -w' -o "$tmp/runsc" ./runsc) >"$logf" 2>&1; then
  tail -n 30 "$logf" >&2
  die "go build failed; full log in $logf"
fi
! ldd "$tmp/runsc" >/dev/null 2>&1 || die "$tmp/runsc is not static"
"$tmp/runsc" --version >"$tmp/version" 2>&1 || die "the built runsc does not run: $(cat "$tmp/version")"
{
  echo "recipe_hash=$recipe_hash"
  echo "module=gvisor.dev/gvisor@$GVISOR_VERSION"
  echo "module_sum=$GVISOR_SUM"
  echo "go=$(go env GOVERSION)"
  echo "runsc_sha256=$(sha256sum "$tmp/runsc" | cut -d' ' -f1)"
  echo "fetch_seconds=$((t_build - t_fetch))"
  echo "build_seconds=$((SECONDS - t_build))"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$tmp/BUILDINFO"
cache_commit
rm -f "$logf"
log "built $dir/runsc in $((SECONDS - t_build)) s ($(du -h "$dir/runsc" | cut -f1))"
echo "$dir/runsc"
