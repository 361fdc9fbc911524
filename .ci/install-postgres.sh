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

bash "$(dirname "$0")/apt-install-no-start.sh" postgresql

if ! have_initdb; then
  echo "postgresql: installation finished but no initdb under /usr/lib/postgresql/*/bin" >&2
  exit 1
fi
echo "postgresql: installed ($(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n1))"
