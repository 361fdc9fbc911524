#!/usr/bin/env bash
# Install systemd-analyze (Debian's `systemd` package) so CI can check deploy/systemd/ with
# `systemd-analyze verify` and `systemd-analyze security --offline`. Idempotent: does nothing
# when systemd-analyze is on PATH. Nothing is booted or started: the tests only analyze files,
# and a temporary policy-rc.d keeps the maintainer scripts from starting any service.
set -euo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd: systemd-analyze already installed ($(command -v systemd-analyze))"
  exit 0
fi

bash "$(dirname "$0")/apt-install-no-start.sh" systemd

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd: installation finished but systemd-analyze is not on PATH" >&2
  exit 1
fi
echo "systemd: installed ($(systemd-analyze --version | head -n1))"
