"""Convolutions for the ResNets and the segmentation heads: NHWC with torch's padding and init,
run as patches @ kernel on CPU where XLA's own convolution is slow, and bilinear resizing.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models.layers import matmul, partitioned

Dtype = Any
init = jax.nn.initializers


def he_normal_conv():
  """torch's kaiming_normal_(mode='fan_out', nonlinearity='relu') as used by torchvision ResNets."""
  return init.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, *, name: str, stride: int = 1, dilation: int = 1, use_bias: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> "Conv":
  """k x k conv with torch padding (dilation * (k // 2)), He (fan_out) init, logical axis names."""
  return Conv(features, kernel, stride=stride, dilation=dilation, use_bias=use_bias, dtype=dtype,
              param_dtype=param_dtype, name=name)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
  pad = dilation * (kernel // 2)
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def use_patch_matmul(height: int, width: int, kernel: int, stride: int, backend: str) -> bool:
  """Whether a k x k conv runs as patches @ kernel ("im2col") rather than XLA's convolution.

  Only on CPU, where XLA's convolution is slow for strided and small-map convolutions (measured,
  fwd+bwd, docs/speed.md: a 3x3 512->512 conv on 2x2 maps 88 ms vs 2.8 ms; stride 2 1.4-17x)
  and faster for stride-1 maps above 16 x 16. TPU/GPU convolutions are left to XLA. Also decides
  the ViT patch embedding (a stride-p p x p convolution).
  """
  if backend != "cpu":
    return False
  return kernel == 1 or stride > 1 or height * width <= 256


def patch_matmul_conv(x, kernel, stride: int, dilation: int):
  """[B, H, W, C] * [k, k, C, O] -> [B, H', W', O] as k*k strided slices concatenated on the channel
  axis, times the [k*k*C, O] kernel (torch padding dilation * (k // 2))."""
  k = kernel.shape[0]
  batch, height, width, channels = x.shape
  pad = dilation * (k // 2)
  out_h, out_w = (conv_output_size(n, k, stride, dilation) for n in (height, width))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
  taps = [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                        (batch, i * dilation + stride * (out_h - 1) + 1, j * dilation + stride * (out_w - 1) + 1,
                         channels), (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return matmul(patches, kernel.reshape(k * k * channels, -1))


class Conv(nn.Module):
  """k x k convolution, NHWC, torch padding; params `kernel` [k, k, C, O] and optional `bias` [O]
  (nn.Conv's names and layout, so checkpoints and export are unaffected by the implementation)."""
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    w = self.param("kernel", partitioned(he_normal_conv(), ("conv_height", "conv_width", "conv_in", "conv_out")),
                   (k, k, x.shape[-1], self.features), self.param_dtype)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if use_patch_matmul(x.shape[1], x.shape[2], k, self.stride, jax.default_backend()):
      y = patch_matmul_conv(x, w, self.stride, self.dilation)
    else:
      pad = self.dilation * (k // 2)
      y = jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                       rhs_dilation=(self.dilation, self.dilation),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", partitioned(init.zeros, ("conv_out",)), (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y


def resize_bilinear(x, height: int, width: int):
  """[B, h, w, C] -> [B, height, width, C]; half-pixel centres = torch align_corners=False.

  Upsampling only matches torch exactly (jax antialiases when downsampling, torch does not).
  """
  out = jax.image.resize(x.astype(jnp.float32), (x.shape[0], height, width, x.shape[-1]), "bilinear")
  return out.astype(x.dtype)
