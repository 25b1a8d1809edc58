"""The key table between fmjax (Flax) variables and the official PyTorch state_dict.

One `Entry` per state_dict key says where the value lives in the Flax variables and how its layout
differs. The table is derived from the official-layout torch module itself (`torch_modules`), so
every official key is covered by construction; only the name translation torch module -> Flax
module is written by hand (`_flax_module_path`).

Layout conversions (all exact reshapes/transposes, so a round trip is bit-exact):
  linear        torch (out, in)          <- Flax kernel (in..., out...)   (Dense / DenseGeneral)
  conv          torch (O, I, *spatial)   <- Flax kernel (*spatial, I, O)  (Conv2d; Conv3d (k,1,1)
                                            adapter kernels stored as (k, I, O) or (k*I, O))
  copy          same values, possibly reshaped (norm scales/biases, cls token, pos_embed, stats)
  counter       BatchNorm num_batches_tracked: Flax keeps no counter; exported as the train step
Scanned blocks (`nn.scan`, leading 'layers' axis) are sliced per layer on export and stacked on import.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping

import numpy as np
from torch import nn as tnn

from fmjax.export import torch_modules

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  flax_path: Path | None       # (collection, module..., leaf); None for generated values (counter)
  kind: str                    # 'linear' | 'conv' | 'copy' | 'counter'
  torch_shape: tuple[int, ...]
  torch_dtype: str             # numpy dtype name of the torch tensor
  layer: int | None = None     # index along a scanned leading axis of the Flax leaf


class MappingError(ValueError):
  """Flax variables that do not fit the official layout (missing leaves, wrong shapes)."""


# ---------------------------------------------------------------------------------------------------
# Layout transforms (numpy; no copies beyond what the transpose needs).


def to_torch_layout(kind: str, value: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
  if kind == "linear":
    out_features, in_features = torch_shape
    return np.ascontiguousarray(value.reshape(in_features, out_features).T)
  if kind == "conv":
    c_out, c_in, *spatial = torch_shape
    nd = len(spatial)
    kernel = value.reshape(tuple(spatial) + (c_in, c_out))
    return np.ascontiguousarray(kernel.transpose((nd + 1, nd) + tuple(range(nd))))
  if kind == "copy":
    return np.ascontiguousarray(value.reshape(torch_shape))
  raise ValueError(f"unknown layout kind {kind!r}; valid: linear, conv, copy")


def to_flax_layout(kind: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(value.T.reshape(flax_shape))
  if kind == "conv":
    nd = value.ndim - 2
    return np.ascontiguousarray(value.transpose(tuple(range(2, nd + 2)) + (1, 0)).reshape(flax_shape))
  if kind == "copy":
    return np.ascontiguousarray(value.reshape(flax_shape))
  raise ValueError(f"unknown layout kind {kind!r}; valid: linear, conv, copy")


# ---------------------------------------------------------------------------------------------------
# Torch module name -> Flax module path.


def _adapter_path(index: int) -> Path:
  """spectral_adapter.{0,3,6} convs and {1,4,7} batch norms -> conv_0, bn_1, ... (Sequential indices)."""
  position = index % 3
  if position == 2 or index > 7:
    raise MappingError(f"spectral_adapter.{index} holds no parameters in the official layout")
  return ("spectral_adapter", f"conv_{index}" if position == 0 else f"bn_{index}")


def _flax_module_path(torch_module: str, scanned: Path | None) -> tuple[Path, int | None]:
  """(Flax module path without collection, scanned layer index or None) for a torch module name.

  scanned: None for unrolled blocks (encoder/blocks_i), else the module path of the scanned block
  stack (see `scanned_blocks_path`).
  """
  parts = torch_module.split(".")
  if parts[0] == "spectral_adapter":
    return _adapter_path(int(parts[1])), None
  if parts[0] == "vit_core":
    rest = parts[1:]
    if not rest:
      return ("vit_core",), None
    if rest[0] == "blocks":
      layer, inner = int(rest[1]), tuple(rest[2:])
      if scanned:
        return tuple(scanned) + inner, layer
      return ("vit_core", "encoder", f"blocks_{layer}") + inner, None
    if rest == ["patch_embed", "proj"]:
      return ("vit_core", "patch_embed"), None
    return ("vit_core",) + tuple(rest), None
  if parts[0] == "resnet":
    rest = parts[1:]
    if rest == ["fc"]:
      return ("fc",), None     # the Flax SpecResNet's classifier sits at the top level
    # layerL.j.{convK,bnK,downsample.{0,1}} -> layerL_j/{convK,bnK,downsample_conv,downsample_bn}
    layer, block, name = rest[0], int(rest[1]), rest[2:]
    if name[0] == "downsample":
      name = ["downsample_conv" if name[1] == "0" else "downsample_bn"]
    return ("resnet", f"{layer}_{block}", *name), None
  raise MappingError(f"no Flax counterpart known for torch module {torch_module!r}")


# ---------------------------------------------------------------------------------------------------
# The table.


def _module_entries(name: str, module: tnn.Module, scanned: Path | None) -> Iterator[Entry]:
  path, layer = _flax_module_path(name, scanned)

  def entry(suffix, flax, kind, tensor):
    return Entry(f"{name}.{suffix}", flax, kind, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                 layer)

  if isinstance(module, tnn.Linear):
    yield entry("weight", ("params",) + path + ("kernel",), "linear", module.weight)
    if module.bias is not None:
      yield entry("bias", ("params",) + path + ("bias",), "copy", module.bias)
  elif isinstance(module, (tnn.Conv2d, tnn.Conv3d)):
    yield entry("weight", ("params",) + path + ("kernel",), "conv", module.weight)
    if module.bias is not None:
      yield entry("bias", ("params",) + path + ("bias",), "copy", module.bias)
  elif isinstance(module, tnn.LayerNorm):
    yield entry("weight", ("params",) + path + ("scale",), "copy", module.weight)
    yield entry("bias", ("params",) + path + ("bias",), "copy", module.bias)
  elif isinstance(module, (tnn.BatchNorm2d, tnn.BatchNorm3d)):
    yield entry("weight", ("params",) + path + ("scale",), "copy", module.weight)
    yield entry("bias", ("params",) + path + ("bias",), "copy", module.bias)
    yield entry("running_mean", ("batch_stats",) + path + ("mean",), "copy", module.running_mean)
    yield entry("running_var", ("batch_stats",) + path + ("var",), "copy", module.running_var)
    yield entry("num_batches_tracked", None, "counter", module.num_batches_tracked)


def key_table(torch_model: tnn.Module, scanned: Path | None = None) -> list[Entry]:
  """Entries in the torch module's state_dict order (so exported files list keys like torch does).

  scanned: `scanned_blocks_path(variables)` when the Flax ViT was built with scan=True.
  """
  by_key: dict[str, Entry] = {}
  for name, module in torch_model.named_modules():
    holds_state = list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
    if name and holds_state and not isinstance(module, (torch_modules.VisionTransformer,)):
      for e in _module_entries(name, module, scanned):
        by_key[e.torch_key] = e
  for name, param in torch_model.named_parameters():
    if name.endswith(("cls_token", "pos_embed")):  # bare nn.Parameters of the ViT
      path, _ = _flax_module_path(name.rsplit(".", 1)[0], scanned)
      by_key[name] = Entry(name, ("params",) + path + (name.rsplit(".", 1)[1],), "copy", tuple(param.shape),
                           str(param.dtype).replace("torch.", ""))
  order = list(torch_model.state_dict().keys())
  missing = [k for k in order if k not in by_key]
  if missing:
    raise MappingError(f"key table misses torch keys {missing[:5]} (a module type without a rule)")
  return [by_key[k] for k in order]


def get_leaf(variables: Mapping[str, Any], path: Path):
  node = variables
  for i, part in enumerate(path):
    if not hasattr(node, "keys") or part not in node:
      have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
      raise KeyError(f"Flax variables have no {'/'.join(path[:i + 1])} (found at {'/'.join(path[:i]) or 'root'}: {have})")
    node = node[part]
  return node


def set_leaf(tree: dict, path: Path, value) -> None:
  node = tree
  for part in path[:-1]:
    node = node.setdefault(part, {})
  node[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path: leaf} of a nested mapping (Flax variables / FrozenDicts)."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, "keys"):
      out.update(flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


SCANNED_BLOCKS = ("vit_core", "encoder", "blocks")


def scanned_blocks_path(variables: Mapping[str, Any]) -> Path | None:
  """The module path of the scanned ViT block stack (leading 'layers' axis), or None when the
  blocks are unrolled. Works on real or abstract variables (any tree with .shape leaves)."""
  params = variables.get("params", variables)
  node = params
  for part in SCANNED_BLOCKS:
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  # nn.scan over a wrapper module adds one more level (e.g. blocks/block/attn); see through it.
  path = SCANNED_BLOCKS
  while hasattr(node, "keys") and len(node) == 1 and "attn" not in node:
    (only,) = node.keys()
    path, node = path + (str(only),), node[only]
  return path


def natural_key(key: str):
  """Sort key treating digit runs as numbers (blocks.10 after blocks.9)."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
