"""DINO pretraining of ViT-S/16 on the raw 13 Sentinel-2 bands of SSL4EO-S12 (seasonal views, 224 crops).

  python -m fmjax.main --config=configs/s2/dino_vit_s.py:data_dir=DIR --workdir=runs/s2_dino_vit_s
The spectral adapter needs >= 75 bands, so the ViT patchifies the bands directly (use_adapter=False);
patch 16 gives a 14 x 14 token grid at 224. See configs/dino_vit_s.py and configs/s2/s2_common.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.dino_vit_s import dino_config  # noqa: E402
from configs.s2 import s2_common  # noqa: E402


def get_config(arg=None):
  s2, rest = s2_common.split_arg(arg)
  return s2_common.apply_s2(dino_config("spec_vit_s", rest), s2, "spec_vit_s")
