"""Parameter counts per module, computed abstractly (jax.eval_shape: nothing is allocated, so even
spec_vit_g summarises on a laptop).

  python -m fmjax.models.summary --model spec_vit_s --patch-size 4
  python -m fmjax.models.summary --model spec_resnet50 --depth 3
  python -m fmjax.models.summary --model spec_vit --set width=64 --set depth=2 --set heads=2
"""
from __future__ import annotations

import argparse
import ast
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fmjax.models import MODEL_NAMES, build_model


def abstract_variables(model: nn.Module, batch: int = 1):
  """The model's variables as ShapeDtypeStructs (boxes with logical names kept)."""
  x = jax.ShapeDtypeStruct(model.input_shape(batch), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def param_counts(params, depth: int = 1) -> "OrderedDict[str, int]":
  """{module path (up to `depth` levels): parameter count}, in tree order."""
  counts: "OrderedDict[str, int]" = OrderedDict()
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  for path, leaf in flat:
    keys = [getattr(k, "key", str(k)) for k in path]
    prefix = "/".join(keys[:depth])  # a parameter shallower than `depth` is listed by its own name
    counts[prefix] = counts.get(prefix, 0) + int(np.prod(leaf.shape))
  return counts


def summarize(model: nn.Module, depth: int = 2) -> str:
  """Top-level modules, then (depth > 1) the breakdown `depth` levels deep, then the total."""
  variables = abstract_variables(model)
  sections = [param_counts(variables["params"], 1)]
  if depth > 1:
    sections.append(param_counts(variables["params"], depth))
  total = sum(sections[0].values())
  width = max(len(k) for c in sections for k in c) + 2
  lines = []
  for title, counts in zip(("top-level module", f"module (depth {depth})"), sections):
    lines.append(f"{title:<{width}}{'params':>15}{'share':>9}")
    for name, n in counts.items():
      lines.append(f"{name:<{width}}{n:>15,}{100 * n / total:>8.2f}%")
    lines.append("")
  lines.append(f"{'total':<{width}}{total:>15,}   ({total / 1e6:.2f}M)")
  other = {c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for c, v in variables.items() if c != "params"}
  for c, n in other.items():
    lines.append(f"(+ {n:,} values in collection '{c}')")
  return "\n".join(lines)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, choices=MODEL_NAMES)
  parser.add_argument("--patch-size", type=int, default=None, help="ViT token patch size (4, 8, 16)")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--num-bands", type=int, default=None)
  parser.add_argument("--depth", type=int, default=2, help="module-path depth of the breakdown")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any build_model override, e.g. --set num_classes=19")
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    if "=" not in item:
      parser.error(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    overrides[key] = _parse_value(value)
  if args.patch_size is not None:
    overrides["patch_size"] = args.patch_size
  if args.image_size is not None:
    overrides["image_size"] = args.image_size
  if args.num_bands is not None:
    overrides["num_bands"] = args.num_bands
  model = build_model(args.model, **overrides)
  print(f"{args.model} {overrides or ''}")
  print(summarize(model, args.depth))


if __name__ == "__main__":
  main()
