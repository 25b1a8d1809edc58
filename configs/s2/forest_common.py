"""Shared builder of the forest-monitoring evaluation configs in configs/s2/forest_*.py.

Each file fixes the model, the stem, the target and the loss; everything else comes from
fmjax.evaluate.forest_compare.forest_config and can be overridden after ':' or with --config.KEY:
  python -m fmjax.main --config=configs/s2/forest_unet_resnet18.py:dataset=DIR,epochs=100 \
      --workdir=runs/forest_rn18 --config.init_from=runs/s2_moco_rn18
Metrics: accuracy, IoU of the tree class, mean IoU, boundary F1 (and MAE/RMSE for density).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def forest(model: str, detail_stem: bool = False, target: str = "mask", loss: str = "ce", arg=None):
  from fmjax.evaluate.forest_compare import forest_config
  return forest_config(model, detail_stem=detail_stem, target=target, loss=loss, arg=arg)
