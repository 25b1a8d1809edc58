"""Flax variables <-> official state_dict arrays, driven by the key table of `mapping`.

Export is lazy: `ExportPlan.produce(i)` converts one tensor at a time (slicing one layer out of a
scanned stack on device before copying it to the host), so writers can stream big models.
Import checks the incoming state_dict against the table and reports every missing key, unexpected
key and shape mismatch by name before building anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np

from fmjax.export import mapping
from fmjax.export.mapping import Entry, MappingError


def _sincos_table(torch_shape: tuple[int, ...]) -> np.ndarray:
  """The fixed MAE position table for a model trained with sincos_pos_embed=True ([1, 1+N, D])."""
  from fmjax.models.layers import sincos_2d
  _, tokens, width = torch_shape
  grid = math.isqrt(tokens - 1)
  return sincos_2d(width, grid, cls_token=True)[None].astype(np.float32)


def _is_head(entry: Entry) -> bool:
  return entry.torch_key.startswith(("vit_core.head.", "resnet.fc."))


@dataclasses.dataclass
class ExportPlan:
  """What will be written: entries in state_dict order and how to make each tensor."""
  entries: list[Entry]
  variables: Mapping[str, Any]
  step: int = 0
  generated: tuple[str, ...] = ()   # keys not read from the variables (sin-cos pos_embed)

  @property
  def specs(self) -> list[tuple[str, tuple[int, ...], str]]:
    return [(e.torch_key, e.torch_shape, e.torch_dtype) for e in self.entries]

  def produce(self, i: int) -> np.ndarray:
    e = self.entries[i]
    if e.kind == "counter":
      return np.asarray(self.step, dtype=e.torch_dtype)
    if e.torch_key in self.generated:
      return _sincos_table(e.torch_shape)
    leaf = mapping.get_leaf(self.variables, e.flax_path)
    if hasattr(leaf, "load"):  # restore.LazyLeaf: read from the checkpoint now (grouped, in this order)
      leaf = leaf.load()
    if e.layer is not None:
      leaf = leaf[e.layer]     # slice the scanned stack before the host copy
    value = np.asarray(jax.device_get(leaf))
    value = mapping.to_torch_layout(e.kind, value, e.torch_shape)
    if value.shape != e.torch_shape:
      raise MappingError(f"{e.torch_key}: Flax {'/'.join(e.flax_path)} gives shape {value.shape}, "
                         f"the official module has {e.torch_shape}")
    return value.astype(e.torch_dtype, copy=False)

  def lazy_leaves_in_order(self) -> list:
    """The lazily read leaves (restore.LazyLeaf) in the order produce() will ask for them."""
    out = []
    for e in self.entries:
      if e.flax_path is not None and e.torch_key not in self.generated:
        leaf = mapping.get_leaf(self.variables, e.flax_path)
        if hasattr(leaf, "load"):
          out.append(leaf)
    return out

  def state_dict(self) -> dict[str, np.ndarray]:
    """All tensors at once (tests, small models)."""
    return {e.torch_key: self.produce(i) for i, e in enumerate(self.entries)}


def plan_export(variables: Mapping[str, Any], table: list[Entry], *, step: int = 0,
                with_head: bool = False) -> ExportPlan:
  """Checks that `variables` fit the table both ways before anything is converted.

  Every table entry must find a Flax leaf of the right size (a missing learned `pos_embed` is
  regenerated when the model used the fixed sin-cos table), and every Flax parameter or batch
  statistic must be claimed by some entry, so nothing is silently dropped; the head is dropped
  on purpose unless with_head.
  """
  flat = {p: v for p, v in mapping.flatten(variables).items() if p[0] in ("params", "batch_stats")}
  head_paths = {e.flax_path for e in table if _is_head(e)}
  entries, generated, problems, used = [], [], [], set()
  for e in table:
    if _is_head(e) and not with_head:
      continue
    entries.append(e)
    if e.flax_path is None:
      continue
    if e.flax_path not in flat:
      if e.torch_key == "vit_core.pos_embed":
        generated.append(e.torch_key)
        continue
      problems.append(f"missing Flax leaf {'/'.join(e.flax_path)} for {e.torch_key} {e.torch_shape}")
      continue
    used.add(e.flax_path)
    shape = tuple(flat[e.flax_path].shape)
    if e.layer is not None:
      shape = shape[1:] if shape and shape[0] > e.layer else None
    if shape is None or math.prod(shape) != math.prod(e.torch_shape):
      problems.append(f"{'/'.join(e.flax_path)}{'' if e.layer is None else f'[{e.layer}]'} has shape {shape}, "
                      f"which does not fit {e.torch_key} {e.torch_shape}")
  if with_head and not any(_is_head(e) and e.flax_path in flat for e in entries):
    problems.append("--with-head was asked for but the variables hold no head (a pretraining checkpoint has "
                    "none; export a fine-tuned one or drop --with-head)")
  for path in flat:
    if path not in used and path not in head_paths:
      problems.append(f"Flax leaf {'/'.join(path)} {tuple(flat[path].shape)} has no official key")
  if problems:
    raise MappingError("the variables do not fit the official layout:\n  " + "\n  ".join(problems))
  return ExportPlan(entries, variables, step, tuple(generated))


# ---------------------------------------------------------------------------------------------------
# Import


@dataclasses.dataclass
class ImportReport:
  missing: list[str]
  unexpected: list[str]
  mismatched: list[str]
  notes: list[str]

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def __str__(self) -> str:
    lines = []
    for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                         ("shape mismatches", self.mismatched), ("notes", self.notes)):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {x}" for x in items]
    return "\n".join(lines) or "all keys match"


class ImportMismatchError(ValueError):
  def __init__(self, report: ImportReport):
    super().__init__("the state_dict does not fit the model:\n" + str(report))
    self.report = report


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], table: list[Entry],
                            abstract_variables: Mapping[str, Any], *, strict: bool = True) -> tuple[dict, ImportReport]:
  """Official state_dict -> Flax variables ({'params', 'batch_stats'} of numpy arrays) shaped like
  `abstract_variables` (e.g. `jax.eval_shape(model.init, ...)`, unboxed). Head keys are used when
  the model has a head and reported as unexpected otherwise. Raises ImportMismatchError (strict)."""
  flat_abstract = {p: v for p, v in mapping.flatten(abstract_variables).items() if p[0] in ("params", "batch_stats")}
  table_keys = {e.torch_key for e in table}
  report = ImportReport([], sorted(set(state_dict) - table_keys, key=mapping.natural_key), [], [])
  stacked: dict[mapping.Path, dict[int, np.ndarray]] = {}
  out: dict = {}
  reported: set[mapping.Path] = set()   # Flax leaves whose key is already listed as missing/mismatched
  for e in table:
    if e.flax_path is None:      # num_batches_tracked: Flax keeps no counter
      if e.torch_key not in state_dict:
        report.notes.append(f"{e.torch_key} absent (fine: Flax does not use it)")
      continue
    target = flat_abstract.get(e.flax_path)
    if target is None:
      if e.torch_key in state_dict:
        if e.torch_key == "vit_core.pos_embed":
          _check_sincos(state_dict[e.torch_key], e, report)
        else:
          report.unexpected.append(f"{e.torch_key} (the model has no {'/'.join(e.flax_path)})")
      continue
    if e.torch_key not in state_dict:
      report.missing.append(f"{e.torch_key} {e.torch_shape}")
      reported.add(e.flax_path)
      continue
    value = np.asarray(state_dict[e.torch_key])
    if tuple(value.shape) != e.torch_shape:
      report.mismatched.append(f"{e.torch_key}: file has {tuple(value.shape)}, the model needs {e.torch_shape}")
      reported.add(e.flax_path)
      continue
    shape = tuple(target.shape[1:]) if e.layer is not None else tuple(target.shape)
    converted = mapping.to_flax_layout(e.kind, value, shape).astype(np.dtype(target.dtype), copy=False)
    if e.layer is None:
      mapping.set_leaf(out, e.flax_path, converted)
    else:
      stacked.setdefault(e.flax_path, {})[e.layer] = converted
  for path, layers in stacked.items():
    depth = flat_abstract[path].shape[0]
    if sorted(layers) == list(range(depth)):
      mapping.set_leaf(out, path, np.stack([layers[i] for i in range(depth)]))
  filled = mapping.flatten(out)
  for path in flat_abstract:
    if path not in filled and path not in reported:
      report.missing.append(f"(no official key fills Flax leaf {'/'.join(path)})")
  if strict and not report.ok:
    raise ImportMismatchError(report)
  return out, report


def _check_sincos(value: np.ndarray, e: Entry, report: ImportReport) -> None:
  """A model with the fixed sin-cos table can take a state_dict only if its pos_embed is that table."""
  if tuple(value.shape) != e.torch_shape:
    report.mismatched.append(f"{e.torch_key}: file has {tuple(value.shape)}, the model needs {e.torch_shape}")
    return
  table = _sincos_table(e.torch_shape)
  diff = float(np.max(np.abs(value.astype(np.float32) - table)))
  if diff > 1e-5:
    report.unexpected.append(f"{e.torch_key} (learned, max |diff| {diff:.3g} from the sin-cos table, but the model "
                             f"uses fixed sin-cos positions: build it with sincos_pos_embed=False)")
  else:
    report.notes.append(f"{e.torch_key} equals the fixed sin-cos table the model computes itself")
