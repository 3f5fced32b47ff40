#!/usr/bin/env bash
# Builds the Kubernetes control plane and node components that internal/k8stest runs as a
# single-node cluster for make test — kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy — and etcd, statically from their Go modules at pinned versions, and caches
# them outside the repository (neither their sources nor their binaries are in the repo).
#
# Usage: scripts/build-k8s.sh [CACHE_DIR]   (default: ${SANDBOXD_CACHE:-~/.cache/sandboxd})
# Prints the binaries' directory, CACHE_DIR/k8s/<version>-<recipe hash>, as its last line of
# stdout (progress on stderr), so that
#   SANDBOXD_K8S=$(scripts/build-k8s.sh)
# works. A no-op when cached: rebuilds only when this file (the recipe: the pins, the flags) or
# scripts/lib/cache.sh changes. Builds in a temporary directory renamed at the end, so a killed
# build never leaves a half cache; one build at a time per cache (a second caller waits for the
# first): scripts/lib/cache.sh.
#
# Inputs, all through the Go module proxy (sums checked by the checksum database; the two roots
# also against the pins below), and the Go toolchain on PATH (k8s.io/kubernetes says go 1.26.0):
#   k8s.io/kubernetes KUBE_VERSION   its cmd/ packages. The module is not meant to be required by
#                                    another: its go.mod replaces every staging module k8s.io/*
#                                    with a directory of its repository, which the proxy's zip
#                                    lacks. The scratch module below replaces each one with its
#                                    published release, STAGING_VERSION (the same sources, tagged
#                                    by the Kubernetes release), k8s.io/sample-* left out (the
#                                    proxy refuses them, and nothing built needs them).
#   go.etcd.io/etcd/server/v3 ETCD_VERSION   its main package is etcd itself; built in the same
#                                    module (Kubernetes already requires etcd's server module, so
#                                    they share one dependency graph and most compiled packages).
# One `go build` for all six, so that the packages they share compile once.
#
# Output: CACHE_DIR/k8s/<KUBE_VERSION>-<recipe hash>/
#   kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy etcd
#                   static binaries (-s -w)
#   go.mod go.sum   the scratch module the build used (every dependency's version and sum)
#   BUILDINFO       key=value: versions, go, sha256 of each binary, fetch and build seconds
#   .complete       written last; a directory without it is never used
# The containerd, runc and CNI plugins the cluster also needs are Debian's (scripts/install-deps.sh).
# Cost (this 2-core machine): ~19 min of compiling cold when the machine is otherwise idle (28 CPU
# minutes; 72 min of wall time when it was shared at load 15–24), ~400 MB of binaries, and the
# modules' sources in the Go module cache (k8s.io alone ~280 MB). kube-proxy (the pods' Services)
# adds ~80 MB of binary and little to the cold compile (most of its packages are the kubelet's);
# a rebuild after a recipe change, the Go build cache warm, takes ~70-90 s.
set -euo pipefail

KUBE_VERSION=v1.37.2
KUBE_SUM=h1:A2VDEiObzkYqFTKhSsn0ZEb0RlLEXpHWj93gi2HqEwE=
STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.7.3
ETCD_SUM=h1:KcTZ/aEZrOiQe0/kdr7iYYcvyfbEoOwDOacHkz8xwZc=
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy etcd)

# shellcheck source=lib/cache.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/cache.sh"
recipe_hash=$(cache_key build-k8s.sh lib/cache.sh)
cache_open "${1:-}" k8s "$KUBE_VERSION-$recipe_hash"

command -v go >/dev/null || die "go is not on PATH (scripts/install-deps.sh installs it)"
export CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false
t_fetch=$SECONDS
# download MODULE VERSION SUM: downloads MODULE@VERSION, checks its sum, prints its directory.
download() {
  local info
  info=$(cd / && GOFLAGS=-mod=mod go mod download -json "$1@$2") || die "cannot download $1@$2: $info"
  field() { sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}$/\1/p" <<<"$info"; }
  [ "$(field Sum)" = "$3" ] || die "$1@$2 has sum $(field Sum), pinned $3"
  field Dir
}
log "go mod download k8s.io/kubernetes@$KUBE_VERSION go.etcd.io/etcd/server/v3@$ETCD_VERSION"
kube=$(download k8s.io/kubernetes "$KUBE_VERSION" "$KUBE_SUM")
download go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_SUM" >/dev/null

cache_tmp
src=$(mktemp -d)
trap 'rm -rf "$tmp" "$src"' EXIT
# The staging modules: the targets of k8s.io/kubernetes's own replace directives "=> ./staging/…".
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$kube/go.mod" | grep -v '^k8s\.io/sample-')
[ ${#staging[@]} -gt 20 ] || die "found only ${#staging[@]} staging modules in $kube/go.mod"
{
  echo "module sandboxd.invalid/k8s-build"
  echo
  echo "go $(sed -n 's/^go //p' "$kube/go.mod")"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes $KUBE_VERSION"
  echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $STAGING_VERSION"; done
  echo ")"
} >"$src/go.mod"
pkgs=(k8s.io/kubernetes/cmd/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy} go.etcd.io/etcd/server/v3)
logf="$base/$KUBE_VERSION-$recipe_hash.log"
# go mod tidy needs a package importing what it should keep; main packages cannot be imported,
# so `go get` of the six packages resolves the graph and writes go.sum.
(cd "$src" && GOFLAGS=-mod=mod go get "${pkgs[@]}") >"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "go get failed; full log in $logf"; }

t_build=$SECONDS
log "go build ${BINS[*]} (about 19 min on 2 idle cores; log: $logf)"
# Version strings as Kubernetes's own build sets them (hack/lib/version.sh), for the node's
# reported kubelet version and the apiserver's /version.
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
if ! (cd "$src" && GOFLAGS='-buildvcs=false -mod=readonly' \
    go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${pkgs[@]}") >>"$logf" 2>&1; then
  tail -n 30 "$logf" >&2
  die "go build failed; full log in $logf"
fi
# go names the binary of .../server/v3 after "server" (a major-version suffix is not a name).
mv "$tmp/server" "$tmp/etcd"
cp "$src/go.mod" "$src/go.sum" "$tmp/"
for b in "${BINS[@]}"; do
  ! ldd "$tmp/$b" >/dev/null 2>&1 || die "$tmp/$b is not static"
done
"$tmp/kube-apiserver" --version >"$tmp/version" 2>&1 || die "the built kube-apiserver does not run: $(cat "$tmp/version")"
"$tmp/etcd" --version >>"$tmp/version" 2>&1 || die "the built etcd does not run: $(cat "$tmp/version")"
{
  echo "recipe_hash=$recipe_hash"
  echo "module=k8s.io/kubernetes@$KUBE_VERSION"
  echo "module_sum=$KUBE_SUM"
  echo "staging=$STAGING_VERSION"
  echo "etcd=go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  echo "etcd_sum=$ETCD_SUM"
  echo "go=$(go env GOVERSION)"
  for b in "${BINS[@]}"; do echo "${b}_sha256=$(sha256sum "$tmp/$b" | cut -d' ' -f1)"; done
  echo "fetch_seconds=$((t_build - t_fetch))"
  echo "build_seconds=$((SECONDS - t_build))"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$tmp/BUILDINFO"
rm -rf "$src"
cache_commit
rm -f "$logf"
log "built ${BINS[*]} in $dir in $((SECONDS - t_build)) s ($(du -sh "$dir" | cut -f1))"
echo "$dir"
