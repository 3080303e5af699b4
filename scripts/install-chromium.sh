#!/usr/bin/env bash
# Install Debian's `chromium` for the report's browser test (tests/test_report.py loads
# results/report/index.html in headless Chromium and checks that every image decodes).
#
# Idempotent and non-interactive: exits 0 quietly when `chromium` is already on PATH.
# Needs root (or passwordless sudo) and apt-get (Debian/Ubuntu).
#
# Usage: scripts/install-chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-chromium: must run as root (or with passwordless sudo)" >&2
        exit 1
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: apt-get not found; this script supports Debian/Ubuntu only" >&2
    exit 1
fi

echo "install-chromium: installing chromium"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    chromium fonts-dejavu-core

echo "install-chromium: done ($(chromium --version 2>/dev/null || echo chromium))"
