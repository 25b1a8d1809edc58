"""Building blocks shared by the backbones and heads: dtypes, remat policies, sin-cos tables,
dense layers and LayerNorm with logical axis names, GELU and torch-style BatchNorm. The transformer
blocks are in `fmjax.models.transformer`, the convolutions in `fmjax.models.convolution`.

Every parameter is created through `nn.with_logical_partitioning` with names from
`fmjax.parallel.LOGICAL_RULES`, so one rules table decides how the model is laid out on a mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
init = jax.nn.initializers

LN_EPS = 1e-6          # timm / MAE LayerNorm eps
BN_EPS = 1e-5          # torch BatchNorm default
BN_MOMENTUM = 0.1      # torch convention: new = (1 - m) * old + m * batch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Dtype:
  """Accepts a jnp dtype or one of the names in DTYPES (configs carry strings)."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not known; valid choices: {sorted(DTYPES)}")
    return DTYPES[dtype]
  return dtype


# ---------------------------------------------------------------------------------------------
# Remat policies: names usable in configs.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation at all (handled by callers: the module is not wrapped)
    "full": None,  # jax.checkpoint without a policy: save nothing, recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(module_cls, policy_name: str, *, static_argnums=(), prevent_cse: bool = True):
  """Wraps a module class in nn.remat according to a policy name ('none' returns it unchanged)."""
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy_name!r} is not known; valid choices: {sorted(REMAT_POLICIES)}")
  if policy_name == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy_name], static_argnums=static_argnums,
                  prevent_cse=prevent_cse)


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings (MAE recipe), computed in float64.

def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """[M, embed_dim]: sin of the first half, cos of the second; omega_k = 1 / 10000^(k / (D/2))."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """[(1 +) grid_size**2, embed_dim] float64, MAE's `get_2d_sincos_pos_embed`.

  Row-major token order (row i, column j -> i * grid + j). The first D/2 dims encode the column
  (w) index, the second D/2 the row (h) index; with `cls_token` a leading zero row is added.
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                           indexing="ij")
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb


# ---------------------------------------------------------------------------------------------
# Parameter helpers.

def partitioned(initializer, names: Sequence[str | None]):
  return nn.with_logical_partitioning(initializer, tuple(names))


def flatten_for_matmul(x) -> bool:
  """Whether a [..., K] @ [K, N] product should run on x reshaped to [rows, K].

  On XLA CPU, yes: with more than one leading axis the kernel gradient contracts several axes, and
  XLA CPU canonicalises that by first writing the output gradient transposed ([N, rows]), a strided
  copy the matmul library then reads back (fwd+bwd of a ViT MLP on [4, 1025, 512]: 441 vs 339 ms;
  the ResNet-50 trunk's convolutions: docs/speed.md). GPU and TPU contract several axes natively,
  and there a reshape of an unaligned token axis can cost a relayout, so they keep the N-D form.
  """
  return x.ndim > 2 and jax.default_backend() == "cpu"


def matmul(x, kernel):
  """x [..., K] @ kernel [K, N], as one 2-D product where `flatten_for_matmul` says so."""
  if not flatten_for_matmul(x):
    return x @ kernel
  return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Dense):
  """nn.Dense (same parameters), run as a 2-D product where `flatten_for_matmul` says so."""

  def __call__(self, inputs):
    if not flatten_for_matmul(inputs):
      return super().__call__(inputs)
    rows = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return rows.reshape(*inputs.shape[:-1], self.features)


def dense(features: int, in_name: str | None, out_name: str | None, *, name: str, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=init.xavier_uniform()) -> Dense:
  """Dense with xavier-uniform kernel (MAE/timm-MAE init), zero bias and logical axis names."""
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
               kernel_init=partitioned(kernel_init, (in_name, out_name)),
               bias_init=partitioned(init.zeros, (out_name,)))


def layer_norm(name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm (eps 1e-6, scale 1, bias 0); statistics in float32 regardless of compute dtype."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(init.ones, ("norm",)),
                      bias_init=partitioned(init.zeros, ("norm",)))



