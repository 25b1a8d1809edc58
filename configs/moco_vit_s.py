"""MoCo-v2 pretraining of SpecViT-S/4 on SpectralEarth (also home of `moco_config`, shared by moco_*.py).

  python -m fmjax.main --config=configs/moco_vit_s.py:data_dir=DIR --workdir=runs/moco_s

recipe=spectral_earth (default), the official SpectralEarth code: projector Linear(no bias) 2048 BN ReLU
  Linear(no bias) 128 BN; InfoNCE temperature 0.1, memory bank of 32,768 keys, key encoder EMA 0.999;
  q from one timestamp, k from another; SGD lr 1e-3 momentum 0.9 wd 1e-4, x0.1 at epochs 60 and 80,
  100 epochs, batch 256.
recipe=paper (MoCo-v2, Chen et al. 2020): queue 65,536, temperature 0.2, SGD lr 0.03 * B / 256, cosine,
  200 epochs.
The queue size must be a multiple of the global batch size (checked at start-up).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402

MOCO_RECIPES = ("spectral_earth", "paper")


def moco_config(model: str, arg=None):
  a = common.parse_arg(arg, recipe="spectral_earth", patch=4, data_dir="")
  if a.recipe not in MOCO_RECIPES:
    raise ValueError(f"recipe={a.recipe!r} is not known; valid choices: {MOCO_RECIPES}")
  c = common.get_config()
  c.model.name = model
  c.model.patch_size = a.patch
  c.data.dir = a.data_dir
  c.data.crop_size = 128
  c.data.num_bands = 202
  c.data.aug.scale = (0.2, 1.0)
  c.data.aug.hflip = 0.5
  c.data.aug.vflip = 0.5
  c.data.aug.blur_prob = 0.5
  c.objective = common.ml_collections.ConfigDict(dict(
      name="moco", queue_size=32768, dim=128, hidden_dim=2048, temperature=0.1, momentum=0.999,
      momentum_schedule="constant"))
  c.batch_size = 256
  c.epochs = 100
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.base_lr = 1e-3
  c.schedule.boundaries = (0.6, 0.8)    # epochs 60 and 80 of 100
  c.schedule.decay_factor = 0.1
  if a.recipe == "paper":
    c.objective.queue_size = 65536
    c.objective.temperature = 0.2
    c.schedule.name = "cosine"
    c.schedule.base_lr = 0.03 * c.batch_size / 256
    c.epochs = 200
  c.checkpoint.every_steps = 2000
  return c


def get_config(arg=None):
  return moco_config("spec_vit_s", arg)
