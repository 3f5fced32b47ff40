#!/usr/bin/env bash
# Installs what sandboxd's container driver and the image build need, from Debian packages:
# crun and runc (the OCI runtimes the driver drives; crun preferred) and debootstrap (builds the
# default image, scripts/build-image.sh), iproute2 (the e2e tests build a fake internet with ip) and
# python3 with pip, setuptools and wheel (the Python SDK's tests, and its offline pip install),
# nsenter from util-linux (starts each container sandbox's zygote; part of every Debian base),
# mkfs.ext4 from e2fsprogs (formats the template of every sandbox's disk; part of Debian's base),
# and for the cgroup v2 test VM (scripts/build-vm.sh, test/vm): qemu-system-x86_64, static busybox
# (the VM's initramfs), kmod (depmod and modprobe for the VM kernel's modules) and nft from
# nftables (the VM test lists the guest's tables before and after the end-to-end suite), and
# node and npm from nodejs and npm (api/openapi_test.go lints the OpenAPI document and type-checks
# a TypeScript client generated from it with npm packages, scripts/build-node-tools.sh; those need
# Node.js >= 20.19, which this project's machines come with: Debian 12's own nodejs is 18, and
# build-node-tools.sh says so), postgresql (Debian 12's PostgreSQL 15: the postgres store's
# tests start throwaway servers with its initdb and postgres, internal/store/postgres/pgtest),
# and for the single-node Kubernetes cluster of the tests (internal/k8stest, over binaries from
# scripts/build-k8s.sh): containerd (with ctr and the runc shim) and the CNI plugins bridge,
# host-local and loopback from containernetworking-plugins.
# Idempotent: apt-get runs only when something is missing
# (after an `apt-get update`), non-interactively. Needs root (or sudo) only in that case.
#
# Usage: scripts/install-deps.sh
set -euo pipefail

# command → Debian package providing it
declare -A pkgs=(
  [crun]=crun
  [runc]=runc
  [debootstrap]=debootstrap
  [ip]=iproute2
  [python3]=python3
  [nsenter]=util-linux
  [mkfs.ext4]=e2fsprogs
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [depmod]=kmod
  [nft]=nftables
  [node]=nodejs
  [npm]=npm
  [postgres]=postgresql
  [containerd]=containerd
  [ctr]=containerd
  [containerd-shim-runc-v2]=containerd
)
# files (not commands on PATH) → Debian package providing them
declare -A files=(
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [/usr/lib/cni/host-local]=containernetworking-plugins
  [/usr/lib/cni/loopback]=containernetworking-plugins
)

# debootstrap lives in /usr/sbin, which a non-root PATH may lack.
# PostgreSQL's server binaries live in /usr/lib/postgresql/<version>/bin, out of PATH.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] || compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null; }
# Python modules → Debian package (checked with Debian's own python3).
declare -A pymods=(
  [pip]=python3-pip
  [setuptools]=python3-setuptools
  [wheel]=python3-wheel
)

missing=()
for cmd in "${!pkgs[@]}"; do
  have "$cmd" || missing+=("${pkgs[$cmd]}")
done

for f in "${!files[@]}"; do
  [ -e "$f" ] || missing+=("${files[$f]}")
done

for mod in "${!pymods[@]}"; do
  [ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import $mod" 2>/dev/null || missing+=("${pymods[$mod]}")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all present (crun, runc, debootstrap, ip, nsenter, mkfs.ext4, qemu, busybox, depmod, nft, node, npm, postgres, containerd, ctr, CNI plugins, python3 with pip, setuptools, wheel)" >&2
  exit 0
fi

# Sorted and deduplicated.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
sudo=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
for cmd in "${!pkgs[@]}"; do
  have "$cmd" || { echo "install-deps: $cmd still missing after install" >&2; exit 1; }
done
for f in "${!files[@]}"; do
  [ -e "$f" ] || { echo "install-deps: $f still missing after install" >&2; exit 1; }
done
echo "install-deps: done" >&2