def gelu(x):
  """Exact (erf) GELU as timm/torch compute it: x/2 (1 + erf(x/sqrt 2)), not Flax's tanh default.

  Written out rather than `nn.gelu(approximate=False)`, whose erfc form XLA CPU runs 1.8x slower
  (fwd+bwd of a [4100, 2048] activation: 71 vs 39 ms); the formula is torch's own CPU kernel's.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


# ---------------------------------------------------------------------------------------------
# torch-semantics BatchNorm over the last axis.

def batch_statistics(x):
  """Per-channel mean and biased variance of [..., C] over all other axes, in float32 (two-pass:
  no E[x^2] - E[x]^2 cancellation)."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - mean), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalise_with_batch_statistics(x, mean, var, scale, bias, epsilon: float):
  """Train-mode BN, (x - mean) / sqrt(var + eps) * scale + bias in float32, where `mean` and `var`
  MUST be `batch_statistics(x)`: the gradient treats them as functions of x (its part through
  them is folded into x's gradient; their own cotangents are zero - pass them stop-gradiented).

  Written with the closed-form backward (two reductions and one elementwise pass, like torch's
  batch_norm_backward) because autodiff of the two-pass statistics costs 1.5-1.7x more on CPU
  (fwd+bwd of BN + ReLU on [8, 32, 32, 256]: 7.1 vs 4.4 ms on two cores).
  """
  return _normalise_forward(x, mean, var, scale, bias, epsilon)[0]


def _normalise_forward(x, mean, var, scale, bias, epsilon):
  rstd = jax.lax.rsqrt(var + epsilon)
  multiplier = rstd * scale.astype(jnp.float32)
  y = (x.astype(jnp.float32) - mean) * multiplier + bias.astype(jnp.float32)
  return y, (x, mean, rstd, scale)


def _normalise_backward(epsilon, residuals, dy):
  del epsilon
  x, mean, rstd, scale = residuals
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  dy = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * x_hat, axes)
  dx = (scale.astype(jnp.float32) * rstd) * (dy - dbias / count - x_hat * (dscale / count))
  return (dx.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(rstd), dscale.astype(scale.dtype),
          dbias.astype(scale.dtype))


normalise_with_batch_statistics.defvjp(_normalise_forward, _normalise_backward)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-statistics semantics.

  train=True normalises with the batch mean and *biased* variance and updates the running
  statistics as torch does: running = (1 - momentum) * running + momentum * batch, with the
  *unbiased* variance (n / (n - 1)). Flax's nn.BatchNorm uses the biased one, hence this module.
  Under jit with a batch sharded over devices the reductions are over the global array, so the
  statistics are global (what torch's SyncBatchNorm would give).
  Variables: params {scale, bias}; batch_stats {mean, var}.
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = init.ones

  @nn.compact
  def __call__(self, x, *, train: bool):
    scale, bias, running_mean, running_var = self.declare(x.shape[-1])
    if train:
      mean, var = batch_statistics(jax.lax.stop_gradient(x))
      if not self.is_initializing():
        self.update_running(running_mean, running_var, mean, var, x.size // x.shape[-1])
      y = normalise_with_batch_statistics(x, mean, var, scale, bias, self.epsilon)
    else:
      y = _normalise_forward(x, running_mean.value, running_var.value, scale, bias, self.epsilon)[0]
    return y.astype(self.dtype)

  def declare(self, features: int):
    """params {scale, bias} and batch_stats {mean, var} (call from a compact method)."""
    scale = self.param("scale", partitioned(self.scale_init, ("norm",)), (features,), self.param_dtype)
    bias = self.param("bias", partitioned(init.zeros, ("norm",)), (features,), self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    return scale, bias, running_mean, running_var

  def update_running(self, running_mean, running_var, mean, var, count: int):
    m = self.momentum
    unbiased = var * (count / max(count - 1, 1))
    running_mean.value = (1 - m) * running_mean.value + m * mean
    running_var.value = (1 - m) * running_var.value + m * unbiased
