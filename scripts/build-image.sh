#!/usr/bin/env bash
# Builds a container image as a plain root filesystem from Debian bookworm — debootstrap minbase
# plus the packages its recipe names — and caches it outside the repository. Three images:
#   data      agentcop/agent-sandbox:latest, the default: python3 with numpy, pandas, scipy,
#             matplotlib (Agg, DejaVu fonts, its font list built here), openpyxl, requests,
#             beautifulsoup4, lxml, pillow, sympy (scripts/image/data.packages)
#   slim      agentcop/agent-sandbox:slim: python3 alone (scripts/image/slim.packages)
#   postgres  PostgreSQL 15's server for deploy/kubernetes/postgres.yaml (scripts/image/postgres.*)
# A recipe pins every package it names to its exact Debian version; the build fails, naming the
# package, when bookworm no longer serves that version (a point release): update the pin. A
# "-package" line leaves out a dependency and what it alone brings (dpkg --force-depends: the image
# is never upgraded in place). A variant's own finishing steps, if it has any, are a script beside
# its recipe, image/VARIANT.sh, run last with the root filesystem's path as its argument.
#
# Usage: scripts/build-image.sh [data|slim|postgres] [CACHE_DIR]   (default: data, ~/.cache/sandboxd)
# Prints the rootfs path as its last line. Each image is cached in
# CACHE_DIR/images/agent-sandbox-VARIANT-<recipe hash>/ (the first 12 hex digits of the sha256 of
# `sha256sum build-image.sh image/VARIANT.packages [image/VARIANT.sh]`'s output, in scripts/), so it
# is rebuilt only when this file or its own recipe and steps change; beside rootfs/: digest
# (GET /api/images) and build-seconds (make bench).
set -euo pipefail
variant=${1:-data}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
recipe=image/$variant.packages
steps=image/$variant.sh
[ -f "$here/$recipe" ] || { echo "build-image: unknown image $variant (want data, slim or postgres)" >&2; exit 2; }
[ -f "$here/$steps" ] || steps=
cache=${2:-${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}}
recipe_hash=$( (cd "$here" && sha256sum build-image.sh "$recipe" $steps) | sha256sum | cut -c1-12)
dir="$cache/images/agent-sandbox-$variant-$recipe_hash"
if [ -f "$dir/.complete" ]; then echo "$dir/rootfs"; exit 0; fi

