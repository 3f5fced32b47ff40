#!/usr/bin/env bash
# make run: sets up what sandboxd needs, step by step, then serves. Each step prints one line with
# its time; what the tools print (apt, debootstrap, the Go compiler) goes to a log file in
# $DATA/logs/, whose last lines are shown if the step fails. The WASM image (CPython compiled to
# wasm32-wasi, 4-8 minutes the first time) is not a step: the server builds it in the background
# (serve --wasm-build) while container sandboxes are already served, and approves it when it is
# built; its log is $DATA/logs/wasm-build.log. "ready in N s" is the time from the start of this
# script to the server's first answer on /health; the server logs the same for its first request
# (SANDBOXD_START_TIME).
#
# Usage: scripts/run.sh   (the Makefile's run target; settings from the environment:)
#   LISTEN (127.0.0.1:8080)  DATA (data)  IMAGE (agentcop/agent-sandbox:latest, the data image: the
#   default)  SLIM (agentcop/agent-sandbox:slim)  WASM (python:3.11-wasi)
set -euo pipefail
now_ms() { date +%s%3N; }
start_ms=$(now_ms)
SANDBOXD_START_TIME=$((start_ms / 1000)).$(printf %03d $((start_ms % 1000)))
export SANDBOXD_START_TIME
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LISTEN=${LISTEN:-127.0.0.1:8080}
DATA=${DATA:-data}
IMAGE=${IMAGE:-agentcop/agent-sandbox:latest}
SLIM=${SLIM:-agentcop/agent-sandbox:slim}
WASM=${WASM:-python:3.11-wasi}
logs=$DATA/logs
mkdir -p -m 700 "$DATA"
mkdir -p "$logs"

# since MS: the time since MS (milliseconds), for people: "0.4 s", "12.0 s", "2 min 31 s".
since() {
  local ms=$(($(now_ms) - $1))
  if [ "$ms" -lt 60000 ]; then
    printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100))
  else
    printf '%d min %d s' $((ms / 60000)) $((ms % 60000 / 1000))
  fi
}
# step N TITLE LOG COMMAND...: runs COMMAND with its output in LOG; prints "[N/5] TITLE … ok (T)",
# or the log's last lines and its path, and exits, when the command fails. Sets $took.
step() {
  local n=$1 title=$2 log=$3 t
  shift 3
  printf '[%s/5] %s … ' "$n" "$title"
  t=$(now_ms)
  if ! "$@" >"$log" 2>&1; then
    echo "failed ($(since "$t"))"
    echo "---- last lines of $log:" >&2
    tail -n 25 "$log" >&2
    echo "---- full log: $log" >&2
    exit 1
  fi
  took=$(since "$t")
}

step 1 dependencies "$logs/deps.log" scripts/install-deps.sh
echo "ok ($took)"

step 2 binaries "$logs/go-build.log" "${MAKE:-make}" -s --no-print-directory build
echo "ok ($took)"

# The host check (sandboxd doctor): stops here, with every line and its fix, when something
# required is missing; shows the warnings otherwise.
step 3 "host check" "$logs/doctor.log" bin/sandboxd doctor --data-dir "$DATA" --listen "$LISTEN"
echo "ok ($took): $(tail -n 1 "$logs/doctor.log")"
grep '^warn' "$logs/doctor.log" || true

# The container images, the data image and the slim one, built side by side: cached after the
# first build (which prints what it does on stderr).
images_build() {
  scripts/build-image.sh >"$logs/image-build.path" & local data=$!
  scripts/build-image.sh slim >"$logs/image-slim-build.path" & local slim=$!
  local rc=0
  wait "$data" || rc=1
  wait "$slim" || rc=1
  return $rc
}
step 4 "container images" "$logs/image-build.log" images_build
rootfs=$(tail -n 1 "$logs/image-build.path")
slim_rootfs=$(tail -n 1 "$logs/image-slim-build.path")
rm -f "$logs/image-build.path" "$logs/image-slim-build.path"
if [ -s "$logs/image-build.log" ]; then
  echo "built ($took), log: $logs/image-build.log"
else
  echo "ok, cached ($took)"
fi

# The probe of GET /health (bash's /dev/tcp: no curl needed): host and port from LISTEN.
host=${LISTEN%:*} port=${LISTEN##*:}
case $host in "" | 0.0.0.0 | "[::]") host=127.0.0.1 ;; esac
host=${host#[} host=${host%]}
health() {
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}
# wasm_state BODY: what /health says of the WASM image, in words.
wasm_state() {
  python3 -c '
import json, sys
st = json.loads(sys.argv[1]).get("images", {}).get(sys.argv[2])
if st is None: print(f"WASM image {sys.argv[2]}: not configured")
elif st["status"] == "building":
    left = st.get("ready_in_seconds", 0)
    print(f"WASM image {sys.argv[2]} building in the background, ready in about "
          + (f"{round(left / 60)} min" if left >= 120 else f"{left} s") + f"; log: {sys.argv[3]}")
elif st["status"] == "failed": print(f"WASM image {sys.argv[2]} failed to build: {st.get('error', '')}; log: {sys.argv[3]}")
else: print(f"WASM image {sys.argv[2]} ready")
' "$1" "$WASM" "$logs/wasm-build.log" 2>/dev/null || echo "WASM image: see GET /health"
}
# Waits (in the background) for the server's first answer, then prints step 4's line.
(
  while kill -0 $$ 2>/dev/null; do
    if body=$(health 2>/dev/null) && [ -n "$body" ]; then
      echo "[5/5] serving on http://$LISTEN: ready in $(since "$start_ms") ($(wasm_state "$body")). Ctrl-C stops it." >&2
      exit 0
    fi
    sleep 0.1
  done
) &
poller=$!

# The server runs in a session of its own, so that Ctrl-C reaches this script only, which passes
# on one SIGTERM: the terminal's SIGINT to the whole process group would reach the server twice
# (directly and through its mount-namespace parent), and a second signal stops it at once, before
# it has destroyed its sandboxes and stopped the WASM build. A second Ctrl-C does just that.
setsid bin/sandboxd serve --listen "$LISTEN" --data-dir "$DATA" --image "$IMAGE=$rootfs" --image "$SLIM=$slim_rootfs" \
  --wasm-build "$WASM=scripts/build-python-wasm.sh" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' INT TERM HUP
rc=0
while :; do
  wait "$server" && rc=0 || rc=$?
  kill -0 "$server" 2>/dev/null || break # (a trapped signal ends the wait, not the server)
done
kill "$poller" 2>/dev/null || true
wait "$poller" 2>/dev/null || true
exit "$rc"
