#!/usr/bin/env bash
# The Debian packages `chexlib cluster up` needs (a LOCAL EMULATION of a cluster:
# network namespaces as nodes, each with sshd and slurmd; slurmctld and munge on the host).
# Installs only what is missing; runs `apt-get update` only when apt knows no candidate.
# Called by `make cluster-packages` (which `make cluster` and `make test` reach).
set -euo pipefail

# package -> a program it installs (present: nothing to do)
declare -A NEEDS=(
  [slurm-wlm]=slurmctld [slurmd]=slurmd [slurm-client]=srun [munge]=munged
  [openssh-server]=sshd [openssh-client]=ssh [iproute2]=tc
)
missing=()
for pkg in "${!NEEDS[@]}"; do
  prog=${NEEDS[$pkg]}
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "cluster_packages: slurm-wlm, munge, openssh-server, iproute2 already installed"
  exit 0
fi
die() { echo "cluster_packages: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run as root (sudo make cluster-packages) or: sudo apt-get install -y ${missing[*]}"
command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them with this system's package manager"

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -o DPkg::Lock::Timeout=300)  # another apt run: wait for it, do not fail
for pkg in "${missing[@]}"; do
  if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    echo "cluster_packages: apt-get update (no candidate for $pkg)"
    "${APT[@]}" update
    break
  fi
done
echo "cluster_packages: installing ${missing[*]}"
"${APT[@]}" install -y --no-install-recommends "${missing[@]}"
