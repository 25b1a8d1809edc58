"""MoCo-v2 pretraining of a 13-band ResNet-18 on SSL4EO-S12 (seasonal positives, 224 crops of 264 patches).

  python -m fmjax.main --config=configs/s2/moco_resnet18.py:data_dir=DIR --workdir=runs/s2_moco_rn18
  python -m fmjax.main --config=configs/s2/moco_resnet18.py:data_dir=DIR,recipe=paper,norm=scale10000 ...
See configs/moco_vit_s.py for the recipes and configs/s2/s2_common.py for the S2 options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.moco_vit_s import moco_config  # noqa: E402
from configs.s2 import s2_common  # noqa: E402

MODEL = "resnet18"


def get_config(arg=None):
  s2, rest = s2_common.split_arg(arg)
  return s2_common.apply_s2(moco_config(MODEL, rest), s2, MODEL)
