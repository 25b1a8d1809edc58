"""DINO pretraining of a 13-band ResNet-18 on SSL4EO-S12 (two seasons as the two global views, 224 crops).

  python -m fmjax.main --config=configs/s2/dino_resnet18.py:data_dir=DIR --workdir=runs/s2_dino_rn18
See configs/dino_vit_s.py for the recipes (recipe=paper adds local crops) and configs/s2/s2_common.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.dino_vit_s import dino_config  # noqa: E402
from configs.s2 import s2_common  # noqa: E402

MODEL = "resnet18"


def get_config(arg=None):
  s2, rest = s2_common.split_arg(arg)
  return s2_common.apply_s2(dino_config(MODEL, rest), s2, MODEL)
