#!/usr/bin/env bash
# The postgres image's own steps (scripts/build-image.sh runs this last, with the root filesystem
# as $1): the user postgres (uid/gid 999: the manifest's runAsUser and fsGroup), no cluster of the
# build's, no JIT, the binaries on PATH, and the entrypoint.
set -euo pipefail
r=$1
bin=/usr/lib/postgresql/15/bin
[ -x "$r$bin/postgres" ] || { echo "postgres.sh: no $bin/postgres in the image" >&2; exit 1; }
# The user and group postgres, uid/gid 999, whatever the packages' scripts made (and without the
# group of the left-out ssl-cert).
sed -i -e '/^postgres:/d' -e '/^ssl-cert:/d' "$r/etc/passwd" "$r/etc/group" "$r/etc/shadow" "$r/etc/gshadow"
echo 'postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh' >>"$r/etc/passwd"
echo 'postgres:x:999:' >>"$r/etc/group"
echo 'postgres:!:19000::::::' >>"$r/etc/shadow"
echo 'postgres:!::' >>"$r/etc/gshadow"
# What the packages' scripts left: a cluster, its configuration, logs, the socket directory.
rm -rf "$r/var/lib/postgresql" "$r/etc/postgresql" "$r/etc/postgresql-common" "$r/var/log/postgresql" \
       "$r/var/run/postgresql" "$r/run/postgresql" "$r/run/adduser"
mkdir -p "$r/var/lib/postgresql/data" "$r/run/postgresql"
chown 999:999 "$r/var/lib/postgresql" "$r/var/lib/postgresql/data" "$r/run/postgresql"
chmod 0700 "$r/var/lib/postgresql/data"
chmod 2775 "$r/run/postgresql"
# No JIT: libLLVM is left out (the recipe), so is the module that would load it.
rm -rf "$r/usr/lib/postgresql/15/lib/llvmjit.so" "$r/usr/lib/postgresql/15/lib/llvmjit_types.bc" \
       "$r/usr/lib/postgresql/15/lib/bitcode"
for f in "$r$bin"/*; do ln -sf "$bin/${f##*/}" "$r/usr/local/bin/${f##*/}"; done
cat >"$r/usr/local/bin/postgres-entrypoint" <<'SCRIPT'
#!/bin/sh
# The postgres image's entrypoint: on the first start, while $PGDATA is empty, initdb makes the
# cluster there (the superuser $POSTGRES_USER, default postgres, with the password
# $POSTGRES_PASSWORD, scram-sha-256; password authentication from any host); then postgres
# serves it on every address, port 5432, its socket in /run/postgresql. Runs as the user
# postgres (uid 999); the root may be read-only.
set -eu
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
: "${POSTGRES_USER:=postgres}"
export PGDATA
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: no cluster in $PGDATA and POSTGRES_PASSWORD is empty" >&2
    exit 1
  fi
  if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
    echo "postgres-entrypoint: $PGDATA is neither empty nor a cluster" >&2
    exit 1
  fi
  mkdir -p "$PGDATA"
  chmod 0700 "$PGDATA"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 --no-instructions
  rm -f "$pwfile"
  {
    echo "# postgres-entrypoint: password authentication from any host"
    echo "host all all 0.0.0.0/0 scram-sha-256"
    echo "host all all ::/0 scram-sha-256"
  } >>"$PGDATA/pg_hba.conf"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql -c jit=off "$@"
SCRIPT
chmod 0755 "$r/usr/local/bin/postgres-entrypoint"
