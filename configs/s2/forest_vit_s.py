"""Forest monitoring: ViT-S/16 (raw bands) with the token segmentation head, tree mask, cross-entropy."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.s2.forest_common import forest  # noqa: E402


def get_config(arg=None):
  return forest("spec_vit_s", detail_stem=False, target="mask", loss="ce", arg=arg)
