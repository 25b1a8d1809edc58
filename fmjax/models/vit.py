"""Vision Transformer (timm layout) and SpecViT = SpectralAdapter + ViT.

Parameter tree (maps 1:1 onto the official PyTorch keys, see docs/models.md):
  SpecViT: spectral_adapter/{conv_0,bn_1,conv_3,bn_4,conv_6,bn_7}, vit_core/...
  VisionTransformer: patch_embed/{kernel [p,p,C,D], bias}, cls_token [1,1,D], pos_embed [1,1+N,D]
    (absent with sincos_pos_embed=True: then a fixed table, `sincos_2d`), encoder/blocks_i/
    {norm1, attn/{qkv,proj}, norm2, mlp/{fc1,fc2}} (or encoder/blocks/... with a leading
    'layers' axis when scan=True), norm, optional head.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models import layers as L
from fmjax.models.convolution import use_patch_matmul
from fmjax.models.spectral_adapter import SpectralAdapter
from fmjax.models.transformer import TransformerStack

Dtype = Any
init = jax.nn.initializers


class PatchEmbed(nn.Module):
  """The patch projection: a p x p, stride-p convolution (kernel [p, p, C, D], bias [D]).

  With `keep_idx` [B, K] only the kept patches are projected (MAE: 10% of them): the same maths
  as projecting every patch and gathering, at a tenth of the work in forward and backward.
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, keep_idx=None):
    """[B, H, W, C] -> [B, N, D] tokens in row-major patch order (or [B, K, D] with keep_idx)."""
    p, channels = self.patch_size, x.shape[-1]
    # MAE initialises the patch projection like a Linear on the flattened patch: xavier-uniform
    # with fan_in = p * p * C, fan_out = D.
    kernel = self.param("kernel", L.partitioned(init.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
                                                ("conv_height", "conv_width", "conv_in", "embed")),
                        (p, p, channels, self.width), self.param_dtype).astype(self.dtype)
    bias = self.param("bias", L.partitioned(init.zeros, ("embed",)), (self.width,),
                      self.param_dtype).astype(self.dtype)
    batch, height, width = x.shape[:3]
    # The convolutions' rule (strided -> patches @ kernel on CPU): for ViT-S/4 on [8, 32, 32, 128]
    # fwd 6.5 vs 9 ms, fwd+bwd 24 vs 31 ms (docs/speed.md).
    if keep_idx is None and not use_patch_matmul(height, width, p, p, jax.default_backend()):
      y = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y.reshape(batch, -1, self.width) + bias
    patches = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, -1, p * p * channels)
    if keep_idx is not None:
      patches = jnp.take_along_axis(patches, keep_idx[..., None].astype(jnp.int32), axis=1)
    return L.matmul(patches, kernel.reshape(p * p * channels, self.width)) + bias


