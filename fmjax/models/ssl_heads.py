"""Self-supervised heads: the DINO projection head and the MoCo-v2 projector.

Both follow the official PyTorch modules so that a checkpoint means the same thing here and there:
  DINOHead     Linear(D->2048) GELU Linear(2048->2048) GELU Linear(2048->bottleneck), L2-normalise,
               weight-normalised Linear(bottleneck->out, no bias) with direction `v` and gain `g`
               (g fixed to 1 when `norm_last_layer`, as in the official default).
  MoCoProjector Linear(no bias, D->2048) BN ReLU Linear(no bias, 2048->dim) BN.
`SSLNetwork` glues a backbone (anything with `__call__(x, *, train) -> {'embedding': [B, D], ...}`)
to one of these heads; the backbone's variables live under the name 'backbone' so that evaluation
and export can take them out unchanged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models.layers import Dense, gelu, matmul

# torch.nn.functional.normalize clamps the norm at 1e-12; the same here.
L2_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, L2_EPS)


def _torch_linear_default_init(key, shape, dtype=jnp.float32):
  """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for an [in, out] kernel."""
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features: int, names: tuple[str, str], *, use_bias: bool = True, name: str | None = None,
           kernel_init=nn.initializers.truncated_normal(0.02), dtype=jnp.float32) -> Dense:
  # DINO initialises its MLP with trunc_normal(std=0.02) and zero biases.
  return Dense(features, use_bias=use_bias, dtype=dtype, name=name,
               kernel_init=nn.with_logical_partitioning(kernel_init, names),
               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class WeightNormDense(nn.Module):
  """torch.nn.utils.weight_norm(Linear(in, out, bias=False)): W[:, j] = g[j] * v[:, j] / ||v[:, j]||.

  Both the direction `v` [in, out] and the gain `g` [out] are parameters; DINO's teacher EMA averages
  these raw parameters, never the normalised weight. When `freeze_g`, g gets no gradient (the
  optimiser wrapper of the DINO objective also masks its update, so weight decay cannot move it).
  """
  features: int
  freeze_g: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("v", nn.with_logical_partitioning(_torch_linear_default_init, ("proj_in", "proj")),
                   (x.shape[-1], self.features))
    g = self.param("g", nn.with_logical_partitioning(nn.initializers.ones, ("proj",)), (self.features,))
    if self.freeze_g:
      g = jax.lax.stop_gradient(g)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    kernel = v * (g / norm)
    return matmul(x.astype(self.dtype), kernel.astype(self.dtype))


class DINOHead(nn.Module):
  """DINO projection head (official `DINOHead` with use_bn=False, nlayers=3)."""
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  norm_last_layer: bool = True   # g fixed to 1 (official default); False lets g train
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _dense(self.hidden_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
    x = gelu(x)    # torch nn.GELU is the exact erf form
    x = _dense(self.hidden_dim, ("mlp", "proj"), name="fc2", dtype=self.dtype)(x)
    x = gelu(x)
    x = _dense(self.bottleneck_dim, ("proj_in", "proj"), name="fc3", dtype=self.dtype)(x)
    # The softmax that follows is sensitive to rounding: the last layer runs in float32.
    x = l2_normalize(x.astype(jnp.float32))
    return WeightNormDense(self.out_dim, freeze_g=self.norm_last_layer, name="last_layer")(x)


class MoCoProjector(nn.Module):
  """MoCo-v2 projector: Linear(no bias) BN ReLU Linear(no bias) BN (BN: torch eps 1e-5, momentum 0.1).

  Under jit with the batch sharded over devices, BatchNorm's mean/variance are reductions over the
  whole global batch, i.e. SyncBN. MoCo's shuffle-BN existed because per-GPU BN statistics let the
  query and its key "cheat" through the statistics of one small sub-batch; global statistics over
  the full batch carry no such per-device signal, so no shuffle is needed.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def bn(name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          name=name)
    x = _dense(self.hidden_dim, ("embed", "mlp"), use_bias=False, name="fc1", dtype=self.dtype,
               kernel_init=_torch_linear_default_init)(x)
    x = nn.relu(bn("bn1")(x))
    x = _dense(self.out_dim, ("mlp", "proj"), use_bias=False, name="fc2", dtype=self.dtype,
               kernel_init=_torch_linear_default_init)(x)
    return bn("bn2")(x)


class SSLNetwork(nn.Module):
  """backbone -> head. Returns {'embedding': backbone embedding [B, D], 'projection': head output}."""
  backbone: nn.Module
  head: nn.Module
  head_takes_train: bool = False   # MoCoProjector has BatchNorm; DINOHead does not

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    # A ViT's `embed` skips the last block's work on tokens other than cls; ResNets have no such path.
    embed = getattr(self.backbone, "embed", None)
    embedding = embed(x, train=train) if embed is not None else self.backbone(x, train=train)["embedding"]
    if self.head_takes_train:
      projection = self.head(embedding, train=train)
    else:
      projection = self.head(embedding)
    return {"embedding": embedding, "projection": projection.astype(jnp.float32)}
