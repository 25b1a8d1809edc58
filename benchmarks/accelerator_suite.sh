#!/usr/bin/env bash
# The accelerator measurements of benchmarks/RESULTS.md §6, in one go on one GPU:
#   bash benchmarks/accelerator_suite.sh OUTDIR [parts...]     parts: kernels vit_g dino mae_vs_torch (the default), vit_g_layout
# Each part has its own time limit and the suite goes on when one fails; every result is appended to
# OUTDIR/accelerator_step.jsonl and the output to OUTDIR/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-accelerator_results}
shift || true
parts=${*:-kernels vit_g dino mae_vs_torch}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The GPU launchers' XLA flags (launch/gpu_multinode.sh): the run also checks that this XLA accepts them.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
log="$out/log.txt"
step() { timeout -k 10 "$1" "$py" -m benchmarks.accelerator_step "${@:2}" --json "$out/accelerator_step.jsonl" 2>&1 | tee -a "$log"; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "XLA_FLAGS=$XLA_FLAGS"; } 2>&1 | tee -a "$log"

for part in $parts; do
  echo "=== $part $(date -u +%T)" | tee -a "$log"
  case $part in
    kernels)  # layers.Attention, XLA vs cuDNN: bf16 errors against float32, fwd+bwd time
      step 90 --attention-check --steps 20 ;;
    vit_g)    # one GPU's program of configs/mae_vit_g_h100x64.py: 64 samples as 2 micro-batches of 32, scanned, no remat
      # XLA attention also leaves a one-step profile in OUTDIR/profile_vit_g/xla (benchmarks/profile_step.py --from-trace)
      vit_g=(--config configs/mae_vit_g_h100x64.py --per-device-batch 64 --steps 5 --warmup 2 --child-timeout 140
             --flops-per-step 4.9196e13)
      step 160 "${vit_g[@]}" --attention xla --profile-dir "$out/profile_vit_g"
      step 160 "${vit_g[@]}" --attention cudnn ;;
    vit_g_layout)  # not in the default set: what the ViT-g/4 profile points at (RESULTS.md §6), all with cuDNN
      vit_g=(--config configs/mae_vit_g_h100x64.py --attention cudnn --steps 5 --warmup 2 --child-timeout 200
             --flops-per-step 4.9196e13)
      step 120 "${vit_g[@]}" --per-device-batch 64 --profile-dir "$out/profile_vit_g_cudnn"
      step 120 "${vit_g[@]}" --per-device-batch 32 --set grad_accum=1 --flops-per-step 2.4598e13   # no accumulation
      step 240 "${vit_g[@]}" --per-device-batch 64 --set model.scan=False ;;   # no residual stacking
    mae_vs_torch)  # the official recipe's MAE SpecViT-S/4 step, fmjax vs torch eager (bf16 autocast, SDPA)
      timeout -k 10 150 "$py" -m benchmarks.train_step --objective mae --image-size 128 --batch 32 --dtype bfloat16 \
        --torch-device cuda --rounds 1 --steps 20 --warmup 5 2>&1 | tee -a "$log"
      timeout -k 10 80 "$py" -m benchmarks.train_step --objective mae --image-size 128 --batch 32 --dtype bfloat16 \
        --attention cudnn --skip-torch --rounds 1 --steps 20 --warmup 5 2>&1 | tee -a "$log" ;;
    dino)     # DINO SpecViT-B/4: both 1025-token views through the encoder (attention-heavy)
      dino=(--config configs/dino_vit_b.py --set total_steps=1000 --set objective.steps_per_epoch=100
            --per-device-batch 32 --steps 5 --warmup 2 --child-timeout 85 --flops-per-step 5.7372e13)
      step 100 "${dino[@]}" --attention cudnn
      step 100 "${dino[@]}" --attention xla --profile-dir "$out/profile_dino" ;;
    *) echo "unknown part $part" | tee -a "$log" ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a "$log"
