"""DINO pretraining of SpecResNet-50 on SpectralEarth: configs/dino_vit_s.py's recipes with the ResNet.

ResNets take any crop size, so recipe=paper's local crops work here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.dino_vit_s import dino_config  # noqa: E402


def get_config(arg=None):
  c = dino_config("spec_resnet50", arg)
  del c.model["patch_size"], c.model["remat"]   # ViT-only options
  return c
