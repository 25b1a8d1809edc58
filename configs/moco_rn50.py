"""MoCo-v2 pretraining of SpecResNet-50 on SpectralEarth: configs/moco_vit_s.py's recipes with the ResNet."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.moco_vit_s import moco_config  # noqa: E402


def get_config(arg=None):
  c = moco_config("spec_resnet50", arg)
  del c.model["patch_size"], c.model["remat"]   # ViT-only options
  return c
