#!/usr/bin/env bash
# Runs training on every host of a Cloud TPU pod slice (one process per host).
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- --config=configs/mae_vit_s.py:data_dir=gs://... --workdir=gs://...
#
# jax.distributed finds the pod's coordinator from the TPU metadata (no distributed.* flags needed);
# the repo is expected at ~/fmjax on every host with its .venv (jax[tpu]==0.10.2 installed on top).
# Preemption / maintenance: the loop saves at jax's preemption sync point and on SIGTERM.
# Mesh: e.g. --config.mesh.data=-1 --config.mesh.fsdp=8 for ViT-L and larger.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
TPU_NAME="${1:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- ARGS...}"
ZONE="${2:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- ARGS...}"
shift 2
if [[ "${1:-}" == "--" ]]; then shift; fi
REPO_DIR="${REPO_DIR:-~/fmjax}"

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
# Large-model TPU settings: let XLA overlap FSDP all-gathers with compute.
remote="cd ${REPO_DIR} && LIBTPU_INIT_ARGS='--xla_tpu_enable_async_all_gather=true --xla_tpu_enable_async_collective_fusion=true' .venv/bin/python -m fmjax.main${args}"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote")
if (( DRY_RUN )); then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
