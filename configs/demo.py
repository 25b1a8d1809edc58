"""A tiny pretraining run that finishes in a few minutes on a laptop CPU (what `make demo` trains).

  python -m fmjax.main --config=configs/demo.py:data_dir=DIR --workdir=demo_out/run
  python -m fmjax.main --config=configs/demo.py:objective=mae,data_dir=DIR --workdir=...

Tiny SpecViT (width 64, depth 2, patch 8) on 32x32 crops of the 202-band synthetic archive.
`objective` picks the SSL method; each has a branch below (dino/moco are added by their area).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

OBJECTIVES = ("mae", "dino", "moco")


def get_config(arg=None):
  a = common.parse_arg(arg, objective="mae", data_dir="", steps=150, batch=16)
  if a.objective not in OBJECTIVES:
    raise ValueError(f"objective={a.objective!r} is not known; valid choices: {OBJECTIVES}")
  c = common.get_config()
  c.data.dir = a.data_dir
  c.data.crop_size = 32
  c.data.num_bands = 202
  if "aug" in c.data:
    c.data.aug.scale = (0.4, 1.0)
  c.model.name = "spec_vit"
  c.model.width = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.patch_size = 8
  c.model.dtype = "float32"   # bf16 is no faster than float32 on CPU (benchmarks/RESULTS.md §5)
  c.batch_size = a.batch
  c.total_steps = a.steps
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.05
  c.schedule.name = "cosine"
  c.schedule.base_lr = 1e-3
  c.schedule.warmup_steps = 10
  c.mesh = common.ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2
  c.log.every_steps = 10
  c.log.images_every = 50

  if a.objective == "mae":
    c.objective = common.ml_collections.ConfigDict(dict(
        name="mae", mask_ratio=0.75, norm_pix=True, decoder_width=64, decoder_depth=1, decoder_heads=4))
  # dino / moco: their branches set c.objective (and the optimizer/schedule they need) here.
  elif a.objective == "dino":
    # Small head, a faster teacher (0.99 -> 1 over a short run), schedules in steps (no epoch options).
    c.objective = common.ml_collections.ConfigDict(dict(
        name="dino", out_dim=256, hidden_dim=128, bottleneck_dim=64, norm_last_layer=True, student_temp=0.1,
        teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, center_momentum=0.9,
        momentum_teacher=0.99, local_views=0, freeze_last_layer_epochs=0, clip_grad=3.0, weight_decay_end=-1.0,
        steps_per_epoch=0, eval_encoder="teacher"))
    c.optimizer.weight_decay = 0.04
    c.schedule.base_lr = 5e-4
  elif a.objective == "moco":
    # Queue of 8 batches (K % batch == 0), AdamW instead of the recipe's SGD so a few minutes suffice.
    c.objective = common.ml_collections.ConfigDict(dict(
        name="moco", queue_size=8 * a.batch, dim=64, hidden_dim=128, temperature=0.2, momentum=0.99,
        momentum_schedule="constant"))
  else:
    raise NotImplementedError(f"demo objective {a.objective!r} has no config branch yet")
  return c
