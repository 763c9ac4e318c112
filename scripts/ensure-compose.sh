#!/usr/bin/env bash
# Where the docker client is installed but no Compose client is, install Debian's docker-compose,
# so that tests/test_compose.py can check the production stack with `docker-compose config`
# (no daemon needed). Best effort: without apt the test skips, naming why.
set -uo pipefail
command -v docker >/dev/null || exit 0
docker compose version >/dev/null 2>&1 && exit 0
command -v docker-compose >/dev/null && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ensure-compose: installing docker-compose with apt-get" >&2
{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null; } \
  || echo "ensure-compose: could not install docker-compose; the compose check will skip" >&2
exit 0
