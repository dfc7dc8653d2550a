#!/usr/bin/env bash
# Stop the cluster of slurm-up.sh by the PIDs in its pid files (never by name).
#   bash tests/infra/slurm-down.sh [--purge]    (--purge also deletes $PREFIX)
set -uo pipefail
PREFIX=${E2D2_SLURM_PREFIX:-/tmp/e2d2-slurm-ci}
export SLURM_CONF=$PREFIX/etc/slurm.conf

log() { echo "[slurm-down] $*" >&2; }
running() { [ -n "$1" ] && [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
stop_pidfile() { # stop_pidfile PIDFILE COMM
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  if running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 150); do running "$pid" || break; sleep 0.1; done
    running "$pid" && kill -KILL "$pid"
  fi
  rm -f "$1"
}

# cancel every job first, so that no job process outlives slurmd (client commands retry for
# minutes when the controller is down, hence the timeouts)
if [ -f "$SLURM_CONF" ] && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
fi
stop_pidfile "$PREFIX/run/slurmd.pid" slurmd
stop_pidfile "$PREFIX/run/slurmctld.pid" slurmctld
stop_pidfile "$PREFIX/munge/munged.pid" munged
[ "${1:-}" = --purge ] && rm -rf "$PREFIX"
exit 0
