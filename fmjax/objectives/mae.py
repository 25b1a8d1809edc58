"""Masked autoencoder (He et al. 2022) as used by SpectralEarth: the official formulas, in JAX.

- Masking: noise ~ U(0, 1) per token, argsort ascending, keep the first int(N * (1 - r)) tokens;
  mask is 1 for removed tokens, in the original token order; ids_restore = argsort(ids_shuffle).
- The encoder (SpecViT with a fixed sin-cos position table) sees the visible tokens only.
- The decoder fills mask tokens, adds its own fixed sin-cos table and predicts p*p*C values/patch.
- Target: the normalised input (all bands, not the adapter output) patchified in (p, q, c) order;
  with norm_pix each patch is standardised by its mean and UNBIASED variance (torch .var), eps 1e-6.
- Loss: per-patch MSE averaged over the masked patches only.

config.objective: name 'mae', mask_ratio, norm_pix, decoder_width, decoder_depth, decoder_heads.
config.model: name (a ViT from fmjax.models), patch_size, dtype, remat, scan, attention, drop_path_rate;
  image size and band count come from config.data (crop_size, num_bands).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmjax.models import MAEDecoder, build_model
from fmjax.objectives.base import LossOutput, ViewSpec

RGB_BANDS_202 = (43, 28, 10)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  return int(num_patches * (1 - mask_ratio))


def random_masking(noise: jax.Array, mask_ratio: float):
  """(keep_idx [B, K], mask [B, N] (1 = removed), ids_restore [B, N]) from noise [B, N]."""
  batch, length = noise.shape
  keep = num_kept(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  keep_idx = ids_shuffle[:, :keep]
  mask = jnp.concatenate([jnp.zeros([batch, keep]), jnp.ones([batch, length - keep])], axis=1)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return keep_idx, mask, ids_restore


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p*p*C] in (p, q, c) order, patches row-major."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int) -> jax.Array:
  b, n, _ = patches.shape
  grid = int(round(n ** 0.5))
  x = patches.reshape(b, grid, grid, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * patch, grid * patch, channels)


def normalize_patches(target: jax.Array, eps: float = 1e-6):
  """(normalised target, mean, std) per patch with torch's unbiased variance."""
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
  std = jnp.sqrt(var + eps)
  return (target - mean) / std, mean, std


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch: int, norm_pix: bool = True):
  """Mean over masked patches of the per-patch mean squared error (the official forward_loss)."""
  target = patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    target, _, _ = normalize_patches(target)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEModel(nn.Module):
  """Encoder (a fmjax ViT with `encode(x, train=, keep_idx=)`) + MAEDecoder."""
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, images, keep_idx, ids_restore, *, train: bool):
    latent = self.encoder.encode(images, train=train, keep_idx=keep_idx)
    return self.decoder(latent, ids_restore, train=train)


