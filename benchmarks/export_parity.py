"""Forward parity of exported weights: fmjax (JAX, jit) vs the official-layout PyTorch modules.

  python benchmarks/export_parity.py [--image-size 32] [--resnet]

Random parameters and BatchNorm running statistics (the same generator as tests/test_export_parity.py),
two random 202-band inputs, eval mode; prints the max abs difference per output and the output scale.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from fmjax.models import build_model  # noqa: E402
from tests.test_export_parity import compare, export_to_torch, random_variables  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--resnet", action="store_true", help="also SpecResNet-50 (+ dilated); slower to compile")
  args = parser.parse_args()
  size = args.image_size
  cases = [("spec_vit_s", dict(patch_size=4)), ("spec_vit_s", dict(patch_size=16)),
           ("spec_vit_s", dict(patch_size=8, scan=True))]
  if args.resnet:
    cases += [("spec_resnet50", {}), ("spec_resnet50_dilated", {})]
  x = np.random.RandomState(0).randn(2, size, size, 202).astype(np.float32)
  print(f"{'model':<40}{'embedding':>12}{'tokens/features':>17}{'logits':>12}{'|embedding|max':>16}{'s':>6}")
  for name, kw in cases:
    t = time.perf_counter()
    model = build_model(name, image_size=size, num_classes=7, **kw)
    variables = random_variables(model, seed=1)
    tm, _, _ = export_to_torch(variables, model, name)
    diffs, scale = compare(model, variables, tm, x)
    label = name + "".join(f" {k}={v}" for k, v in kw.items())
    inner = diffs.get("tokens", diffs.get("features"))
    print(f"{label:<40}{diffs['embedding']:>12.2e}{inner:>17.2e}{diffs['logits']:>12.2e}{scale:>16.2f}"
          f"{time.perf_counter() - t:>6.0f}")


if __name__ == "__main__":
  main()
