"""MAE pretraining of SpecViT-g/4 on 64 NVIDIA H100 SXM (8 nodes x 8 GPUs, 80 GB each; one process
per node). Derived from `python -m fmjax.plan` numbers: see benchmarks/RESULTS.md and docs/scale.md.

  srun ... python -m fmjax.main --config=configs/mae_vit_g_h100x64.py:data_dir=/data/spectral_earth \
      --workdir=/shared/runs/mae_vit_g_h100x64
  # check it first (fake CPU devices, ~5 min):
  python -m fmjax.plan --config=configs/mae_vit_g_h100x64.py --devices 64 --mesh data=8,fsdp=8,tensor=1 \
      --device-memory 80GB --per-device-batch 64

Choices:
- Global batch 4096 = 64 per GPU, as 2 micro-batches of 32 (grad_accum=2) without remat: accumulation
  costs no extra FLOPs, recomputation (remat) would cost about a third of the encoder's. 32 per GPU
  keeps the tensor cores busy. The learning rate follows the MAE linear scaling rule with a warm-up.
- Mesh data=8 x fsdp=8: FSDP inside a node (NVLink carries the per-layer all-gathers and gradient
  reduce-scatters), data parallel across nodes (only one gradient all-reduce of the 1/8 shards per
  step goes over InfiniBand). Params + AdamW moments: 13.7 GB / 8 = 1.7 GB per GPU.
Measured (one H200, this per-GPU program with the state unsharded, benchmarks/RESULTS.md §6):
259.8 ms/step = 246 samples/s per GPU (19.1% MFU), peak 48.4 GiB; `python -m benchmarks.accelerator_step
--config configs/mae_vit_g_h100x64.py --per-device-batch 64`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

GPUS = 64
PER_DEVICE_BATCH = 64
GRAD_ACCUM = 2


def get_config(arg=None):
  c = common.mae_config("g", arg)
  recipe_batch = c.batch_size
  c.batch_size = GPUS * PER_DEVICE_BATCH
  c.schedule.base_lr = c.schedule.base_lr * c.batch_size / recipe_batch
  c.schedule.warmup_epochs = max(c.schedule.get("warmup_epochs", 0), 20)
  c.grad_accum = GRAD_ACCUM
  c.model.remat = "none"
  c.model.scan = True
  c.mesh = common.ml_collections.ConfigDict({"data": 8, "fsdp": 8, "tensor": 1})
  c.checkpoint.every_steps = 1000
  return c
