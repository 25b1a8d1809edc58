"""MAE pretraining of ViT-S/16 on the raw 13 Sentinel-2 bands of SSL4EO-S12 (one season per sample, 224 crops).

  python -m fmjax.main --config=configs/s2/mae_vit_s.py:data_dir=DIR --workdir=runs/s2_mae_vit_s
No spectral adapter (it needs >= 75 bands); the MAE target is the normalised 13-band input.
See configs/common.py:mae_config for the recipes and configs/s2/s2_common.py for the S2 options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402
from configs.s2 import s2_common  # noqa: E402


def get_config(arg=None):
  s2, rest = s2_common.split_arg(arg)
  return s2_common.apply_s2(common.mae_config("s", rest), s2, "spec_vit_s")
