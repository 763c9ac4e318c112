#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432: start the local cluster if it is
# down, install Debian's postgresql if it is missing. Never assumes one is running.
set -euo pipefail
HOST=${PGHOST_CHECK:-127.0.0.1}
PORT=${PGPORT_CHECK:-5432}

answers() { pg_isready -q -h "$HOST" -p "$PORT" 2>/dev/null; }

if command -v pg_isready >/dev/null && answers; then exit 0; fi

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "ensure-postgres: installing postgresql with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

VERSION=$(ls /etc/postgresql | sort -V | tail -n 1)
CONF=/etc/postgresql/$VERSION/main
# Local trust auth on loopback, as on the development machines.
if ! grep -q "abc-mirror" "$CONF/pg_hba.conf" 2>/dev/null; then
  $SUDO sed -i '1i host all all 127.0.0.1/32 trust # abc-mirror\nhost all all ::1/128 trust # abc-mirror\nlocal all all trust # abc-mirror' "$CONF/pg_hba.conf"
fi
echo "ensure-postgres: starting cluster $VERSION/main" >&2
$SUDO pg_ctlcluster --skip-systemctl-redirect "$VERSION" main start || true
for _ in $(seq 1 30); do answers && exit 0; sleep 1; done
echo "ensure-postgres: PostgreSQL does not answer on $HOST:$PORT" >&2
exit 1
