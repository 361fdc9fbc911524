#!/usr/bin/env bash
# Install the PostgreSQL server binaries the store tests need (Debian/Ubuntu).
# Idempotent: does nothing when initdb already exists under /usr/lib/postgresql/*/bin.
# The Debian service is neither configured nor started: tests/pg.py runs its own cluster.
set -euo pipefail

have_initdb() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_initdb; then
  echo "postgresql: already installed ($(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n1))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# Keep the package's maintainer scripts from starting a cluster service.
policy_rc=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy_rc" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy_rc" >/dev/null
  $SUDO chmod 755 "$policy_rc"
  created_policy=1
fi
cleanup() {
  if [ "$created_policy" -eq 1 ]; then
    $SUDO rm -f "$policy_rc"
  fi
}
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql

if ! have_initdb; then
  echo "postgresql: installation finished but no initdb under /usr/lib/postgresql/*/bin" >&2
  exit 1
fi
echo "postgresql: installed ($(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n1))"
