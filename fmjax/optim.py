"""Optimisers, learning-rate schedules and weight-decay masks, built from `config.optimizer` / `config.schedule`.

config.optimizer: name ('adamw' | 'sgd'), b1, b2, eps, momentum, nesterov, weight_decay,
  decay_tokens (whether cls / mask / position tokens are decayed), grad_clip_norm (0: off).
config.schedule: name ('cosine' | 'step' | 'constant'), base_lr, warmup_steps, end_lr (cosine),
  boundaries (step: fractions of total steps, or absolute steps if > 1), decay_factor (step).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")

# Parameter leaf names that are never decayed: biases and normalisation scales/offsets.
_NO_DECAY_LEAVES = ("bias", "scale", "embedding_bias")
# Parameter names that are learned tokens (decayed only when optimizer.decay_tokens is set).
_TOKEN_NAMES = ("cls", "cls_token", "mask_token", "pos_embedding", "pos_embed", "register_tokens")


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      names.append(key.name)
  return names


def weight_decay_mask(params: Any, decay_tokens: bool = False) -> Any:
  """True where weight decay applies: kernels/embeddings of rank >= 2, never biases or norms.

  Works on plain and on `nn.LogicallyPartitioned`-boxed trees (the box's `value` is skipped).
  """
  def decide(path, leaf):
    names = _path_names(path)
    leaf_name = names[-1] if names else ""
    if leaf_name in _NO_DECAY_LEAVES:
      return False
    if any(n in _TOKEN_NAMES for n in names):
      return bool(decay_tokens)
    if any("norm" in n.lower() for n in names[-2:]):  # LayerNorm/BatchNorm params of any name
      return False
    return getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(decide, params)


def _resolve_steps(value: float, total_steps: int) -> int:
  """Fractions (<= 1) are of the total; larger values are absolute step counts."""
  return int(round(value * total_steps)) if 0 < value <= 1 and isinstance(value, float) else int(value)


def build_schedule(schedule_config, total_steps: int, steps_per_epoch: int = 0) -> optax.Schedule:
  """`warmup_epochs` (needs steps_per_epoch) wins over `warmup_steps` when set."""
  name = schedule_config.name
  base_lr = float(schedule_config.base_lr)
  warmup = int(schedule_config.get("warmup_steps", 0))
  if schedule_config.get("warmup_epochs", 0) and steps_per_epoch:
    warmup = int(round(schedule_config.warmup_epochs * steps_per_epoch))
  if name not in SCHEDULES:
    raise ValueError(f"schedule.name={name!r} is not known; valid choices: {SCHEDULES}")
  if warmup >= total_steps and name != "constant":
    raise ValueError(f"schedule.warmup_steps={warmup} must be smaller than the total steps {total_steps}")
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else base_lr, peak_value=base_lr, warmup_steps=warmup,
        decay_steps=total_steps, end_value=float(schedule_config.get("end_lr", 0.0)))
  if name == "constant":
    main = optax.constant_schedule(base_lr)
  else:  # step: multiply by decay_factor at each boundary (MoCo-v2: epochs 60 and 80 of 100)
    boundaries = [_resolve_steps(b, total_steps) for b in schedule_config.get("boundaries", (0.6, 0.8))]
    factor = float(schedule_config.get("decay_factor", 0.1))
    main = optax.piecewise_constant_schedule(base_lr, {max(b - warmup, 1): factor for b in boundaries})
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def build_optimizer(optimizer_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = optimizer_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={name!r} is not known; valid choices: {OPTIMIZERS}")
  wd = float(optimizer_config.get("weight_decay", 0.0))
  decay_tokens = bool(optimizer_config.get("decay_tokens", False))
  mask = lambda params: weight_decay_mask(params, decay_tokens)
  parts = []
  clip = float(optimizer_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    parts.append(clip_by_global_norm(clip))
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=float(optimizer_config.get("b1", 0.9)),
                             b2=float(optimizer_config.get("b2", 0.999)),
                             eps=float(optimizer_config.get("eps", 1e-8)), weight_decay=wd, mask=mask))
  else:
    # PyTorch SGD semantics: decay is added to the gradient before momentum.
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(optax.sgd(schedule, momentum=float(optimizer_config.get("momentum", 0.9)) or None,
                           nesterov=bool(optimizer_config.get("nesterov", False))))
  return optax.chain(*parts)


def global_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's maths and (empty) state, written so that XLA CPU does less work.

  The norm is `global_norm`, the expression the train step logs as `grad_norm`, so XLA computes it
  once for both. The clipping is t * min(1, max_norm / norm), where optax writes select(norm < max,
  t, t / norm * max). A multiply by a scalar is cheap enough for XLA to fold into each of its two
  consumers, the Adam moments, so the clipped gradients are never written out; a division is not.
  Equal to optax's to one rounding.
  """
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / global_norm(updates))
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
