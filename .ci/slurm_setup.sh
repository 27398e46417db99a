#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurm-wlm packages) and munge for tests/test_slurm.py.
# The test starts and stops the daemons itself (no systemd here); this only installs them.
# Needs root and apt (Debian/Ubuntu). Seen here: Slurm 22.05.8, munge 0.5.15 on Debian 12.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
   && command -v sbatch >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
