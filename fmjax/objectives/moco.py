"""MoCo-v2: contrastive learning with a momentum key encoder and a memory bank (queue) of keys.

Faithful to the official code (facebookresearch/moco, moco/builder.py) with temporal positives:
  * query q from view 0, key k from view 1 (two timestamps of one location); both L2-normalised;
  * key encoder = EMA (momentum 0.999) of the query encoder's parameters, applied after every
    optimiser step (`after_update`; the official code applies it right before computing the keys of
    the next step, which is the same sequence); its BatchNorm statistics are its own;
  * logits [q.k+, q.queue^T] / T with the positive at index 0, cross-entropy averaged over the batch;
  * the queue [K, dim] takes the keys of the GLOBAL batch after the loss (under jit the batch is a
    global array, so no all-gather is written), pointer advanced by B modulo K; K % B == 0 is checked
    at start-up so that a batch never straddles the end of the queue;
  * no shuffle-BN: under jit BatchNorm statistics are reductions over the whole global batch (SyncBN),
    which leaves no per-device sub-batch statistic for a query and its key to share (see MoCoProjector).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models.ssl_heads import MoCoProjector, SSLNetwork, l2_normalize
from fmjax.objectives.base import LossOutput, ViewSpec
from fmjax.objectives.dino import build_backbone, cosine_momentum, ema, normalized_std, resolve_steps

PyTree = Any
MOMENTUM_SCHEDULES = ("constant", "cosine")


def check_queue_size(queue_size: int, global_batch_size: int) -> None:
  if queue_size <= 0 or global_batch_size <= 0 or queue_size % global_batch_size:
    raise ValueError(
        f"MoCo queue size objective.queue_size={queue_size} must be a positive multiple of the global batch "
        f"size {global_batch_size} (each step enqueues the whole global batch of keys); e.g. use "
        f"{max(1, queue_size // max(global_batch_size, 1)) * global_batch_size}")


def _init_queue(key, shape, dtype=jnp.float32):
  # Official: randn(dim, K) normalised along dim, i.e. K random unit keys.
  return l2_normalize(jax.random.normal(key, shape, dtype), axis=-1)


def infonce_with_queue(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float
                       ) -> tuple[jax.Array, jax.Array]:
  """q, k [B, d] unit vectors, queue [K, d]. Returns (mean cross-entropy with label 0, logits [B, 1+K])."""
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])
  return loss, logits


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes keys at rows [ptr, ptr + B) (K % B == 0, so never past the end) and advances the pointer."""
  batch = keys.shape[0]
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.zeros_like(ptr)))
  return queue, (ptr + batch) % queue.shape[0]


