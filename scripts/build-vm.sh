#!/usr/bin/env bash
# Builds the cgroup v2 test VM that test/vm boots under qemu (software emulation): Debian 12's own
# kernel (the newest linux-image-6.1.0-N-amd64 apt offers), all its modules (depmod'ed, so modprobe
# and the kernel's autoload work in the guest) and an initramfs of static busybox with the modules
# that mount the root. The guest's root is the host's own / shared read-only over virtio-9p under a
# tmpfs overlay (scripts/vm/init), so its userspace is this host's Debian at the same paths.
#
# Usage: scripts/build-vm.sh [CACHE_DIR]   (default: ~/.cache/sandboxd)
# Prints the VM directory, CACHE_DIR/vm/<kernel version>-<recipe hash>, as its last line (progress
# on stderr); it holds vmlinuz, initrd.gz, lib/modules/<version> (shown at that path in the guest)
# and kernel-version. Idempotent: rebuilds only when the recipe (this file and scripts/vm/*) or
# the kernel apt offers changes; builds in a temporary directory renamed at the end, so a crashed
# build never leaves a half cache. Installs qemu, busybox-static and kmod through install-deps.sh.
# Cost cold (this 2-core machine, 2026-12-06): 7 s quiet, 17 s loaded (the 70 MB kernel .deb in
# 2-4 s, extract + depmod, a 1.5 MB initramfs), plus about 20 s once for apt to install qemu,
# busybox-static, kmod and nftables; 405 MB of cache. Warm: 1-3 s (install-deps, an apt query).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}}

"$here/install-deps.sh" >&2

# The newest Debian 12 kernel flavour amd64 (not -cloud, -rt or -dbg).
newest() { apt-cache pkgnames linux-image-6.1.0- | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -1; }
pkg=$(newest)
if [ -z "$pkg" ]; then
  echo "build-vm: apt knows no linux-image-6.1.0-*-amd64: apt-get update" >&2
  env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  pkg=$(newest)
fi
[ -n "$pkg" ] || { echo "build-vm: no linux-image-6.1.0-*-amd64 in apt" >&2; exit 1; }
kver=${pkg#linux-image-}

recipe_hash=$(cat "$0" "$here"/vm/* | sha256sum | cut -c1-12)
dir="$cache/vm/$kver-$recipe_hash"
if [ -f "$dir/.complete" ]; then echo "$dir"; exit 0; fi

tmp="$dir.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
echo "build-vm: $pkg into $tmp" >&2
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x"
mkdir -p "$tmp/lib/modules"
mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
mv "$tmp/x/lib/modules/$kver" "$tmp/lib/modules/$kver"
rm -rf "$tmp/x" "$tmp"/*.deb
depmod -b "$tmp" "$kver"

# The initramfs: busybox, the root's modules in load order, the init scripts.
i="$tmp/initrd"
mkdir -p "$i/bin" "$i/etc" "$i/vm" "$i/lib/modules/$kver"
cp /bin/busybox "$i/bin/busybox"
# (ldd fails on a static binary)
! ldd /bin/busybox >/dev/null 2>&1 \
  || { echo "build-vm: /bin/busybox is not static (install busybox-static)" >&2; exit 1; }
for m in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe -d "$tmp" -S "$kver" --show-depends "$m" 2>/dev/null || true
done | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' >"$tmp/order"
[ -s "$tmp/order" ] || { echo "build-vm: cannot resolve the root's modules" >&2; exit 1; }
while read -r ko; do
  rel=${ko#*/lib/modules/$kver/}
  mkdir -p "$i/lib/modules/$kver/$(dirname "$rel")"
  cp "$ko" "$i/lib/modules/$kver/$rel"
  echo "$rel"
done <"$tmp/order" >"$i/etc/vm-initrd-modules"
rm "$tmp/order"
echo "$dir/lib/modules/$kver" >"$i/etc/vm-modules"
cp "$here/vm/init" "$i/init"
cp "$here"/vm/{init2,run-job,vm.target,vm-job.service,modules.conf} "$i/vm/"
(cd "$i" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp/initrd.gz"
rm -rf "$i"
echo "$kver" >"$tmp/kernel-version"
touch "$tmp/.complete"
rm -rf "$dir"; mv "$tmp" "$dir"
trap - EXIT
echo "build-vm: done in $(( $(date +%s) - start )) s" >&2
echo "$dir"
