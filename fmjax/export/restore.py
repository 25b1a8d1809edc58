"""Read only the backbone out of a pretraining checkpoint (no optimiser state, no decoder/heads).

`fmjax.checkpoint.load_backbone` restores the whole train state (parameters + AdamW moments + EMA
teachers: 3-5x the backbone) and then picks the backbone. For export of big models that is wasted
host memory, so this module asks the objective *which* leaves its `backbone_variables` picks (by
passing it a tree of path markers instead of arrays) and restores just those with Orbax's partial
restore onto one host device. Should an objective compute on the leaves instead of only selecting
them, it falls back to `load_backbone`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax import checkpoint as checkpoint_lib


class _Marker:
  """A leaf standing for one state path (opaque to jax.tree: registered as a leaf by being a plain object)."""
  __slots__ = ("path",)

  def __init__(self, path):
    self.path = path


def _to_dict(tree) -> Any:
  if hasattr(tree, "keys"):
    return {k: _to_dict(tree[k]) for k in tree.keys()}
  return tree


def _key(entry):
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey (optimiser tuples), GetAttrKey
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"unknown tree key {entry!r}")


def backbone_paths(objective, metadata) -> Any:
  """The tree backbone_variables returns, with _Marker leaves naming state paths."""
  markers = jax.tree_util.tree_map_with_path(lambda p, _: _Marker(tuple(_key(k) for k in p)), _to_dict(metadata))
  variables = {"params": markers["params"], **markers.get("model_state", {})}
  return objective.backbone_variables(variables, markers.get("objective_state"))


class LazyLeaf:
  """A checkpoint array read on first use (`load()`); has .shape/.dtype for planning."""
  __slots__ = ("path", "shape", "dtype", "source")

  def __init__(self, path, shape, dtype, source):
    self.path, self.shape, self.dtype, self.source = path, tuple(shape), dtype, source

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def load(self) -> np.ndarray:
    return self.source.load(self)


class LazyCheckpoint:
  """Reads backbone leaves group by group (<= budget_bytes per Orbax call) in the order the
  exporter consumes them, keeping only the current group in memory: a ViT-g exports with a few
  hundred MB of host memory. Leaves used more than once (scanned stacks: one slice per layer) are
  kept once loaded."""

  def __init__(self, state_dir: str, budget_bytes: int = 512 << 20):
    self.state_dir, self.budget = state_dir, int(budget_bytes)
    self.order: list[LazyLeaf] = []
    self.keep: set = set()
    self.cache: dict = {}
    self.calls = 0
    self.device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

  def set_order(self, leaves: list[LazyLeaf]) -> None:
    seen, order = set(), []
    for leaf in leaves:
      if leaf.path in seen:
        self.keep.add(leaf.path)
      else:
        seen.add(leaf.path)
        order.append(leaf)
    self.order = order

  def load(self, leaf: LazyLeaf) -> np.ndarray:
    if leaf.path not in self.cache:
      start = next((i for i, x in enumerate(self.order) if x.path == leaf.path), None)
      group, size = [leaf], leaf.nbytes
      for nxt in (self.order[start + 1:] if start is not None else ()):
        if size + nxt.nbytes > self.budget or nxt.path in self.cache:
          break
        group.append(nxt)
        size += nxt.nbytes
      self.cache = {p: v for p, v in self.cache.items() if p in self.keep}
      self.cache.update(self._restore(group))
    return self.cache[leaf.path]

  def _restore(self, group: list[LazyLeaf]) -> dict:
    item: dict = {}
    for leaf in group:
      node = item
      for key in leaf.path[:-1]:
        node = node.setdefault(key, {})
      node[leaf.path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self.device)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=self.device), item)
    with checkpoint_lib.state_item_checkpointer(ocp.PyTreeCheckpointer) as ckptr:
      restored = ckptr.restore(self.state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                           partial_restore=True))
    self.calls += 1
    out = {}
    for leaf in group:
      node = restored
      for key in leaf.path:
        node = node[key]
      out[leaf.path] = np.asarray(jax.device_get(node))
    return out


def _select(path: str):
  """(config, selected marker tree, metadata, state_dir) or None when the objective computes on leaves."""
  from fmjax.objectives import build_objective
  config = checkpoint_lib.read_config(path)
  state_dir = os.path.join(checkpoint_lib.resolve_step_dir(path), "state")
  with checkpoint_lib.state_item_checkpointer(ocp.PyTreeCheckpointer) as ckptr:
    metadata = ckptr.metadata(state_dir)
  metadata = _to_dict(metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata)
  try:
    selected = backbone_paths(build_objective(config), metadata)
    leaves = jax.tree.leaves(selected, is_leaf=lambda x: isinstance(x, _Marker))
    if not leaves or not all(isinstance(x, _Marker) for x in leaves):
      raise TypeError("backbone_variables did not only select leaves")
  except Exception as e:  # an objective that computes on leaves: the caller reads everything instead
    logging.warning("partial restore not possible (%s: %s); restoring the whole state", type(e).__name__, e)
    return None
  return config, selected, metadata, state_dir


def _meta_at(metadata, path):
  node = metadata
  for key in path:
    node = node[key]
  return node


def load_backbone_lazy(path: str, budget_bytes: int = 512 << 20):
  """(config, backbone variables whose leaves are LazyLeaf, LazyCheckpoint) - nothing read yet."""
  picked = _select(path)
  if picked is None:
    config, variables = checkpoint_lib.load_backbone(path)
    return config, variables, None
  config, selected, metadata, state_dir = picked
  source = LazyCheckpoint(state_dir, budget_bytes)

  def lazy(marker):
    meta = _meta_at(metadata, marker.path)
    return LazyLeaf(marker.path, meta.shape, meta.dtype, source)

  return config, jax.tree.map(lazy, selected, is_leaf=lambda x: isinstance(x, _Marker)), source


def load_backbone_partial(path: str):
  """(config, backbone variables as host numpy) reading only the backbone's leaves (in one go)."""
  config, variables, source = load_backbone_lazy(path, budget_bytes=1 << 62)
  if source is None:
    return config, variables
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, LazyLeaf))
  source.set_order(leaves)
  return config, jax.tree.map(lambda leaf: leaf.load(), variables, is_leaf=lambda x: isinstance(x, LazyLeaf))
