"""MAE pretraining of SpecViT-S/4 on SpectralEarth. See configs/common.py:mae_config for the recipes.

  python -m fmjax.main --config=configs/mae_vit_s.py:data_dir=/data/spectral_earth --workdir=runs/mae_vit_s
  python -m fmjax.main --config=configs/mae_vit_s.py:recipe=paper,data_dir=... --workdir=...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config(arg=None):
  return common.mae_config("s", arg)