class MAE:
  name = "mae"
  views = ViewSpec(global_views=1)

  def __init__(self, config):
    model_config, objective_config, data_config = config.model, config.objective, config.data
    self.patch = int(model_config.patch_size)
    self.image_size = int(data_config.crop_size)
    self.num_bands = int(data_config.num_bands)
    self.mask_ratio = float(objective_config.get("mask_ratio", 0.9))
    self.norm_pix = bool(objective_config.get("norm_pix", True))
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"objective.mask_ratio={self.mask_ratio} must be in [0, 1)")
    self.num_patches = (self.image_size // self.patch) ** 2
    self.tokens_per_sample = self.num_patches
    common = dict(dtype=model_config.get("dtype", "float32"), remat=model_config.get("remat", "none"),
                  scan=bool(model_config.get("scan", False)), attention=model_config.get("attention", "xla"))
    overrides = dict(patch_size=self.patch, image_size=self.image_size, sincos_pos_embed=True,
                     num_bands=self.num_bands, **common)
    for key in ("width", "depth", "num_heads", "mlp_dim", "use_adapter", "drop_path_rate"):
      if model_config.get(key, None) is not None:
        overrides[key] = model_config[key]
    encoder = build_model(model_config.name, **overrides)
    from fmjax.models.layers import resolve_dtype
    decoder = MAEDecoder(patch_size=self.patch, out_channels=self.num_bands,
                         width=int(objective_config.get("decoder_width", 512)),
                         depth=int(objective_config.get("decoder_depth", 1)),
                         num_heads=int(objective_config.get("decoder_heads", 16)),
                         remat=common["remat"], scan=common["scan"], attention=common["attention"],
                         dtype=resolve_dtype(common["dtype"]))
    self.model = MAEModel(encoder=encoder, decoder=decoder)

  def _masking(self, rng, batch_size):
    noise = jax.random.uniform(rng, (batch_size, self.num_patches))
    return random_masking(noise, self.mask_ratio)

  def _images(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    image = batch["image"]
    return image[:, 0] if image.ndim == 5 else image

  def init(self, rng, batch):
    images = self._images(batch)
    mask_rng, param_rng = jax.random.split(rng)
    keep_idx, _, ids_restore = self._masking(mask_rng, images.shape[0])
    variables = self.model.init({"params": param_rng, "dropout": param_rng}, images, keep_idx, ids_restore,
                                train=False)
    return dict(variables), {}

  def forward(self, variables, batch, rng, train: bool):
    images = self._images(batch)
    mask_rng, drop_rng = jax.random.split(rng)
    keep_idx, mask, ids_restore = self._masking(mask_rng, images.shape[0])
    mutable = [k for k in variables if k != "params"] if train else False
    out = self.model.apply(variables, images, keep_idx, ids_restore, train=train, rngs={"dropout": drop_rng},
                           mutable=mutable)
    pred, updates = out if train else (out, {})
    return images, pred, mask, updates

  def loss(self, variables, objective_state, batch, rng, step) -> LossOutput:
    images, pred, mask, updates = self.forward(variables, batch, rng, train=True)
    loss = mae_loss(pred, images, mask, self.patch, self.norm_pix)
    return LossOutput(loss, {"mask_fraction": jnp.mean(mask)}, dict(updates), objective_state)

  def after_update(self, variables, objective_state, step):
    return objective_state

  def backbone_variables(self, variables, objective_state) -> dict[str, Any]:
    return {collection: tree["encoder"] for collection, tree in variables.items() if "encoder" in tree}

  def images(self, variables, objective_state, batch, rng, max_samples: int = 4) -> dict[str, jax.Array]:
    """'reconstruction': rows of [input | masked input | reconstruction (visible patches pasted)].

    Pseudo-RGB from bands 43/28/10 (202-band EnMAP), each sample stretched to its input's 2-98 %.
    """
    sub = jax.tree.map(lambda x: x[:max_samples], dict(batch))
    images, pred, mask, _ = self.forward(variables, sub, rng, train=False)
    images = images.astype(jnp.float32)
    target = patchify(images, self.patch)
    if self.norm_pix:  # predictions are per-patch standardised: undo with the true patch statistics
      _, mean, std = normalize_patches(target)
      pred = pred.astype(jnp.float32) * std + mean
    keep = (1 - mask)[..., None]
    recon = unpatchify(pred * mask[..., None] + target * keep, self.patch, self.num_bands)
    masked = unpatchify(target * keep, self.patch, self.num_bands)
    bands = RGB_BANDS_202 if self.num_bands > max(RGB_BANDS_202) else (self.num_bands - 1, self.num_bands // 2, 0)
    rgb = lambda x: x[..., list(bands)]
    lo = jnp.percentile(rgb(images), 2, axis=(1, 2, 3), keepdims=True)
    hi = jnp.percentile(rgb(images), 98, axis=(1, 2, 3), keepdims=True)
    stretch = lambda x: jnp.clip((rgb(x) - lo) / jnp.maximum(hi - lo, 1e-6), 0, 1)
    masked_rgb = stretch(masked) * keep_map(mask, self.patch, images.shape[1]) + \
        0.5 * (1 - keep_map(mask, self.patch, images.shape[1]))  # grey for removed patches
    row = jnp.concatenate([stretch(images), masked_rgb, stretch(recon)], axis=2)
    return {"reconstruction": row}


def keep_map(mask: jax.Array, patch: int, size: int) -> jax.Array:
  """[B, H, W, 1]: 1 on visible pixels, 0 on removed patches."""
  grid = size // patch
  visible = (1 - mask).reshape(mask.shape[0], grid, grid)
  return jnp.repeat(jnp.repeat(visible, patch, axis=1), patch, axis=2)[..., None]


def build(config) -> MAE:
  return MAE(config)
