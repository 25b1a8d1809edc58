"""ResNets: the SpectralEarth SpecResNet-50 (adapter + stem-less ResNet-50, optionally fully dilated)
and multispectral ResNet-18/50 (torchvision layout, any input channel count, `detail_stem`).

Names follow torchvision so export maps 1:1: layer{1..4}_{i}/{conv1,bn1,conv2,bn2,(conv3,bn3),
downsample_conv,downsample_bn}, conv1/bn1 for the stem, fc for the optional classifier.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from fmjax.models import layers as L
from fmjax.models.convolution import conv
from fmjax.models.spectral_adapter import SpectralAdapter

Dtype = Any


class BasicBlock(nn.Module):
  width: int
  stride: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = self.width * self.expansion
    h = conv(self.width, 3, stride=self.stride, dilation=self.dilation, name="conv1", **dt)(x)
    h = nn.relu(L.BatchNorm(name="bn1", **dt)(h, train=train))
    h = conv(out, 3, dilation=self.dilation, name="conv2", **dt)(h)
    h = L.BatchNorm(name="bn2", **dt)(h, train=train)
    return nn.relu(h + _shortcut(self, x, out, train, dt))


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck (stride on the 3x3). `out_features` overrides 4 * width (the
  SpecResNet's first block is a bottleneck at width 256 with 256 outputs)."""
  width: int
  stride: int = 1
  dilation: int = 1
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = self.out_features or self.width * self.expansion
    h = conv(self.width, 1, name="conv1", **dt)(x)
    h = nn.relu(L.BatchNorm(name="bn1", **dt)(h, train=train))
    h = conv(self.width, 3, stride=self.stride, dilation=self.dilation, name="conv2", **dt)(h)
    h = nn.relu(L.BatchNorm(name="bn2", **dt)(h, train=train))
    h = conv(out, 1, name="conv3", **dt)(h)
    h = L.BatchNorm(name="bn3", **dt)(h, train=train)
    return nn.relu(h + _shortcut(self, x, out, train, dt))


def _shortcut(block: nn.Module, x, out: int, train: bool, dt):
  if block.stride == 1 and x.shape[-1] == out:
    return x
  s = conv(out, 1, stride=block.stride, name="downsample_conv", **dt)(x)
  return L.BatchNorm(name="downsample_bn", **dt)(s, train=train)


class ResNetLayers(nn.Module):
  """layer1..layer4; returns the four output maps."""
  stage_sizes: Sequence[int]
  bottleneck: bool
  strides: Sequence[int]
  dilations: Sequence[int]
  first_block_width: int | None = None    # SpecResNet: layer1_0 is a bottleneck at this width
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    features = []
    for stage, num_blocks in enumerate(self.stage_sizes):
      width = 64 * 2 ** stage
      for i in range(num_blocks):
        stride = self.strides[stage] if i == 0 else 1
        kw = dict(stride=stride, dilation=self.dilations[stage], name=f"layer{stage + 1}_{i}", **dt)
        if stage == 0 and i == 0 and self.first_block_width:
          x = Bottleneck(self.first_block_width, out_features=width * block_cls.expansion, **kw)(x, train=train)
        else:
          x = block_cls(width, **kw)(x, train=train)
      features.append(nn.with_logical_constraint(x, ("act_batch", "act_height", "act_width", "act_channels")))
    return features


class ResNet(nn.Module):
  """Multispectral torchvision ResNet-18/50 on [B, H, W, in_channels].

  Stem conv7x7/2 + BN + ReLU + maxpool/2, layers with strides 1/2/2/2: features (stem, layer1..4)
  at strides 2/4/8/16/32. detail_stem=True (detail-preserving variant for dense prediction):
  stride-1 stem, no max-pool, stride 2 in the first residual stage: strides 1/2/4/8/16.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  in_channels: int = 13
  image_size: int = 128
  detail_stem: bool = False
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    return 512 * (4 if self.bottleneck else 1)

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (1, 2, 4, 8, 16) if self.detail_stem else (2, 4, 8, 16, 32)

  def input_shape(self, batch: int = 1):
    return (batch, self.image_size, self.image_size, self.in_channels)

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ResNet expects [B, H, W, {self.in_channels}] input (in_channels), got {x.shape}")
    x = x.astype(self.dtype)
    stem_stride = 1 if self.detail_stem else 2
    h = conv(64, 7, stride=stem_stride, name="conv1", **dt)(x)
    stem = nn.relu(L.BatchNorm(name="bn1", **dt)(h, train=train))
    h = stem if self.detail_stem else nn.max_pool(stem, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    strides = (2, 2, 2, 2) if self.detail_stem else (1, 2, 2, 2)
    feats = ResNetLayers(self.stage_sizes, self.bottleneck, strides, (1, 1, 1, 1), name="layers", **dt)(
        h, train=train)
    return _outputs(self, [stem] + feats, dt)


class SpecResNet(nn.Module):
  """SpecResNet-50: SpectralAdapter (-> 128 channels) + stem-less ResNet-50 (`resnet`).

  layer1_0 is a bottleneck at width 256 with a stride-2 3x3: features at strides 2/4/8/16
  (channels 256/512/1024/2048). dilated=True: all strides 1, dilations 1/2/4/8 (segmentation).
  """
  num_bands: int = 202
  image_size: int = 128
  dilated: bool = False
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    return 2048

  @property
  def feature_strides(self) -> tuple[int, ...]:
    return (1, 1, 1, 1) if self.dilated else (2, 4, 8, 16)

  def input_shape(self, batch: int = 1):
    return (batch, self.image_size, self.image_size, self.num_bands)

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = SpectralAdapter(name="spectral_adapter", **dt)(x, train=train)
    strides, dilations = ((1, 1, 1, 1), (1, 2, 4, 8)) if self.dilated else ((2, 2, 2, 2), (1, 1, 1, 1))
    feats = ResNetLayers((3, 4, 6, 3), True, strides, dilations, first_block_width=256, name="resnet", **dt)(
        h, train=train)
    return _outputs(self, feats, dt)


def _outputs(model: nn.Module, feats, dt):
  embedding = jnp.mean(feats[-1].astype(jnp.float32), axis=(1, 2))
  out = {"embedding": embedding, "features": feats}
  if model.num_classes:
    out["logits"] = L.dense(model.num_classes, "embed", "classes", name="fc", **dt)(embedding)
  return out
