"""Heads: the MAE decoder, classification, ViT segmentation, FCN (dilated ResNet) and a UNet decoder
for ResNet multi-scale features. (DINO head / MoCo projector live in ssl_heads.py.)"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models import layers as L
from fmjax.models.convolution import conv, resize_bilinear
from fmjax.models.transformer import TransformerStack

Dtype = Any
init = jax.nn.initializers


class MAEDecoder(nn.Module):
  """MAE decoder: (visible tokens [B, 1+K, D], ids_restore [B, N]) -> pred [B, N, p*p*out_channels].

  decoder_embed (D -> width), a learned mask token fills the N - K removed positions, tokens are
  put back in their original order with ids_restore, a fixed 2-D sin-cos table (cls row zero) is
  added, `depth` pre-norm blocks, decoder_norm, decoder_pred (width -> p*p*C, (p, q, c) order).
  The cls token is dropped from the output.
  """
  patch_size: int
  out_channels: int
  width: int = 512
  depth: int = 1
  num_heads: int = 16
  mlp_ratio: float = 4.0
  scan: bool = False
  remat: str = "none"
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, ids_restore, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, num_visible = tokens.shape[0], tokens.shape[1] - 1
    num_patches = ids_restore.shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
      raise ValueError(f"ids_restore has {num_patches} patches, which is not a square token grid")
    x = L.dense(self.width, "embed", "mlp", name="decoder_embed", **dt)(tokens)
    mask_token = self.param("mask_token", L.partitioned(init.normal(0.02), (None, None, "embed")),
                            (1, 1, self.width), self.param_dtype)
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, num_patches - num_visible, self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    pos = jnp.asarray(L.sincos_2d(self.width, grid, cls_token=True)[None], jnp.float32)
    x = x + pos.astype(x.dtype)
    x, _ = TransformerStack(self.depth, self.num_heads, int(self.width * self.mlp_ratio), scan=self.scan,
                            remat=self.remat, attention=self.attention, name="decoder_blocks",
                            **dt)(x, train=train)
    x = L.layer_norm("decoder_norm", **dt)(x)
    pred = L.dense(self.patch_size ** 2 * self.out_channels, "embed", None, name="decoder_pred", **dt)(x)
    return pred[:, 1:]


class ClassificationHead(nn.Module):
  """embedding [B, D] -> logits [B, classes]. `batch_norm=True` puts a BatchNorm in front of the
  linear layer, like MAE's linear probe (theirs is affine-free; ours has scale/bias initialised to
  1/0, which starts out identical)."""
  num_classes: int
  batch_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.batch_norm:
      x = L.BatchNorm(name="bn", **dt)(x, train=train)
    return L.dense(self.num_classes, "embed", "classes", name="fc", **dt)(x)


class ConvBNReLU(nn.Module):
  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.features, self.kernel, dilation=self.dilation, name="conv", **dt)(x)
    return nn.relu(L.BatchNorm(name="bn", **dt)(x, train=train))


class SegmentationHead(nn.Module):
  """ViT patch tokens [B, N, D] -> token grid -> (bilinear x2, conv3x3, BN, ReLU) * num_upsamples
  -> 1x1 conv -> logits [B, g * 2^u, g * 2^u, classes]. Default u = log2(patch_size): full size."""
  num_classes: int
  patch_size: int = 4
  channels: int = 256
  num_upsamples: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, n, width = tokens.shape
    grid = math.isqrt(n)
    if grid * grid != n:
      raise ValueError(f"SegmentationHead expects a square token grid, got {n} tokens (drop the cls token)")
    ups = self.num_upsamples if self.num_upsamples is not None else int(round(math.log2(self.patch_size)))
    x = tokens.reshape(batch, grid, grid, width)
    for i in range(ups):
      x = resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
      x = ConvBNReLU(self.channels, name=f"up_{i}", **dt)(x, train=train)
    return conv(self.num_classes, 1, use_bias=True, name="classifier", **dt)(x)


class FCNHead(nn.Module):
  """torchvision FCNHead on a dilated ResNet's last map: conv3x3 (C -> C/4) + BN + ReLU + dropout
  0.1 + 1x1 conv -> classes, then bilinear resize to `output_size` (default: the input's size)."""
  num_classes: int
  channels: int | None = None
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, output_size: tuple[int, int] | None = None):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvBNReLU(self.channels or x.shape[-1] // 4, name="block", **dt)(x, train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = conv(self.num_classes, 1, use_bias=True, name="classifier", **dt)(x)
    if output_size is not None and tuple(output_size) != x.shape[1:3]:
      x = resize_bilinear(x, *output_size)
    return x


class UNetDecoder(nn.Module):
  """ResNet features (shallow -> deep, NHWC) -> full-resolution logits [B, H, W, classes].

  From the deepest map upwards: bilinear resize to the next skip's size, concatenate the skip,
  two conv3x3-BN-ReLU. If the shallowest map is still coarser than `output_size`, further x2
  stages without skips follow, then resize to exactly `output_size` and a 3x3 conv to classes.
  """
  num_classes: int
  channels: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool, output_size: tuple[int, int]):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = list(features)
    x = feats.pop()
    stage = 0

    def width(i):
      return self.channels[min(i, len(self.channels) - 1)]

    while feats:
      skip = feats.pop()
      x = resize_bilinear(x, skip.shape[1], skip.shape[2])
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = ConvBNReLU(width(stage), name=f"stage_{stage}_a", **dt)(x, train=train)
      x = ConvBNReLU(width(stage), name=f"stage_{stage}_b", **dt)(x, train=train)
      stage += 1
    while x.shape[1] < output_size[0]:
      x = resize_bilinear(x, min(2 * x.shape[1], output_size[0]), min(2 * x.shape[2], output_size[1]))
      x = ConvBNReLU(width(stage), name=f"stage_{stage}_a", **dt)(x, train=train)
      x = ConvBNReLU(width(stage), name=f"stage_{stage}_b", **dt)(x, train=train)
      stage += 1
    if tuple(x.shape[1:3]) != tuple(output_size):
      x = resize_bilinear(x, *output_size)
    return conv(self.num_classes, 3, use_bias=True, name="classifier", **dt)(x)
