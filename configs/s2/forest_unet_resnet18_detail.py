"""Forest monitoring: UNet on ResNet-18 with the detail-preserving stem, tree mask, cross-entropy."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.s2.forest_common import forest  # noqa: E402


def get_config(arg=None):
  return forest("resnet18", detail_stem=True, target="mask", loss="ce", arg=arg)
