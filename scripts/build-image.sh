#!/usr/bin/env bash
# Builds the default approved image, agentcop/agent-sandbox:latest, as a plain root filesystem
# (debootstrap minbase + python3 from Debian bookworm) and caches it outside the repository.
#
# Usage: scripts/build-image.sh [CACHE_DIR]   (default: ~/.cache/sandboxd)
# Prints the rootfs path as its last line. Rebuilds only when the recipe (this file) changes.
set -euo pipefail
cache=${1:-${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}}
recipe_hash=$(sha256sum "$0" | cut -c1-12)
dir="$cache/images/agent-sandbox-$recipe_hash"
if [ -f "$dir/.complete" ]; then echo "$dir/rootfs"; exit 0; fi

command -v debootstrap >/dev/null || { echo "build-image: debootstrap missing: run scripts/install-deps.sh" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tmp="$dir.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build-image: debootstrap bookworm into $tmp (a few minutes, once)" >&2
debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$tmp/rootfs" "$mirror" >"$tmp.log" 2>&1 \
  || { tail -20 "$tmp.log" >&2; exit 1; }
rm -f "$tmp.log"
r="$tmp/rootfs"
# Slim and make it fit for a read-only root: no apt caches, no docs, no sitecustomize indirection.
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* "$r"/usr/share/man/* \
       "$r"/usr/share/locale/* "$r"/var/log/*
# Mount points the sandbox runtime uses.
mkdir -p "$r/workspace" "$r/.sandbox"
# Precompile the standard library so a read-only root never tries to write .pyc files.
chroot "$r" /usr/bin/python3 -m compileall -q /usr/lib/python3.11 >/dev/null 2>&1 || true
# A content digest, reported by GET /api/images.
echo "sha256:$(cd "$r" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)" >"$tmp/digest"
touch "$tmp/.complete"
rm -rf "$dir"; mv "$tmp" "$dir"
trap - EXIT
echo "$dir/rootfs"
