"""Heads: the MAE decoder's un-shuffling against a NumPy reference, official decoder size, and the
output shapes of the segmentation / FCN / UNet heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from fmjax.models import FCNHead, MAEDecoder, SegmentationHead, UNetDecoder, build_model, layers as L
from fmjax.models.convolution import resize_bilinear


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_official_decoder_size():
  # ViT-S encoder, 512 wide, 1 block, 16 heads, 4*4*202 outputs (REFERENCE.md MAE recipe).
  d = MAEDecoder(patch_size=4, out_channels=202)
  v = jax.eval_shape(lambda: d.init(jax.random.key(0), jnp.zeros((2, 103, 384)), jnp.zeros((2, 1024), jnp.int32),
                                    train=False))
  p = nn.unbox(v["params"])
  expected = (384 * 512 + 512) + 512 + 12 * 512 * 512 + 13 * 512 + 2 * 512 + (512 * 3232 + 3232)
  assert _count(p) == expected
  out = jax.eval_shape(lambda v: d.apply(v, jnp.zeros((2, 103, 384)), jnp.zeros((2, 1024), jnp.int32), train=False), v)
  assert out.shape == (2, 1024, 4 * 4 * 202)


def test_decoder_unshuffle_matches_numpy():
  """depth=0: pred = pred_dense(LN(restore(embed(tokens), mask token) + sincos)), written in NumPy.

  MAE masking: noise -> argsort ascending -> keep the first K; ids_restore = argsort(ids_shuffle).
  """
  b, n, k, d_in, width, p, c = 2, 16, 5, 12, 8, 2, 3
  rng = np.random.default_rng(0)
  ids_shuffle = np.argsort(rng.uniform(size=(b, n)), axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1).astype(np.int32)
  tokens = rng.normal(size=(b, 1 + k, d_in)).astype(np.float32)
  dec = MAEDecoder(patch_size=p, out_channels=c, width=width, depth=0, num_heads=2)
  v = jax.jit(lambda t, i: dec.init(jax.random.key(0), t, i, train=False))(tokens, ids_restore)
  params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32), nn.unbox(v["params"]))
  ours = np.asarray(jax.jit(lambda pr, t, i: dec.apply({"params": pr}, t, i, train=False))(params, tokens, ids_restore))

  x = tokens @ params["decoder_embed"]["kernel"] + params["decoder_embed"]["bias"]        # [b, 1+k, w]
  full = np.empty((b, n, width))
  for s in range(b):
    for j in range(n):
      rank = ids_restore[s, j]                    # position of patch j in the shuffled order
      full[s, j] = x[s, 1 + rank] if rank < k else params["mask_token"][0, 0]
  x = np.concatenate([x[:, :1], full], axis=1) + L.sincos_2d(width, 4)[None]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  x = (x - mu) / np.sqrt(var + 1e-6) * params["decoder_norm"]["scale"] + params["decoder_norm"]["bias"]
  ref = (x @ params["decoder_pred"]["kernel"] + params["decoder_pred"]["bias"])[:, 1:]
  assert ours.shape == (b, n, p * p * c)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_vit_segmentation_head_full_resolution():
  head = SegmentationHead(num_classes=5, patch_size=4, channels=8)
  tokens = jnp.ones((2, 16, 12))                  # 4x4 grid -> 16x16 (two x2 stages)
  out = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), tokens, train=False)[0])
  assert out.shape == (2, 16, 16, 5)


def test_bilinear_upsampling_matches_torch():
  x = np.random.default_rng(1).normal(size=(2, 3, 5, 4)).astype(np.float32)
  ours = np.asarray(resize_bilinear(jnp.asarray(x), 6, 10))
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(6, 10), mode="bilinear",
                                        align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_fcn_head_on_dilated_specresnet():
  model = build_model("spec_resnet50_dilated", image_size=8)
  feats = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                         jax.ShapeDtypeStruct((1, 8, 8, 202), jnp.float32))["features"]
  assert [f.shape for f in feats] == [(1, 8, 8, c) for c in (256, 512, 1024, 2048)]
  head = FCNHead(num_classes=14)
  out = jax.eval_shape(lambda f: head.init_with_output(jax.random.key(0), f, train=False, output_size=(8, 8))[0],
                       feats[-1])
  assert out.shape == (1, 8, 8, 14)


def test_unet_decoder_on_resnet18_detail_stem():
  model = build_model("resnet18", in_channels=4, detail_stem=True, image_size=32)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 4))
  feats = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], x)["features"]
  assert [f.shape[1] for f in feats] == [32 // s for s in model.feature_strides]
  unet = UNetDecoder(num_classes=2, channels=(16, 8, 8, 4, 4))
  out = jax.eval_shape(lambda f: unet.init_with_output(jax.random.key(0), f, train=False, output_size=(32, 32))[0],
                       feats)
  assert out.shape == (2, 32, 32, 2)


@pytest.mark.slow
def test_unet_decoder_gradients_reach_every_feature_map():
  unet = UNetDecoder(num_classes=2, channels=(8, 4, 4))
  small = [jnp.ones((1, 8 // 2 ** i, 8 // 2 ** i, 3)) for i in range(3)]
  v = jax.jit(lambda f: unet.init(jax.random.key(0), f, train=False, output_size=(16, 16)))(small)
  g = jax.jit(jax.grad(lambda f: jnp.sum(unet.apply(v, f, train=False, output_size=(16, 16)) ** 2)))(small)
  assert all(float(jnp.abs(x).sum()) > 0 for x in g)
