"""Evaluation configs: `eval_config(task, protocol)` is what configs/eval/<task>_<protocol>.py return.

Defaults follow the official SpectralEarth downstream recipe: AdamW lr 1e-3 with cosine decay,
100 epochs, best-val checkpoint for test; frozen encoder with train-mode BatchNorm (bn_mode).
Override anything on the command line, e.g.
  python -m fmjax.main --config=configs/eval/cdl_frozen.py --workdir=/tmp/cdl \
      --config.init_from=/ckpt/mae_vit_s --config.dataset=/data/fmjax/cdl
"""
from __future__ import annotations

import ml_collections

from fmjax.evaluate.protocols import PROTOCOLS

# task -> (default dataset directory, official batch size)
TASKS = {
    "corine": ("data/downstream/corine", 64),
    "cdl": ("data/downstream/cdl", 16),
    "nlcd": ("data/downstream/nlcd", 16),
    "synthetic_seg": ("data/downstream/synthetic_seg", 16),
    "synthetic_cls": ("data/downstream/synthetic_cls", 16),
    "custom": ("", 32),
}


def eval_config(task: str, protocol: str, arg: str | None = None) -> ml_collections.ConfigDict:
  if task not in TASKS:
    raise ValueError(f"evaluation task {task!r}; valid choices: {sorted(TASKS)}")
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r}; valid choices: {PROTOCOLS}")
  dataset, batch_size = TASKS[task]
  c = ml_collections.ConfigDict()
  c.task = "evaluate"
  c.eval_task = task
  c.dataset = dataset              # directory written by data_prep.downstream
  c.protocol = protocol            # frozen | adapter | finetune | linear
  c.init_from = ""                 # pretraining workdir or checkpoint step dir; '' = random init
  # Backbone when init_from is empty (or to override the checkpoint's; must then fit it).
  c.model = ml_collections.ConfigDict({"name": ""})
  c.bn_mode = "train"              # frozen protocol: 'train' (official) or 'eval' BatchNorm
  c.epochs = 100
  c.batch_size = batch_size
  c.lr = 1e-3
  c.weight_decay = 0.01
  c.warmup_epochs = 0
  c.layer_decay = 1.0              # finetune: < 1 gives layer-wise lr decay (e.g. 0.75)
  c.loss = "auto"                  # auto (bce / ce) | bce | ce | boundary_ce
  c.boundary_weight = 5.0
  c.head_channels = 256
  c.label_fraction = 1.0
  c.seed = 0
  c.eval_every = 1
  c.ap_bins = 1000
  c.band_mean = None               # None: the train split's statistics from downstream.json
  c.band_std = None
  # Keep decoded float32 samples in host memory: right for small sets; the official ones at 128 px
  # (CDL ~21 GB, CORINE ~145 GB as float32) re-read their records each epoch instead.
  c.cache = task in ("synthetic_seg", "synthetic_cls", "custom")
  c.tensorboard = True
  c.num_examples = 4               # test examples drawn into predictions.png
  c.mesh = ml_collections.ConfigDict({"data": -1})
  if arg:                          # e.g. get_config('epochs=5,batch_size=8')
    for item in arg.split(","):
      key, _, value = item.partition("=")
      c[key] = type(c[key])(value) if c[key] is not None else value
  return c
