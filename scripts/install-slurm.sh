#!/usr/bin/env bash
# Install the Debian packages needed for a real one-node Slurm cluster that the
# test suite (tests/slurm) brings up on 127.0.0.1:
#   slurm-wlm (slurmctld + slurmd + slurm-client), slurmdbd, munge, mariadb-server.
#
# Idempotent and non-interactive: exits 0 at once when every needed binary is
# already present. Package post-install scripts are prevented from starting the
# daemons (tests start them by hand in their own directory; there is no systemd).
#
# Usage: scripts/install-slurm.sh          (as root, or with sudo available)
set -euo pipefail

need_bins=(slurmctld slurmd slurmdbd sbatch squeue sinfo sacct sacctmgr scontrol scancel
           munged mungekey mariadbd mariadb-install-db mariadb)
pkgs=(slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client)

missing=()
for b in "${need_bins[@]}"; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1; then
        missing+=("$b")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-slurm: already installed ($(dpkg-query -W -f='slurm ${Version}' slurm-client 2>/dev/null || echo slurm))"
    exit 0
fi
echo "install-slurm: missing ${missing[*]}; installing ${pkgs[*]}"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        echo "install-slurm: must run as root (or with passwordless sudo)" >&2
        exit 1
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: apt-get not found; this script supports Debian/Ubuntu only" >&2
    exit 1
fi

# Keep package scripts from starting munge/mariadb/slurm daemons (policy-rc.d
# exit 101 = "action forbidden"); only remove the file if we created it.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${pkgs[@]}"

# The munge package normally creates /etc/munge/munge.key; make sure it exists.
if [ ! -s /etc/munge/munge.key ]; then
    "${SUDO[@]}" mungekey --create --keyfile=/etc/munge/munge.key
    "${SUDO[@]}" chown munge:munge /etc/munge/munge.key
    "${SUDO[@]}" chmod 400 /etc/munge/munge.key
fi

echo "install-slurm: done ($(dpkg-query -W -f='slurm ${Version}' slurm-client 2>/dev/null || echo slurm))"
