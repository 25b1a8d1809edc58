"""The train state and its creation directly in its shardings (no host copy of the full model).

state = {params, model_state, opt_state, objective_state, step, rng}: a plain dict so that Orbax
saves and restores it without custom types. `params` is `variables['params']`; `model_state`
holds the other variable collections (e.g. the adapter's `batch_stats`).

Creation: `jax.eval_shape(init)` gives abstract values still wrapped in `nn.LogicallyPartitioned`
boxes -> `logical_to_shardings` maps the logical axes to the mesh -> `jit(init, out_shardings=...)`
builds every array already sharded (FSDP parameters are never materialised whole on one device).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from fmjax import parallel

State = dict[str, Any]


def _split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  if "params" not in variables:
    raise ValueError(f"objective.init must return variables with a 'params' collection, got {list(variables)}")
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def make_init_fn(objective, tx: optax.GradientTransformation, example_spec: Mapping[str, Any],
                 seed: int) -> Callable[[], State]:
  """A function building the full (boxed) train state from the seed; pure, so it can be jitted.

  `example_spec`: shapes/dtypes of a (small) batch the models are initialised with.
  """
  def init() -> State:
    example_batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_spec)
    root = jax.random.key(seed)
    init_rng, train_rng = jax.random.split(root)
    variables, objective_state = objective.init(init_rng, example_batch)
    params, model_state = _split_variables(variables)
    return {
        "params": params,
        "model_state": model_state,
        # optax maps over the boxed tree, so the moments inherit the parameters' logical axes.
        "opt_state": tx.init(params),
        "objective_state": objective_state,
        "step": jnp.zeros([], jnp.int32),
        "rng": jax.random.key_data(train_rng),
    }
  return init


def activation_rules():
  """The logical-rules context under which models are traced (activation sharding constraints)."""
  return parallel.with_rules()


def trace_with_rules(fn: Callable, *args):
  with parallel.with_rules():
    return fn(*args)


def abstract_state_and_shardings(init_fn: Callable[[], State], mesh: Mesh,
                                 replicated: list[str] | None = None) -> tuple[State, State]:
  """(abstract unboxed state with shardings attached, sharding tree) for the current mesh.

  Dimensions the mesh does not divide (e.g. the adapter's 32 channels under fsdp=64) are replicated;
  they are logged and, if `replicated` is a list, appended to it.
  """
  boxed = trace_with_rules(jax.eval_shape, init_fn)
  shardings = parallel.logical_to_shardings(boxed, mesh)
  abstract = nn.meta.unbox(boxed)
  shardings, changed = parallel.replicate_indivisible(abstract, shardings, mesh)
  if changed:
    logging.info("replicated %d tensors the mesh does not divide: %s", len(changed), "; ".join(changed[:8]))
    if replicated is not None:
      replicated.extend(changed)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_state(init_fn: Callable[[], State], shardings: State) -> State:
  """Runs init under jit with out_shardings: every array is born on its devices."""
  def unboxed_init():
    return nn.meta.unbox(init_fn())
  return trace_with_rules(jax.jit(unboxed_init, out_shardings=shardings))


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def describe_shardings(shardings: State, max_lines: int = 12) -> str:
  """A short human-readable listing of the parameter shardings (logged once at start-up)."""
  lines = []
  flat = jax.tree_util.tree_flatten_with_path(shardings["params"])[0]
  for path, sharding in flat[:max_lines]:
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    lines.append(f"  {jax.tree_util.keystr(path)}: {spec}")
  if len(flat) > max_lines:
    lines.append(f"  ... {len(flat) - max_lines} more")
  return "\n".join(lines)