class MoCo:
  """The MoCo-v2 objective behind the protocol of fmjax/objectives/base.py."""
  name = "moco"
  views = ViewSpec(global_views=2, local_views=0)

  def __init__(self, backbone: nn.Module, *, queue_size: int = 65536, dim: int = 128, hidden_dim: int = 2048,
               temperature: float = 0.2, momentum: float = 0.999, momentum_schedule: str = "constant",
               total_steps: int = 0, head_dtype: Any = jnp.float32):
    if momentum_schedule not in MOMENTUM_SCHEDULES:
      raise ValueError(f"objective.momentum_schedule={momentum_schedule!r} is not valid; "
                       f"choose one of {MOMENTUM_SCHEDULES}")
    if momentum_schedule == "cosine" and total_steps <= 0:
      raise ValueError(f"a cosine key-encoder momentum needs total_steps > 0, got {total_steps}")
    if temperature <= 0:
      raise ValueError(f"objective.temperature must be > 0, got {temperature}")
    self.network = SSLNetwork(backbone, MoCoProjector(hidden_dim, dim, dtype=head_dtype), head_takes_train=True)
    self.queue_size, self.dim, self.temperature = int(queue_size), int(dim), float(temperature)
    self.momentum, self.momentum_schedule, self.total_steps = momentum, momentum_schedule, total_steps

  def check_batch_size(self, global_batch_size: int) -> None:
    check_queue_size(self.queue_size, global_batch_size)

  def key_momentum(self, step: jax.Array) -> jax.Array:
    if self.momentum_schedule == "cosine":
      return cosine_momentum(step, self.total_steps, self.momentum)
    return jnp.asarray(self.momentum, jnp.float32)

  # -- protocol -------------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[PyTree, PyTree]:
    images = batch["image"]
    if images.ndim != 5 or images.shape[1] < 2:
      raise ValueError(f"MoCo needs batch['image'] of shape [B, V>=2, H, W, C], got {images.shape}")
    self.check_batch_size(images.shape[0])
    net_rng, queue_rng = jax.random.split(rng)
    variables = self.network.init(net_rng, images[:, 0], train=False)
    queue = nn.with_logical_partitioning(_init_queue, ("queue", "proj"))(queue_rng, (self.queue_size, self.dim))
    key_encoder = jax.tree.map(lambda x: x, variables)   # official: param_k.data.copy_(param_q.data)
    return variables, {"key_encoder": key_encoder, "queue": queue, "queue_ptr": jnp.zeros([], jnp.int32)}

  def loss(self, variables: PyTree, objective_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array) -> LossOutput:
    del rng, step
    images = batch["image"]
    self.check_batch_size(images.shape[0])   # static shapes: a Python check at trace time
    collections = [k for k in variables if k != "params"]

    q_out, model_state = self._apply(variables, images[:, 0], collections)
    key_vars = jax.lax.stop_gradient(objective_state["key_encoder"])
    k_out, key_state = self._apply(key_vars, images[:, 1], collections)
    q = l2_normalize(q_out["projection"])
    k = jax.lax.stop_gradient(l2_normalize(k_out["projection"]))

    queue = objective_state["queue"]
    loss, logits = infonce_with_queue(q, k, jax.lax.stop_gradient(queue), self.temperature)
    new_queue, new_ptr = enqueue(queue, objective_state["queue_ptr"], k)

    metrics = {
        "accuracy": jnp.mean((jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)),
        "positive_similarity": jnp.mean(logits[:, 0]) * self.temperature,
        "negative_similarity": jnp.mean(logits[:, 1:]) * self.temperature,
        "embedding_std": normalized_std(q_out["embedding"]),
        "projection_std": normalized_std(q),
    }
    new_state = {**objective_state, "key_encoder": {**objective_state["key_encoder"], **key_state},
                 "queue": new_queue, "queue_ptr": new_ptr}
    return LossOutput(loss=loss, metrics=metrics, model_state=model_state, objective_state=new_state)

  def after_update(self, variables: PyTree, objective_state: PyTree, step: jax.Array) -> PyTree:
    m = self.key_momentum(step)
    key_encoder = objective_state["key_encoder"]
    new_params = ema(key_encoder["params"], jax.lax.stop_gradient(variables["params"]), m)
    return {**objective_state, "key_encoder": {**key_encoder, "params": new_params}}

  def backbone_variables(self, variables: PyTree, objective_state: PyTree) -> PyTree:
    """The query encoder's backbone (official MoCo evaluates encoder_q)."""
    del objective_state
    return {col: tree["backbone"] for col, tree in variables.items() if "backbone" in tree}

  def _apply(self, variables, images, collections):
    if collections:
      out, state = self.network.apply(variables, images, train=True, mutable=collections)
      return out, dict(state)
    return self.network.apply(variables, images, train=True), {}


def build(config) -> MoCo:
  """The registry factory (fmjax/objectives/__init__.py): reads config.model and config.objective."""
  o = config.objective
  schedule = str(o.get("momentum_schedule", "constant"))
  total_steps = resolve_steps(config)[0] if schedule == "cosine" else 0
  queue_size = int(o.get("queue_size", 65536))
  check_queue_size(queue_size, int(config.batch_size))   # fail at start-up, before any compile
  return MoCo(build_backbone(config), queue_size=queue_size, dim=int(o.get("dim", 128)),
              hidden_dim=int(o.get("hidden_dim", 2048)), temperature=float(o.get("temperature", 0.2)),
              momentum=float(o.get("momentum", 0.999)), momentum_schedule=schedule, total_steps=total_steps)