command -v debootstrap >/dev/null || { echo "build-image: debootstrap missing: run scripts/install-deps.sh" >&2; exit 1; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
start=$SECONDS
lines=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$here/$recipe")
pins=$(grep -v '^-' <<<"$lines")
omit=$(grep '^-' <<<"$lines" | cut -c2- || true)
names=$(cut -d= -f1 <<<"$pins" | paste -sd,)
tmp="$dir.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp" "$tmp.log"' EXIT
echo "build-image: debootstrap bookworm ($variant) into $tmp (a few minutes, once)" >&2
debootstrap --variant=minbase --include="$names" bookworm "$tmp/rootfs" "$mirror" >"$tmp.log" 2>&1 \
  || { tail -20 "$tmp.log" >&2; exit 1; }
r="$tmp/rootfs"
# The versions the recipe pins, checked: debootstrap installs what bookworm serves today.
stale=0
while IFS== read -r name want; do
  got=$(dpkg-query --admindir="$r/var/lib/dpkg" -W -f='${Version}' "$name" 2>/dev/null) || got=none
  if [ "$got" != "$want" ]; then
    echo "build-image: bookworm now serves $name $got, $here/$recipe pins $want: update the pin" >&2
    stale=1
  fi
done <<<"$pins"
[ "$stale" = 0 ] || exit 1
# Leave out what only the omitted packages need: keep what the recipe's packages, apt and the
# required base depend on (the first installed alternative) without going through them. The
# host's python3 reads the image's dpkg status: not every image has a python3.
if [ -n "$omit" ]; then
  purge=$(cut -d= -f1 <<<"$pins" | python3 -c '
import re, sys
status, omit, roots = sys.argv[1], set(sys.argv[2:]), set(sys.stdin.read().split()) | {"apt"}
pkgs, provides = {}, {}
for para in open(status).read().split("\n\n"):
    f = dict(re.findall(r"^([\w-]+): (.*(?:\n .*)*)", para, re.M))
    if "Package" not in f or not f.get("Status", "").endswith(" installed"):
        continue
    pkgs[f["Package"]] = f
    if f.get("Priority") == "required":
        roots.add(f["Package"])
    for p in filter(None, (p.split(" ")[0] for p in f.get("Provides", "").replace(" ", "").split(","))):
        provides.setdefault(p.split("(")[0], []).append(f["Package"])
keep, todo = set(), [n for n in roots if n in pkgs]
while todo:
    n = todo.pop()
    if n in keep or n in omit:
        continue
    keep.add(n)
    for dep in (pkgs[n].get("Pre-Depends", "") + "," + pkgs[n].get("Depends", "")).split(","):
        for alt in filter(None, (a.split()[0].split(":")[0] for a in dep.split("|") if a.strip())):
            found = [c for c in ([alt] if alt in pkgs else provides.get(alt, [])) if c not in omit]
            if found:
                todo.extend(found)
                break
print(" ".join(sorted(set(pkgs) - keep)))
' "$r/var/lib/dpkg/status" $omit)
  echo "build-image: leaving out" $omit": purging" $purge >&2
  chroot "$r" dpkg --purge --force-depends $purge >"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }
fi
# Fit for a read-only root: no apt caches, no docs, no packages' own test suites.
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* "$r"/usr/share/man/* \
       "$r"/usr/share/locale/* "$r"/var/log/*
if [ -d "$r/usr/lib/python3/dist-packages" ]; then
  find "$r/usr/lib/python3/dist-packages" -depth -type d -name tests -exec rm -rf {} +
fi
# Mount points the sandbox runtime uses.
mkdir -p "$r/workspace" "$r/.sandbox"
if [ -f "$r/etc/matplotlibrc" ]; then
  # Headless: the Agg backend, without probing for GUI toolkits.
  sed -i -e 's/^#* *backend *:.*/backend: Agg/' "$r/etc/matplotlibrc"
  grep -q '^backend: Agg$' "$r/etc/matplotlibrc" || echo "backend: Agg" >>"$r/etc/matplotlibrc"
  # matplotlib's font list (0.1 s to build), built here. matplotlib reads it only from its
  # cache directory, which must be writable (in a sandbox /tmp/.cache/matplotlib: HOME=/tmp),
  # and builds it there when it is missing: patched (the pinned version) to read the image's
  # copy then, so that no sandbox builds it. The check fails the build if the patch missed.
  chroot "$r" env MPLCONFIGDIR=/var/cache/matplotlib /usr/bin/python3 -c 'import matplotlib.font_manager'
  ls "$r"/var/cache/matplotlib/fontlist-v*.json >/dev/null
  fm="$r/usr/lib/python3/dist-packages/matplotlib/font_manager.py"
  sed -i 's|^\( *\)fm = json_load(fm_path)$|\1fm = json_load(fm_path if fm_path.exists() else Path("/var/cache/matplotlib", fm_path.name))|' "$fm"
  grep -q 'Path("/var/cache/matplotlib", fm_path.name)' "$fm" \
    || { echo "build-image: $fm has changed: update the font list's patch" >&2; exit 1; }
fi
# Precompile the standard library and the packages so a read-only root never tries to write .pyc
# files (some of the standard library's test files do not compile: on purpose).
[ ! -x "$r/usr/bin/python3" ] || chroot "$r" /usr/bin/python3 -m compileall -q /usr/lib/python3.11 /usr/lib/python3/dist-packages >/dev/null 2>&1 || true
# The variant's own steps.
if [ -n "$steps" ]; then
  bash "$here/$steps" "$r" >"$tmp.log" 2>&1 || { tail -20 "$tmp.log" >&2; exit 1; }
fi
# A content digest, reported by GET /api/images.
echo "sha256:$(cd "$r" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)" >"$tmp/digest"
echo $((SECONDS - start)) >"$tmp/build-seconds"
touch "$tmp/.complete"
rm -rf "$dir"; mv "$tmp" "$dir"
trap - EXIT
rm -f "$tmp.log"
echo "$dir/rootfs"
