"""The objective protocol: everything the generic train loop needs from MAE, DINO or MoCo.

The loop (fmjax/train.py) knows nothing about a particular algorithm. It
  1. asks the objective which views the data pipeline must deliver (`views`),
  2. calls `init` under `jax.eval_shape` to learn the state's shapes and logical axes, then
     again under jit with those shardings so that parameters are born sharded,
  3. differentiates `loss` w.r.t. `variables['params']` only, applies the optimiser update, then
  4. calls `after_update` (EMA teachers, centres, queues live in `objective_state`).

State pytrees may contain `nn.LogicallyPartitioned` boxes (from `nn.with_logical_partitioning`);
the loop unboxes them after computing shardings.

Batch contract (from fmjax/data/pipeline.py): a dict with
  'image': [B, V, H, W, C] float (normalised) — V global views of one location (V=2: two
           different timestamps when the location has them),
  'local': [B, L, h, w, C] float — optional local crops (DINO multi-crop),
plus whatever extra keys a downstream task adds (labels).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """What an objective needs from the input pipeline per location."""
  global_views: int = 1   # 1: one view (MAE); 2: two views from two timestamps (MoCo, DINO)
  local_views: int = 0    # DINO multi-crop local views


@dataclasses.dataclass
class LossOutput:
  loss: jax.Array
  metrics: Mapping[str, jax.Array]    # scalars, logged as-is (already averaged over the batch)
  model_state: PyTree                 # new non-parameter collections (e.g. batch_stats)
  objective_state: PyTree             # e.g. DINO centre after this batch


jax.tree_util.register_dataclass(LossOutput, data_fields=["loss", "metrics", "model_state", "objective_state"],
                                 meta_fields=[])


class Objective(Protocol):
  name: str
  views: ViewSpec

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[PyTree, PyTree]:
    """Returns (variables, objective_state). variables = {'params': ..., other collections}."""

  def loss(self, variables: PyTree, objective_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array) -> LossOutput:
    """The training loss. Differentiated w.r.t. variables['params'] only."""

  def after_update(self, variables: PyTree, objective_state: PyTree, step: jax.Array) -> PyTree:
    """Called after each optimiser update with the new variables (EMA, queue pointer, ...)."""

  def backbone_variables(self, variables: PyTree, objective_state: PyTree) -> PyTree:
    """The backbone's variables (student / query encoder) for evaluation and export."""

  # Optional (the loop calls it when present):
  #   wrap_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation
  # lets an objective add gradient/update transforms around the configured optimiser without special
  # cases in the loop, e.g. DINO's per-tensor clipping and its last layer frozen in the first epoch.
