"""Building blocks shared by the backbones and heads: dtypes, remat policies, sin-cos tables,
dense layers and LayerNorm with logical axis names, GELU and torch-style BatchNorm. The transformer
blocks are in `fmjax.models.transformer`, the convolutions in `fmjax.models.convolution`.

Every parameter is created through `nn.with_logical_partitioning` with names from
`fmjax.parallel.LOGICAL_RULES`, so one rules table decides how the model is laid out on a mesh.
"""
from __future__ import annotations

import functools
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fmjax.kernels import cpu as cpu_kernels

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


def _dot_subscripts(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """The einsum subscripts (lhs, rhs, out) of a `lax.dot_general`, whose output axes are the batch
  axes, then lhs's free axes, then rhs's."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in range(lhs_ndim)]
  rhs = [None] * rhs_ndim
  for l, r in zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch)):
    rhs[r] = lhs[l]
  rhs = [c or next(letters) for c in rhs]
  free = lambda names, contract, batch: [c for i, c in enumerate(names) if i not in contract and i not in batch]
  out = [lhs[i] for i in lhs_batch] + free(lhs, lhs_contract, lhs_batch) + free(rhs, rhs_contract, rhs_batch)
  return "".join(lhs), "".join(rhs), "".join(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _float32_accumulated_dot(lhs, rhs, dimension_numbers):
  """dot_general of two bf16 operands into float32, rounded to bf16; the backward's two products
  are formed the same way (autodiff would hand them a float32 cotangent, i.e. XLA's float32 path)."""
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


def _float32_accumulated_dot_fwd(lhs, rhs, dimension_numbers):
  return _float32_accumulated_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _float32_accumulated_dot_bwd(dimension_numbers, residuals, grad_out):
  lhs, rhs = residuals
  lhs_names, rhs_names, out_names = _dot_subscripts(dimension_numbers, lhs.ndim, rhs.ndim)
  grad_lhs = jnp.einsum(f"{out_names},{rhs_names}->{lhs_names}", grad_out, rhs, preferred_element_type=jnp.float32)
  grad_rhs = jnp.einsum(f"{out_names},{lhs_names}->{rhs_names}", grad_out, lhs, preferred_element_type=jnp.float32)
  return grad_lhs.astype(lhs.dtype), grad_rhs.astype(rhs.dtype)


_float32_accumulated_dot.defvjp(_float32_accumulated_dot_fwd, _float32_accumulated_dot_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` for the models' products (Dense, einsum, matmul); a drop-in for flax's
  `dot_general` field and `jnp.einsum`'s `_dot_general`.

  On CPU, a product of two bfloat16 operands with a bfloat16 result is asked of XLA as a product
  into float32 followed by a rounding to bf16. XLA CPU runs that form on the CPU's bf16 dot
  instructions (AVX512-BF16), but widens both operands to float32 for the bf16-result form: 410 vs
  205 GFLOP/s for [1040, 384] x [384, 1536] on a Zen 4 core pair, 308 vs 56 for the adapter's
  [131072, 224] x [224, 64]. Both forms accumulate in float32 and round once, so the values agree
  up to summation order. Other backends and dtypes get `lax.dot_general` unchanged.
  """
  if (jax.default_backend() == "cpu" and lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16
      and preferred_element_type in (None, jnp.bfloat16) and not kwargs):
    dims = tuple(tuple(tuple(int(a) for a in axes) for axes in pair) for pair in dimension_numbers)
    return _float32_accumulated_dot(lhs, rhs, dims)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def einsum(subscripts: str, *operands, **kwargs):
  """`jnp.einsum` whose products go through `dot_general`."""
  return jnp.einsum(subscripts, *operands, _dot_general=dot_general, **kwargs)


def matmul(x, kernel):
  """x [..., K] @ kernel [K, N], as one 2-D product where `flatten_for_matmul` says so."""
  dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  rows = x.reshape(-1, x.shape[-1]) if flatten_for_matmul(x) else x
  out = dot_general(rows, kernel, (((rows.ndim - 1,), (0,)), ((), ())))
  return out.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Dense):
  """nn.Dense (same parameters), run as a 2-D product where `flatten_for_matmul` says so, with the
  models' `dot_general`."""
  dot_general: Callable[..., Any] | None = dot_general

  def __call__(self, inputs):
    if not flatten_for_matmul(inputs):
      return super().__call__(inputs)
    rows = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return rows.reshape(*inputs.shape[:-1], self.features)


class DenseBiasApart(Dense):
  """Dense's parameters (kernel and bias, same names, shapes and inits), but returns
  (inputs @ kernel, bias) for a consumer that adds the bias in its own pass (the CPU attention kernel
  adds qkv's as it reads q, k and v)."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    rows = inputs.reshape(-1, inputs.shape[-1])
    product = self.dot_general(rows, kernel, (((1,), (0,)), ((), ())))
    return product.reshape(*inputs.shape[:-1], self.features), bias


def dense(features: int, in_name: str | None, out_name: str | None, *, name: str, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=init.xavier_uniform(), bias_apart: bool = False) -> Dense:
  """Dense with xavier-uniform kernel (MAE/timm-MAE init), zero bias and logical axis names;
  `bias_apart` returns (product, bias) instead (`DenseBiasApart`)."""
  return (DenseBiasApart if bias_apart else Dense)(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=partitioned(kernel_init, (in_name, out_name)), bias_init=partitioned(init.zeros, (out_name,)))


def layer_norm(name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Module:
  """LayerNorm (eps 1e-6, scale 1, bias 0); statistics in float32 regardless of compute dtype.

  On one AVX-512 CPU device in float32 it is `KernelLayerNorm` (the same parameters, one kernel pass
  per direction: docs/speed.md item 21), elsewhere flax's `nn.LayerNorm`.
  """
  if use_layer_norm_kernel(dtype, param_dtype):
    return KernelLayerNorm(epsilon=LN_EPS, name=name)
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(init.ones, ("norm",)),
                      bias_init=partitioned(init.zeros, ("norm",)))


def use_layer_norm_kernel(dtype: Dtype, param_dtype: Dtype) -> bool:
  """The CPU LayerNorm kernel (fmjax/kernels/layer_norm.cc) where it applies: float32 compute and
  parameters, and `cpu_kernels.kernels_available()` (one CPU device, AVX-512, a compiler)."""
  return (jnp.dtype(dtype) == jnp.float32 and jnp.dtype(param_dtype) == jnp.float32
          and cpu_kernels.kernels_available())


LN_KERNEL_MAX_COLUMNS = 4096   # fmjax/kernels/layer_norm.cc keeps a row in a fixed buffer


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_kernel(x, scale, bias, epsilon: float):
  """[rows, C] float32 -> (x - mean) / sqrt(var + eps) * scale + bias per row, by the CPU kernel
  (two-pass row statistics)."""
  return _layer_norm_call(x, scale, bias, epsilon)[0]


def _layer_norm_call(x, scale, bias, epsilon):
  rows, columns = x.shape
  shapes = (jax.ShapeDtypeStruct((rows, columns), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.float32))
  return jax.ffi.ffi_call("fmjax_layer_norm", shapes, vmap_method="sequential")(
      x, scale, bias, epsilon=np.float32(epsilon))


def _layer_norm_fwd(x, scale, bias, epsilon):
  y, mean, rstd = _layer_norm_call(x, scale, bias, epsilon)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, residuals, grad_y):
  del epsilon
  x, scale, mean, rstd = residuals
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
            jax.ShapeDtypeStruct(scale.shape, jnp.float32))
  return jax.ffi.ffi_call("fmjax_layer_norm_backward", shapes, vmap_method="sequential")(
      x, scale, mean, rstd, grad_y.astype(jnp.float32))


layer_norm_kernel.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class KernelLayerNorm(nn.Module):
  """`nn.LayerNorm`'s parameters (scale, bias [C], logical axis 'norm') and maths, in float32, computed
  by the CPU kernel (rows wider than its buffer by XLA): checkpoints and exports are the same as with
  flax's module."""
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    columns = x.shape[-1]
    scale = self.param("scale", partitioned(init.ones, ("norm",)), (columns,), jnp.float32)
    bias = self.param("bias", partitioned(init.zeros, ("norm",)), (columns,), jnp.float32)
    x = x.astype(jnp.float32)
    if columns > LN_KERNEL_MAX_COLUMNS or x.size == 0:
      mean = jnp.mean(x, axis=-1, keepdims=True)
      variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
      return (x - mean) * jax.lax.rsqrt(variance + self.epsilon) * scale + bias
    return layer_norm_kernel(x.reshape(-1, columns), scale, bias, self.epsilon).reshape(x.shape)


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
