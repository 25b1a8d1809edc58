"""Forest monitoring: UNet on ResNet-50 (standard stem), tree mask, cross-entropy."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.s2.forest_common import forest  # noqa: E402


def get_config(arg=None):
  return forest("resnet50", detail_stem=False, target="mask", loss="ce", arg=arg)
