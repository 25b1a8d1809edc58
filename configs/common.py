"""The shared config structure for pretraining. Every pretraining config starts from `get_config()`.

Override anything on the command line: `--config.batch_size=512 --config.mesh.fsdp=8`.
"""
from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """config.data: the input pipeline's defaults (fmjax/data/defaults.py)."""
  from fmjax.data.defaults import default_config
  return default_config()


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.data = data_config()

  c.model = ml_collections.ConfigDict()
  c.model.name = "spec_vit_s"
  c.model.patch_size = 4          # the band count comes from data.num_bands, the image size from data.crop_size
  c.model.dtype = "bfloat16"     # compute dtype; parameters (master weights) stay float32
  c.model.scan = False           # scan over transformer blocks (fast compiles at depth 24-40)
  c.model.remat = "none"         # per-block rematerialisation policy: 'none' | 'full' | 'dots_saveable' | ... (fmjax.models.layers.REMAT_POLICIES)
  c.model.attention = "auto"     # cuDNN fused attention where supported (GPU, bf16), else XLA; or 'xla' | 'cudnn'

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "mae"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"     # 'adamw' | 'sgd'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9     # sgd
  c.optimizer.nesterov = False   # sgd
  c.optimizer.weight_decay = 0.01
  c.optimizer.decay_tokens = False  # decay cls / mask / position tokens too
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"     # 'cosine' | 'step' | 'constant'
  c.schedule.base_lr = 1e-4
  c.schedule.warmup_steps = 0
  c.schedule.end_lr = 0.0
  c.schedule.boundaries = (0.6, 0.8)  # step schedule: fractions of total steps (or absolute steps)
  c.schedule.decay_factor = 0.1

  c.batch_size = 256             # global batch (all hosts)
  c.grad_accum = 1               # micro-batches per step (batch_size / grad_accum per micro-batch)
  c.total_steps = 0              # > 0 wins over epochs
  c.epochs = 0

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.distributed = ml_collections.ConfigDict({"coordinator": "", "num_processes": 0, "process_id": -1})
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3, "async": True})
  c.log = ml_collections.ConfigDict({
      "every_steps": 50,
      "images_every": 0,          # objective images (MAE reconstructions) every K steps; 0: off
      "tensorboard": True,
      "profile_start_step": -1,   # profiler window [start, start + steps); writes <workdir>/profile
      "profile_steps": 0,
  })
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'key=value,key2=value2' (the text after ':' in --config=FILE:ARG) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must look like key=value; known keys: {sorted(defaults)}")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not known; valid keys: {sorted(defaults)}")
    default = defaults[key]
    out[key] = type(default)(value) if not isinstance(default, bool) else value.lower() in ("1", "true", "yes")
  return out


MAE_RECIPES = ("spectral_earth", "paper")


def mae_config(size: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """MAE pretraining of SpecViT-{size}/4 on SpectralEarth.

  recipe=spectral_earth (default): the official SpectralEarth code — mask 0.9, 1-block 512-wide
    decoder, AdamW lr 1e-4 wd 0.01, cosine over 200 epochs, batch 256, crops 128 (scale 0.4-1), flips.
  recipe=paper: He et al. — mask 0.75, 8-block decoder, AdamW (0.9, 0.95) wd 0.05,
    lr 1.5e-4 * B / 256, 40 warm-up epochs, 800 epochs.
  """
  a = parse_arg(arg, recipe="spectral_earth", patch=4, data_dir="")
  if a.recipe not in MAE_RECIPES:
    raise ValueError(f"recipe={a.recipe!r} is not known; valid choices: {MAE_RECIPES}")
  c = get_config()
  c.model.name = f"spec_vit_{size}"
  c.model.patch_size = a.patch
  c.data.dir = a.data_dir
  c.data.crop_size = 128
  c.data.num_bands = 202
  if "aug" in c.data:
    c.data.aug.scale = (0.4, 1.0)
    c.data.aug.hflip = 0.5
    c.data.aug.vflip = 0.5
  c.objective = ml_collections.ConfigDict(dict(
      name="mae", mask_ratio=0.9, norm_pix=True, decoder_width=512, decoder_depth=1, decoder_heads=16))
  c.batch_size = 256
  c.epochs = 200
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.01
  c.schedule.name = "cosine"
  c.schedule.base_lr = 1e-4
  c.schedule.warmup_epochs = 0
  if a.recipe == "paper":
    c.objective.mask_ratio = 0.75
    c.objective.decoder_depth = 8
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.05
    c.schedule.base_lr = 1.5e-4 * c.batch_size / 256
    c.schedule.warmup_epochs = 40
    c.epochs = 800
  c.log.images_every = 5000
  c.checkpoint.every_steps = 2000
  return c
