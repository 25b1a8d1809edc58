"""MAE masking and loss vs an independent NumPy transcription of the official PyTorch code.

The reference below follows facebookresearch/mae models_mae.py (random_masking, patchify,
forward_loss) line by line in NumPy, on NCHW images like the original; fmjax works channels-last.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fmjax.objectives import mae


def ref_random_masking(noise, mask_ratio):
  n, length = noise.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = np.argsort(noise, axis=1, kind="stable")
  ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
  ids_keep = ids_shuffle[:, :len_keep]
  mask = np.ones([n, length])
  mask[:, :len_keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  return ids_keep, mask, ids_restore


def ref_patchify(imgs_nchw, p):
  n, c, h, w = imgs_nchw.shape
  gh, gw = h // p, w // p
  x = imgs_nchw.reshape(n, c, gh, p, gw, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, gh * gw, p * p * c)


def ref_forward_loss(imgs_nchw, pred, mask, p, norm_pix_loss=True):
  target = ref_patchify(imgs_nchw, p).astype(np.float64)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)  # torch.Tensor.var is unbiased
    target = (target - mean) / (var + 1.0e-6) ** 0.5
  loss = (pred - target) ** 2
  loss = loss.mean(axis=-1)
  return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("mask_ratio", [0.75, 0.9])
def test_masking_matches_official(mask_ratio):
  rng = np.random.default_rng(0)
  noise = rng.uniform(size=(3, 64)).astype(np.float32)
  keep, mask, restore = mae.random_masking(jnp.asarray(noise), mask_ratio)
  ref_keep, ref_mask, ref_restore = ref_random_masking(noise, mask_ratio)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  np.testing.assert_array_equal(np.asarray(restore), ref_restore)
  assert keep.shape[1] == int(64 * (1 - mask_ratio))


def test_patchify_order_and_roundtrip():
  rng = np.random.default_rng(1)
  imgs = rng.normal(size=(2, 5, 8, 8)).astype(np.float32)  # NCHW like PyTorch
  ours = mae.patchify(jnp.asarray(imgs.transpose(0, 2, 3, 1)), 4)
  np.testing.assert_array_equal(np.asarray(ours), ref_patchify(imgs, 4))
  back = mae.unpatchify(ours, 4, 5)
  np.testing.assert_array_equal(np.asarray(back), imgs.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_official(norm_pix):
  rng = np.random.default_rng(2)
  b, c, size, p = 3, 7, 16, 4
  imgs = rng.normal(loc=2.0, scale=3.0, size=(b, c, size, size)).astype(np.float32)
  pred = rng.normal(size=(b, (size // p) ** 2, p * p * c)).astype(np.float32)
  noise = rng.uniform(size=(b, (size // p) ** 2)).astype(np.float32)
  _, ref_mask, _ = ref_random_masking(noise, 0.75)
  _, mask, _ = mae.random_masking(jnp.asarray(noise), 0.75)
  ours = mae.mae_loss(jnp.asarray(pred), jnp.asarray(imgs.transpose(0, 2, 3, 1)), mask, p, norm_pix)
  ref = ref_forward_loss(imgs, pred.astype(np.float64), ref_mask, p, norm_pix)
  np.testing.assert_allclose(float(ours), ref, rtol=2e-6)


def test_biased_variance_would_be_detected():
  """Guards the trap: with biased variance the loss differs by ~1e-3 relative (so the test above bites)."""
  rng = np.random.default_rng(3)
  imgs = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
  target = ref_patchify(imgs, 4)
  unbiased, _, _ = mae.normalize_patches(jnp.asarray(target))
  biased = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  assert np.abs(np.asarray(unbiased) - biased).max() > 1e-3


def test_objective_loss_uses_masked_patches_only():
  """The whole objective: with a predictor equal to the target on masked patches the loss is 0."""
  rng = np.random.default_rng(4)
  b, c, size, p = 2, 6, 16, 4
  imgs = jnp.asarray(rng.normal(size=(b, size, size, c)).astype(np.float32))
  noise = jax.random.uniform(jax.random.key(0), (b, (size // p) ** 2))
  _, mask, _ = mae.random_masking(noise, 0.75)
  target, _, _ = mae.normalize_patches(mae.patchify(imgs, p))
  garbage_on_visible = target + 100.0 * (1 - mask)[..., None]
  assert float(mae.mae_loss(garbage_on_visible, imgs, mask, p)) < 1e-10
