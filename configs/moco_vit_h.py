"""MoCo-v2 pretraining of SpecViT-H/4 on SpectralEarth: configs/moco_vit_s.py's recipes, only the model differs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.moco_vit_s import moco_config  # noqa: E402


def get_config(arg=None):
  return moco_config("spec_vit_h", arg)
