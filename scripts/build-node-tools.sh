#!/usr/bin/env bash
# Installs the npm packages api/openapi_test.go checks the OpenAPI document with (@redocly/cli,
# openapi-typescript, openapi-fetch, typescript: exactly the versions api/package-lock.json pins)
# with `npm ci`, outside the repository: ~/.cache/sandboxd/npm/<hash of api/package.json and
# api/package-lock.json>/node_modules. A no-op when that is there; otherwise about 10 s and 60 MB.
# Needs Node.js >= 20.19 (what @redocly/cli 2 supports) and npm; install scripts are not run.
#
# Usage: scripts/build-node-tools.sh [CACHE_DIR]   (default: ~/.cache/sandboxd)
# Prints the node_modules path as its last line.
set -euo pipefail
cache=${1:-${SANDBOXD_CACHE:-$HOME/.cache/sandboxd}}
api="$(cd "$(dirname "${BASH_SOURCE[0]}")/../api" && pwd)"
hash=$(cat "$api/package.json" "$api/package-lock.json" | sha256sum | cut -c1-12)
dir="$cache/npm/$hash"
if [ -f "$dir/.complete" ]; then echo "$dir/node_modules"; exit 0; fi

for cmd in node npm; do
  command -v "$cmd" >/dev/null || { echo "build-node-tools: $cmd missing: run scripts/install-deps.sh" >&2; exit 1; }
done
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' \
  || { echo "build-node-tools: Node.js $(node --version) is too old: @redocly/cli needs >= 20.19" >&2; exit 1; }
tmp="$dir.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cp "$api/package.json" "$api/package-lock.json" "$tmp/"
echo "build-node-tools: npm ci into $tmp" >&2
(cd "$tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
touch "$tmp/.complete"
rm -rf "$dir"; mv "$tmp" "$dir"
trap - EXIT
echo "$dir/node_modules"
