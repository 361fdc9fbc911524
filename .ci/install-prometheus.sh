#!/usr/bin/env bash
# Install promtool (Debian's `prometheus` package) so CI can check and unit-test
# deploy/prometheus/alerts.yml. Idempotent: does nothing when promtool is on PATH.
# The Debian prometheus service is never left running: a temporary policy-rc.d keeps
# the maintainer scripts from starting it, and on systemd hosts it is disabled and stopped.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  echo "prometheus: promtool already installed ($(command -v promtool))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

bash "$(dirname "$0")/apt-install-no-start.sh" prometheus

# An existing policy-rc.d may allow starts; make sure the service is off and not enabled.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
else
  if [ -e /etc/init.d/prometheus ]; then
    $SUDO service prometheus stop >/dev/null 2>&1 || true
  fi
  if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable prometheus.service >/dev/null 2>&1 || true  # offline: drops the symlink
  fi
  if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/prometheus ]; then
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

if ! command -v promtool >/dev/null 2>&1; then
  echo "prometheus: installation finished but promtool is not on PATH" >&2
  exit 1
fi
echo "prometheus: installed ($(promtool --version 2>&1 | head -n1))"
