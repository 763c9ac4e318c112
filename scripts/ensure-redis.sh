#!/usr/bin/env bash
# A throwaway Redis of this checkout's own, the Celery broker of `make test`
# (tests/test_celery_scaleout.py); prints its URL on stdout.
#
# Runs redis-server from ./var/redis on 127.0.0.1 only, on a port of its own (the first free one
# from 56379, kept in ./var/redis/port; ABC_REDIS_PORT forces one), nothing persisted. A machine's
# own Redis is left alone. It keeps running for the next command; `make stop` stops it. Only when
# redis-server is missing is Debian's redis-server installed with apt-get (its service is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=$PWD/var/redis
log() { echo "ensure-redis: $*" >&2; }

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "no redis-server: installing Debian's redis-server with apt-get"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2
fi

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
answers() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }
running() { [ -s "$STATE/redis.pid" ] && kill -0 "$(cat "$STATE/redis.pid")" 2>/dev/null; }

mkdir -p "$STATE"
PORT=$(cat "$STATE/port" 2>/dev/null || true)
if [ -n "${ABC_REDIS_PORT:-}" ] && [ "$ABC_REDIS_PORT" != "$PORT" ]; then
  if running; then
    log "the throwaway Redis listens on $PORT, not ABC_REDIS_PORT=$ABC_REDIS_PORT: run \`make stop\` first"
    exit 1
  fi
  PORT=$ABC_REDIS_PORT
fi
if ! running; then
  if [ -z "$PORT" ] || port_taken "$PORT"; then
    [ -z "${ABC_REDIS_PORT:-}" ] || { log "port $ABC_REDIS_PORT is taken"; exit 1; }
    PORT=56379
    while port_taken "$PORT"; do PORT=$((PORT + 1)); done
  fi
  echo "$PORT" > "$STATE/port"
  log "starting a throwaway redis-server on 127.0.0.1:$PORT"
  redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes --dir "$STATE" \
    --daemonize yes --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" \
    --save "" --appendonly no >/dev/null
fi
for _ in $(seq 1 30); do
  if answers "$PORT"; then echo "redis://127.0.0.1:$PORT/0"; exit 0; fi
  sleep 0.5
done
log "the throwaway Redis does not answer on 127.0.0.1:$PORT (log: $STATE/redis.log)"
exit 1
