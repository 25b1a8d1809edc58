"""DINO pretraining of SpecViT-S/4 on SpectralEarth (also home of `dino_config`, shared by dino_*.py).

  python -m fmjax.main --config=configs/dino_vit_s.py:data_dir=DIR --workdir=runs/dino_s
  python -m fmjax.main --config=configs/dino_vit_s.py:recipe=paper,data_dir=DIR --workdir=...

recipe=spectral_earth (default), the official SpectralEarth code: head 2048-2048-256 -> 128 with the
  weight-normalised last layer's g fixed to 1; student temp 0.1, teacher temp 0.04, centre momentum 0.9;
  teacher EMA cosine 0.996 -> 1; two global 128 crops = two timestamps (scale 0.05-1, blur p 0.5, flips),
  no local crops; AdamW lr 1e-3 wd 1e-5, 20 warm-up epochs then cosine, 100 epochs, batch 256.
recipe=paper (Caron et al. 2021): head out 65536; teacher temp 0.04 -> 0.07 over 30 epochs; 8 local crops
  (48 px at 128 input, scale 0.05-0.4; global scale 0.4-1); AdamW lr 5e-4 * B / 256, 10 warm-up epochs,
  wd 0.04 -> 0.4 cosine. Local crops need a backbone that accepts their size (ResNets; the fixed-size ViT
  position embedding does not, so ViTs get local=0 by default).
Both: per-tensor gradient clipping 3.0, last layer frozen during epoch 0 (official defaults).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

DINO_RECIPES = ("spectral_earth", "paper")


def dino_config(model: str, arg=None):
  a = common.parse_arg(arg, recipe="spectral_earth", patch=4, data_dir="", local=-1)
  if a.recipe not in DINO_RECIPES:
    raise ValueError(f"recipe={a.recipe!r} is not known; valid choices: {DINO_RECIPES}")
  c = common.get_config()
  c.model.name = model
  c.model.patch_size = a.patch
  c.data.dir = a.data_dir
  c.data.crop_size = 128
  c.data.num_bands = 202
  c.data.aug.scale = (0.05, 1.0)
  c.data.aug.hflip = 0.5
  c.data.aug.vflip = 0.5
  c.data.aug.blur_prob = 0.5
  c.objective = common.ml_collections.ConfigDict(dict(
      name="dino", out_dim=128, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
      student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
      center_momentum=0.9, momentum_teacher=0.996, local_views=0, freeze_last_layer_epochs=1,
      clip_grad=3.0, weight_decay_end=-1.0, steps_per_epoch=0, eval_encoder="teacher"))
  c.batch_size = 256
  c.epochs = 100
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 1e-5
  c.optimizer.grad_clip_norm = 0.0      # DINO clips per tensor (objective.clip_grad), not by global norm
  c.schedule.name = "cosine"
  c.schedule.base_lr = 1e-3
  c.schedule.warmup_epochs = 20
  if a.recipe == "paper":
    c.objective.out_dim = 65536
    c.objective.warmup_teacher_temp = 0.04
    c.objective.teacher_temp = 0.07
    c.objective.warmup_teacher_temp_epochs = 30
    # The ViT's position embedding is fixed to the global crop size: local crops only for ResNets.
    c.objective.local_views = 0 if "vit" in model else 8
    c.objective.weight_decay_end = 0.4
    c.data.aug.scale = (0.4, 1.0)
    c.data.local.size = 48
    c.data.local.scale = (0.05, 0.4)
    c.optimizer.weight_decay = 0.04
    c.schedule.base_lr = 5e-4 * c.batch_size / 256
    c.schedule.end_lr = 1e-6
    c.schedule.warmup_epochs = 10
  if a.local >= 0:
    c.objective.local_views = a.local
  c.checkpoint.every_steps = 2000
  return c


def get_config(arg=None):
  return dino_config("spec_vit_s", arg)
