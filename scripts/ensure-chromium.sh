#!/usr/bin/env bash
# The headless browser of `make test` (tests/test_plugin.py loads the releases page in it); prints
# its path on stdout. Uses `chromium` from PATH; only when it is missing is Debian's chromium package
# installed with apt-get.
set -euo pipefail
log() { echo "ensure-chromium: $*" >&2; }

if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "no chromium: installing Debian's chromium with apt-get"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
fi
command -v chromium
