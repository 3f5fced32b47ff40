#!/usr/bin/env bash
# Builds what make test needs besides the binaries — the cgroup v2 test VM (a kernel package: the
# network), then the three container images (debootstrap: mostly the network and the disk) beside
# python.wasm (the compiler: the CPU, ~8.5 min cold) and the npm packages that check the OpenAPI
# document (npm ci: the network), gVisor's runsc (go build: the CPU, ~2.5 min alone) and the
# Kubernetes binaries of the tests' cluster (go build: the CPU, ~19 min alone, the longest) — each
# cached in ~/.cache/sandboxd, a no-op when cached. The Kubernetes build is the critical path: it
# starts first, beside all the others, and the two compilers share the 2 cores while python.wasm
# lasts. runsc starts after the images, whose debootstrap waits mostly on the network, so that
# it overlaps the compilers' tails rather than their start.
# One line each with its time; each one's output goes to bin/logs/<name>.log, whose last lines are
# shown when it fails. The dependencies are installed first, alone (apt takes a lock).
#
# Usage: scripts/caches.sh   (the Makefile's caches target)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bin/logs
start=$SECONDS

# phase NAME COMMAND...: runs COMMAND with its output in bin/logs/NAME.log and says how it went.
phase() {
  local name=$1 s=$SECONDS
  shift
  if "$@" >"bin/logs/$name.log" 2>&1; then
    echo "make test: $name ready in $((SECONDS - s)) s"
  else
    echo "make test: $name failed after $((SECONDS - s)) s; last lines of bin/logs/$name.log:"
    tail -n 25 "bin/logs/$name.log"
    return 1
  fi
}

phase deps scripts/install-deps.sh
# The VM's kernel first, alone (it may run apt-get update, as the python.wasm build does: apt's
# lists lock admits one); then debootstrap (no apt), one per image, beside the compiler.
phase vm scripts/build-vm.sh
phase k8s scripts/build-k8s.sh &
k8s=$!
phase image scripts/build-image.sh &
image=$!
phase image-slim scripts/build-image.sh slim &
slim=$!
phase image-postgres scripts/build-image.sh postgres &
postgres=$!
phase python.wasm scripts/build-python-wasm.sh &
wasm=$!
phase node-tools scripts/build-node-tools.sh &
nodetools=$!
# runsc after the images (see above): a subshell that waits for them, then builds.
( wait_for() { while kill -0 "$1" 2>/dev/null; do sleep 1; done; }
  wait_for $image; wait_for $slim; wait_for $postgres
  phase runsc scripts/build-runsc.sh ) &
runsc=$!
rc=0
for p in $k8s $image $slim $postgres $wasm $nodetools $runsc; do
  wait "$p" || rc=1
done
echo "make test: caches in $((SECONDS - start)) s"
exit $rc
