"""DINO pretraining of SpecViT-H/4 on SpectralEarth: configs/dino_vit_s.py's recipes, only the model differs."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.dino_vit_s import dino_config  # noqa: E402


def get_config(arg=None):
  return dino_config("spec_vit_h", arg)