class VisionTransformer(nn.Module):
  """ViT on [B, H, W, C] channels-last input: patchify, cls token, position embedding, pre-norm
  blocks, final LayerNorm. `__call__` returns {'embedding': cls [B, D], 'tokens': [B, N, D]}
  (+ 'logits' when num_classes > 0)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 4
  image_size: int = 128
  num_classes: int = 0
  sincos_pos_embed: bool = False   # fixed 2-D sin-cos table (MAE pretraining), not a parameter
  drop_path_rate: float = 0.0
  scan: bool = False
  remat: str = "none"
  attention: str = "xla"           # 'xla' | 'cudnn' | 'auto' (fmjax.models.transformer.Attention)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    return self.width

  @property
  def grid_size(self) -> int:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def setup(self):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = PatchEmbed(self.width, self.patch_size, name="patch_embed", **dt)
    self.cls_token = self.param("cls_token", L.partitioned(init.normal(0.02), (None, None, "embed")),
                                (1, 1, self.width), self.param_dtype)
    if not self.sincos_pos_embed:
      self.pos_embed = self.param("pos_embed", L.partitioned(init.normal(0.02), (None, "tokens", "embed")),
                                  (1, 1 + self.num_patches, self.width), self.param_dtype)
    self.encoder = TransformerStack(self.depth, self.num_heads, self.mlp_dim, scan=self.scan, remat=self.remat,
                                    drop_path_rate=self.drop_path_rate, attention=self.attention,
                                    name="encoder", **dt)
    self.norm = L.layer_norm("norm", **dt)
    if self.num_classes:
      self.head = L.dense(self.num_classes, "embed", "classes", name="head", **dt)

  def position_table(self) -> jax.Array:
    """[1, 1 + N, D]: the learned parameter or the fixed sin-cos table (cls row zero)."""
    if self.sincos_pos_embed:
      return jnp.asarray(L.sincos_2d(self.width, self.grid_size, cls_token=True)[None], jnp.float32)
    return self.pos_embed

  def _patchify(self, x, keep_idx=None):
    if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      raise ValueError(f"ViT expects [B, {self.image_size}, {self.image_size}, C] input, got {x.shape} "
                       f"(set image_size to change the token grid)")
    x = self.patch_embed(x.astype(self.dtype), keep_idx)
    pos = self.position_table().astype(self.dtype)
    patch_pos = pos[:, 1:]
    if keep_idx is not None:
      patch_pos = jnp.take(patch_pos[0], keep_idx.astype(jnp.int32), axis=0)
    return x + patch_pos, pos[:, :1]

  def encode(self, x, *, train: bool, keep_idx=None, intermediates: Sequence[int] | None = None):
    """Tokens after the final norm, [B, 1 + K, D] (K = N without keep_idx).

    keep_idx [B, K] int: visible patch indices (MAE); gathered after adding position embeddings,
    the cls token (+ its position row) is prepended afterwards. With `intermediates` (layer
    indices) returns (tokens, {index: that block's output tokens [B, 1 + K, D], before norm}).
    """
    h, inter = self._blocks(x, train=train, keep_idx=keep_idx, intermediates=intermediates)
    h = self.norm(h)
    return (h, inter) if intermediates is not None else h

  def embed(self, x, *, train: bool):
    """The cls embedding [B, D], i.e. `__call__(x)['embedding']`, without computing the other tokens
    through the last block (nothing reads them; the SSL objectives use this)."""
    h, _ = self._blocks(x, train=train, output_tokens=1)
    return self.norm(h[:, 0])

  def _blocks(self, x, *, train: bool, keep_idx=None, intermediates=None, output_tokens: int = 0):
    tokens, cls_pos = self._patchify(x, keep_idx)
    cls = jnp.broadcast_to((self.cls_token.astype(self.dtype) + cls_pos), (tokens.shape[0], 1, self.width))
    h = jnp.concatenate([cls, tokens], axis=1)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
    return self.encoder(h, train=train, intermediates=intermediates, output_tokens=output_tokens)

  def __call__(self, x, *, train: bool):
    h = self.encode(x, train=train)
    out = {"embedding": h[:, 0], "tokens": h[:, 1:]}
    if self.num_classes:
      out["logits"] = self.head(out["embedding"])
    return out


class SpecViT(nn.Module):
  """SpectralAdapter (any >= 75 bands -> 128 channels) + VisionTransformer.

  With use_adapter=False the ViT patchifies the raw bands directly (e.g. 13-band Sentinel-2).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 4
  image_size: int = 128
  num_bands: int = 202
  num_classes: int = 0
  use_adapter: bool = True
  sincos_pos_embed: bool = False
  drop_path_rate: float = 0.0
  scan: bool = False
  remat: str = "none"
  attention: str = "xla"           # 'xla' | 'cudnn' | 'auto' (fmjax.models.transformer.Attention)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    return self.width

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
    return (batch, self.image_size, self.image_size, self.num_bands)

  def setup(self):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_adapter:
      self.spectral_adapter = SpectralAdapter(**dt)
    self.vit_core = VisionTransformer(
        width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        patch_size=self.patch_size, image_size=self.image_size, num_classes=self.num_classes,
        sincos_pos_embed=self.sincos_pos_embed, drop_path_rate=self.drop_path_rate, scan=self.scan,
        remat=self.remat, attention=self.attention, **dt)

  def adapt(self, x, *, train: bool):
    return self.spectral_adapter(x, train=train) if self.use_adapter else x

  def encode(self, x, *, train: bool, keep_idx=None, intermediates: Sequence[int] | None = None):
    return self.vit_core.encode(self.adapt(x, train=train), train=train, keep_idx=keep_idx,
                                intermediates=intermediates)

  def embed(self, x, *, train: bool):
    return self.vit_core.embed(self.adapt(x, train=train), train=train)

  def position_table(self):
    return self.vit_core.position_table()

  def __call__(self, x, *, train: bool):
    return self.vit_core(self.adapt(x, train=train), train=train)
