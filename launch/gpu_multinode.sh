#!/usr/bin/env bash
# One training process per GPU node without SLURM (e.g. plain VMs): run on every node with its rank.
#
#   launch/gpu_multinode.sh [--dry-run] COORDINATOR_HOST:PORT NUM_NODES NODE_RANK -- --config=... --workdir=...
#
# Each process drives all GPUs of its node (jax sees them as local devices).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
COORD="${1:?usage: launch/gpu_multinode.sh [--dry-run] HOST:PORT NUM_NODES NODE_RANK -- ARGS...}"
NUM_NODES="${2:?missing NUM_NODES}"
RANK="${3:?missing NODE_RANK}"
shift 3
if [[ "${1:-}" == "--" ]]; then shift; fi
PYTHON="${PYTHON:-.venv/bin/python}"

# XLA GPU: latency-hiding scheduler overlaps collectives with compute; async collectives for FSDP;
# NCCL: use the InfiniBand/RoCE NICs when present, keep the socket interface explicit if needed.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# export NCCL_SOCKET_IFNAME=eth0   # set if the default route is not the fast network

cmd=("$PYTHON" -m fmjax.main "$@" "--config.distributed.coordinator=${COORD}"
     "--config.distributed.num_processes=${NUM_NODES}" "--config.distributed.process_id=${RANK}")
if (( DRY_RUN )); then
  echo "XLA_FLAGS='${XLA_FLAGS}' NCCL_IB_DISABLE=${NCCL_IB_DISABLE} NCCL_DEBUG=${NCCL_DEBUG}"
  printf '%q ' "${cmd[@]}"; echo; exit 0
fi
exec "${cmd[@]}"
