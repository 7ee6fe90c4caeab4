#!/usr/bin/env bash
# Install the real systems the tests start (SLURM and its authentication, munge; the Prometheus
# server and promtool), so CI tests them instead of skipping them. Idempotent: when everything is present it only checks and
# returns in well under a second; it never starts a daemon (the tests start and stop their own).
#
#   .ci/install-systems.sh        (as root, on Debian/Ubuntu; prints one line per thing it does)
set -euo pipefail

# package -> the commands the tests run from it: what "already installed" means here.
declare -A PROVIDES=([slurm-wlm]="slurmctld slurmd sbatch srun squeue scontrol scancel sinfo"
                     [munge]="munged munge unmunge"
                     [prometheus]="prometheus promtool")

missing=()
for package in slurm-wlm munge prometheus; do
  for program in ${PROVIDES[$package]}; do
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1; then
      missing+=("$package")
      break
    fi
  done
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-systems: slurm-wlm, munge and prometheus already installed"
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  # A failure: CI must not go on without them (outside CI the SLURM tests skip, saying why).
  echo "install-systems: cannot install ${missing[*]}: needs root and apt-get" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# One index refresh per call, and only when something is missing.
echo "install-systems: apt-get update"
apt-get update -qq >/dev/null
echo "install-systems: apt-get install ${missing[*]}"
# --no-install-recommends: the daemons and client commands only, not docs or mail servers.
# apt's chatter (debconf notes) is kept out of the log unless the install fails.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-systems: apt-get install ${missing[*]} failed" >&2
  exit 1
fi
