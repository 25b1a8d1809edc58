#!/usr/bin/env bash
# N training processes on this machine, talking over 127.0.0.1 (multi-host rehearsal on one box).
#
#   launch/local.sh [--dry-run] N [--devices-per-process D] -- --config=configs/demo.py:data_dir=DIR --workdir=runs/x [...]
#
# Each process gets D fake CPU devices (default 4) and the jax.distributed coordinates through
# --config.distributed.*; process 0 is the coordinator. Logs: <workdir>/process_<i>.log.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
N="${1:?usage: launch/local.sh [--dry-run] N [--devices-per-process D] -- ARGS...}"; shift
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "N must be a positive integer, got '$N'" >&2; exit 2; fi
DEVICES=4
if [[ "${1:-}" == "--devices-per-process" ]]; then DEVICES="$2"; shift 2; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
PORT="${PORT:-$(( 20000 + RANDOM % 20000 ))}"
PYTHON="${PYTHON:-.venv/bin/python}"
WORKDIR=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && WORKDIR="${arg#--workdir=}"; done
if [[ -z "$WORKDIR" ]]; then echo "pass --workdir=DIR after --" >&2; exit 2; fi

pids=()
for (( i = 0; i < N; i++ )); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES}"
       "$PYTHON" -m fmjax.main "$@"
       "--config.distributed.coordinator=127.0.0.1:${PORT}"
       "--config.distributed.num_processes=${N}" "--config.distributed.process_id=${i}")
  if (( DRY_RUN )); then
    printf '%q ' "${cmd[@]}"; echo "> ${WORKDIR}/process_${i}.log 2>&1 &"
    continue
  fi
  mkdir -p "$WORKDIR"
  "${cmd[@]}" > "${WORKDIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
(( DRY_RUN )) && exit 0
# Forward SIGTERM to every process (each saves a checkpoint and exits 0).
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
