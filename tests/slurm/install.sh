#!/usr/bin/env bash
# Installs Debian's SLURM and munge packages for the real-SLURM tests (tests/test_slurm_real.py),
# as root where apt-get works; anywhere else it says why and exits 0, and those tests skip.
set -uo pipefail
packages=(slurmctld slurmd slurm-client munge)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "note: not root with apt-get: SLURM packages not installed; the real-SLURM tests will skip"
    exit 0
fi
log=$(mktemp)
if timeout 600 apt-get update -qq >"$log" 2>&1 && \
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${packages[@]}" >>"$log" 2>&1; then
    echo "installed ${packages[*]}"
else
    echo "note: apt-get could not install ${packages[*]} (last lines below); the real-SLURM tests will skip"
    tail -3 "$log"
fi
rm -f "$log"
exit 0
