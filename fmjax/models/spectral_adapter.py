"""The SpectralEarth spectral adapter: three 1-D convolutions along the band axis, each followed by
BatchNorm and ReLU, then a mean over the remaining spectral positions.

The official module is a Conv3d stack with (k, 1, 1) kernels on [B, 1, C, H, W]. Such kernels
never mix pixels, so the same maths is a 1-D convolution over the band axis applied to every pixel.
We write it as "unfold + matmul": k strided slices of the band axis stacked into a window axis,
then one einsum with the [k, c_in, c_out] kernel. XLA CPU runs this ~4x faster than its Conv3d
lowering (REFERENCE.md) and it shards like any dense layer.

Layer geometry (official): kernels 7/7/5, strides 5/5/3, padding 1, channels 1->32->64->128;
202 bands -> 40 -> 8 -> 2 -> mean -> 128 features per pixel. 56,192 parameters.
Submodule names mirror the torch nn.Sequential indices: conv_0, bn_1, conv_3, bn_4, conv_6, bn_7.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models.layers import BatchNorm, partitioned

Dtype = Any

# (kernel, stride, padding, out_channels) of the official adapter.
ADAPTER_LAYERS: tuple[tuple[int, int, int, int], ...] = ((7, 5, 1, 32), (7, 5, 1, 64), (5, 3, 1, 128))
MIN_BANDS = 75   # the smallest band count for which every layer still has >= 1 output position


def conv_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  return (length + 2 * padding - kernel) // stride + 1


def spectral_lengths(num_bands: int, layers=ADAPTER_LAYERS) -> list[int]:
  """Band-axis lengths through the adapter, e.g. 202 -> [202, 40, 8, 2]."""
  lengths = [num_bands]
  for kernel, stride, padding, _ in layers:
    lengths.append(conv_out_length(lengths[-1], kernel, stride, padding))
  return lengths


def unfold_bands(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """[..., L, c] -> [..., L_out, kernel, c]: the zero-padded windows of a strided 1-D conv.

  Built from `kernel` strided slices (cheap views for XLA) rather than a gather.
  """
  length = x.shape[-2]
  out_len = conv_out_length(length, kernel, stride, padding)
  pad = [(0, 0)] * (x.ndim - 2) + [(padding, padding), (0, 0)]
  xp = jnp.pad(x, pad)
  taps = [jax.lax.slice_in_dim(xp, j, j + stride * (out_len - 1) + 1, stride, axis=x.ndim - 2)
          for j in range(kernel)]
  return jnp.stack(taps, axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def band_conv(x: jax.Array, kernel_weights: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """[..., L, c_in] x [kernel, c_in, c_out] -> [..., L_out, c_out]: unfold + one matmul.

  The backward pass is written by hand because autodiff's weight gradient contracts over every
  pixel and spectral position with both operands in their forward layout, and XLA CPU then
  transposes the largest activation (the [B*H*W*40, 32] gradient of layer 1) before the matmul:
  0.46 s of a 2.2 s adapter step at batch 4 x 128 px. Here the smaller side of the contraction
  is the one transposed (`python -m benchmarks.adapter` measures the difference).
  """
  windows = unfold_bands(x, kernel, stride, padding)
  return jnp.einsum("...lkc,kco->...lo", windows, kernel_weights)


def _band_conv_fwd(x, kernel_weights, kernel, stride, padding):
  # Save the input, not the (kernel/stride = 1.4x larger) windows: they are rebuilt in backward.
  return band_conv(x, kernel_weights, kernel, stride, padding), (x, kernel_weights)


def _band_conv_bwd(kernel, stride, padding, residuals, grad_out):
  x, kernel_weights = residuals
  windows = unfold_bands(x, kernel, stride, padding)
  depth, c_out = kernel * x.shape[-1], kernel_weights.shape[-1]
  flat_windows = windows.reshape(-1, depth)
  flat_grad = grad_out.reshape(-1, c_out).astype(windows.dtype)
  # Sums over every pixel and position: accumulate in float32 even for bf16 activations.
  if depth <= c_out:
    grad_w = jnp.matmul(flat_windows.T, flat_grad, preferred_element_type=jnp.float32)
  else:
    grad_w = jnp.matmul(flat_grad.T, flat_windows, preferred_element_type=jnp.float32).T
  grad_windows = jnp.einsum("...lo,kco->...lkc", grad_out, kernel_weights)
  _, fold = jax.vjp(lambda v: unfold_bands(v, kernel, stride, padding), x)
  (grad_x,) = fold(grad_windows.astype(windows.dtype))
  return grad_x, grad_w.reshape(kernel_weights.shape).astype(kernel_weights.dtype)


band_conv.defvjp(_band_conv_fwd, _band_conv_bwd)


class BandConv(nn.Module):
  """1-D convolution over the band axis of [B, H, W, L, c_in] (pixels independent)."""
  features: int
  kernel: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    # torch's Conv3d default init is kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weights
    # and bias alike; fan_in = c_in * kernel.
    bound = (c_in * self.kernel) ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    w = self.param("kernel", partitioned(uniform, ("conv_kernel", "conv_in", "conv_out")),
                   (self.kernel, c_in, self.features), self.param_dtype)
    b = self.param("bias", partitioned(uniform, ("conv_out",)), (self.features,), self.param_dtype)
    y = band_conv(x.astype(self.dtype), w.astype(self.dtype), self.kernel, self.stride, self.padding)
    return y + b.astype(self.dtype)


class SpectralAdapter(nn.Module):
  """[B, H, W, C] (channels last, any C >= 75) -> [B, H, W, 128].

  BatchNorm statistics live in the 'batch_stats' collection; apply with
  `mutable=['batch_stats']` when train=True.
  """
  layers: Sequence[tuple[int, int, int, int]] = ADAPTER_LAYERS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return self.layers[-1][3]

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4:
      raise ValueError(f"SpectralAdapter expects [B, H, W, C] channels-last input, got shape {x.shape}")
    lengths = spectral_lengths(x.shape[-1], self.layers)
    if min(lengths) < 1:
      raise ValueError(f"SpectralAdapter needs at least {MIN_BANDS} bands, got {x.shape[-1]} "
                       f"(band-axis lengths would be {lengths})")
    h = x[..., None]  # [B, H, W, C, 1]: the band axis becomes the 1-D conv's length axis
    for i, (kernel, stride, padding, features) in enumerate(self.layers):
      h = BandConv(features, kernel, stride, padding, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"conv_{3 * i}")(h)
      h = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"bn_{3 * i + 1}")(h, train=train)
      h = nn.relu(h)
    h = jnp.mean(h.astype(jnp.float32), axis=-2).astype(self.dtype)  # mean over remaining positions
    return nn.with_logical_constraint(h, ("act_batch", "act_height", "act_width", "act_channels"))
