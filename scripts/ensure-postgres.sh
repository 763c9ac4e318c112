#!/usr/bin/env bash
# A throwaway PostgreSQL cluster of this checkout's own, for `make test` and `make demo`; prints
# its SQLAlchemy URL (database $1, default postgres) on stdout.
#
# The machine's own PostgreSQL, its configuration (/etc/postgresql) and its port 5432 are left
# alone: the cluster is initdb'ed into ./var/pg/data (or, when the checkout is not reachable by
# the cluster's user, into /tmp/abc-mirror-pg-<hash of the checkout path>), listens on 127.0.0.1
# only, on a port of its own (the first free one from 55432, chosen at initdb and kept in its
# postgresql.conf; ABC_PG_PORT forces one) and on a socket directory of its own; trust authentication applies to that
# cluster alone. It keeps running for the next command; `make stop` stops it, `make clean` also
# removes it. Repeated runs reuse it.
#
# PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user when
# there is one, else as the dedicated system user `abc-mirror-pg`, created here. initdb, pg_ctl
# and postgres are taken from PATH or /usr/lib/postgresql/*/bin; only when none exist is Debian's
# postgresql installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DATABASE=${1:-postgres}
log() { echo "ensure-postgres: $*" >&2; }

find_bindir() {
  local candidates=() dir
  if command -v pg_ctl >/dev/null; then candidates+=("$(dirname "$(readlink -f "$(command -v pg_ctl)")")"); fi
  while read -r dir; do candidates+=("$dir"); done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV)
  for dir in "${candidates[@]}"; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

BINDIR=$(find_bindir || true)
if [ -z "$BINDIR" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "no PostgreSQL binaries: installing Debian's postgresql with apt-get"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
  BINDIR=$(find_bindir) || { log "no initdb/pg_ctl/postgres after installing postgresql"; exit 1; }
fi

# Who runs the cluster.
as_user() { "$@"; }
RUN_AS=$(id -un)
if [ "$(id -u)" -eq 0 ]; then
  if id postgres >/dev/null 2>&1; then
    RUN_AS=postgres
  else
    RUN_AS=abc-mirror-pg
    if ! id "$RUN_AS" >/dev/null 2>&1; then
      log "creating the system user $RUN_AS to run the throwaway cluster (PostgreSQL refuses root)"
      useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$RUN_AS"
    fi
  fi
  as_user() { runuser -u "$RUN_AS" -- "$@"; }
fi

# Where it lives: ./var/pg when the cluster's user can reach it (not e.g. under /root).
STATE=${ABC_PG_DIR:-$REPO/var/pg}
mkdir -p "$STATE"
[ "$(id -u)" -ne 0 ] || chown "$RUN_AS" "$STATE"
if ! as_user test -w "$STATE" -a -x "$STATE"; then
  FALLBACK=/tmp/abc-mirror-pg-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)
  log "$RUN_AS cannot reach $STATE; the cluster lives in $FALLBACK"
  rmdir "$STATE" 2>/dev/null || true
  STATE=$FALLBACK
  mkdir -p "$STATE"
  [ "$(id -u)" -ne 0 ] || chown "$RUN_AS" "$STATE"
fi
DATA=$STATE/data
SOCKETS=$STATE/run

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ ! -s "$DATA/PG_VERSION" ]; then
  PORT=${ABC_PG_PORT:-}
  if [ -z "$PORT" ]; then
    PORT=55432
    while port_taken "$PORT"; do PORT=$((PORT + 1)); done
  fi
  log "initdb of a throwaway cluster in $DATA (user $RUN_AS, port $PORT)"
  rm -rf "$DATA" "$SOCKETS"
  as_user mkdir -p "$SOCKETS"
  as_user "$BINDIR/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth=trust --no-sync >/dev/null
  # Loopback only, its own port and socket directory.
  as_user tee -a "$DATA/postgresql.conf" >/dev/null <<EOF
# abc-mirror throwaway cluster (scripts/ensure-postgres.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKETS'
max_connections = 200
EOF
fi
PORT=$(sed -n "s/^port = \([0-9]*\)$/\1/p" "$DATA/postgresql.conf" | tail -n 1)
if [ -n "${ABC_PG_PORT:-}" ] && [ "$ABC_PG_PORT" != "$PORT" ]; then
  log "the cluster in $DATA listens on $PORT, not ABC_PG_PORT=$ABC_PG_PORT: run \`make clean\` first"
  exit 1
fi

if ! as_user "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  if port_taken "$PORT"; then
    log "port $PORT is taken by another server: set ABC_PG_PORT or remove $STATE"
    exit 1
  fi
  log "starting the throwaway cluster on 127.0.0.1:$PORT"
  as_user mkdir -p "$SOCKETS"
  as_user "$BINDIR/pg_ctl" -D "$DATA" -l "$STATE/server.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$STATE/server.log" >&2; exit 1; }
fi
for _ in $(seq 1 30); do
  if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
    echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DATABASE"
    exit 0
  fi
  sleep 1
done
log "the throwaway cluster does not answer on 127.0.0.1:$PORT (log: $STATE/server.log)"
exit 1
