"""MAE pretraining of SpecViT-g/4 on a TPU v5p-256 slice (128 chips, 95 GiB HBM each; one JAX device
per chip). Derived from `python -m fmjax.plan` numbers: see benchmarks/RESULTS.md and docs/scale.md.

  python -m fmjax.main --config=configs/mae_vit_g_v5p256.py:data_dir=gs://BUCKET/spectral_earth \
      --workdir=gs://BUCKET/runs/mae_vit_g_v5p256
  # check it before paying for the slice (fake CPU devices, ~5 min):
  python -m fmjax.plan --config=configs/mae_vit_g_v5p256.py --devices 128 --mesh data=4,fsdp=32,tensor=1 \
      --device-memory 95GiB --per-device-batch 32

Choices:
- Global batch 4096 = 32 per chip. The SpectralEarth recipe's 256 would be 2 samples per chip, far too
  few to keep the MXUs busy; 4096 is the MAE paper's batch. The learning rate follows the MAE linear
  scaling rule (base lr x batch / 256) with a warm-up, as large-batch MAE needs.
- Mesh data=4 x fsdp=32: params + AdamW moments are 13.7 GB in total, 0.43 GB per chip sharded 32 ways,
  so more FSDP buys no memory worth having; fsdp <= 32 also keeps the spectral adapter's 32-channel
  convolution divisible (fsdp=64/128 fails in fmjax/train_state.py with IndivisibleError).
- remat 'none': with 32 samples per chip the plan's peak stays well under 95 GiB, and recomputation
  would cost FLOPs for nothing. scan=True keeps the compile short (the 40 blocks compile once).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

CHIPS = 128
PER_DEVICE_BATCH = 32


def get_config(arg=None):
  c = common.mae_config("g", arg)
  recipe_batch = c.batch_size
  c.batch_size = CHIPS * PER_DEVICE_BATCH
  c.schedule.base_lr = c.schedule.base_lr * c.batch_size / recipe_batch
  c.schedule.warmup_epochs = max(c.schedule.get("warmup_epochs", 0), 20)
  c.grad_accum = 1
  c.model.remat = "none"
  c.model.scan = True
  c.mesh = common.ml_collections.ConfigDict({"data": 4, "fsdp": 32, "tensor": 1})
  c.checkpoint.every_steps = 1000
  return c
