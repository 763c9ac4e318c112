#!/usr/bin/env bash
# Stops the throwaway PostgreSQL cluster and Redis that scripts/ensure-postgres.sh and
# scripts/ensure-redis.sh started for this checkout (`make stop`); nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
for STATE in "${ABC_PG_DIR:-$REPO/var/pg}" "/tmp/abc-mirror-pg-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)"; do
  DATA=$STATE/data
  [ -s "$DATA/postmaster.pid" ] || continue
  OWNER=$(stat -c %U "$DATA")
  BINDIR=$(dirname "$(readlink -f "$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")")
  echo "stop-services: stopping the throwaway PostgreSQL cluster in $DATA" >&2
  if [ "$(id -u)" -eq 0 ] && [ "$OWNER" != root ]; then
    runuser -u "$OWNER" -- "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
  else
    "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
  fi
done
PIDFILE=$REPO/var/redis/redis.pid
if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "stop-services: stopping the throwaway Redis (pid $(cat "$PIDFILE"))" >&2
  kill "$(cat "$PIDFILE")"
  for _ in $(seq 1 20); do kill -0 "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null || break; sleep 0.25; done
fi
exit 0
