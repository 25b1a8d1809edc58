"""Augmentations: checked against torch interpolate, scipy.ndimage and closed-form invariants."""
import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from fmjax.data import augment


def _image(h=20, w=24, c=5, seed=0):
  return np.random.default_rng(seed).integers(-2000, 9000, (h, w, c)).astype(np.int16)


@pytest.mark.parametrize("in_hw,out_hw", [((20, 24), (16, 16)), ((7, 9), (16, 13)), ((16, 16), (16, 16)),
                                          ((1, 5), (4, 3))])
def test_resize_matches_torch_bilinear(in_hw, out_hw):
  image = _image(*in_hw).astype(np.float32)
  ours = augment.resize_bilinear(image, *out_hw)
  ref = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=out_hw,
                                        mode="bilinear", align_corners=False, antialias=False)
  np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-2)


def test_full_crop_at_input_size_is_identity():
  image = _image(16, 16)
  config = augment.CropConfig(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0)
  out = augment.crop_view(image, np.random.default_rng(3), config)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, image.astype(np.float32))


def test_flips_applied_twice_are_identity():
  image = _image(12, 12)
  flip_all = augment.CropConfig(size=12, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, vflip=1.0)
  once = augment.crop_view(image, np.random.default_rng(0), flip_all)
  np.testing.assert_array_equal(once, image[::-1, ::-1].astype(np.float32))
  twice = augment.crop_view(once.astype(np.int16), np.random.default_rng(1), flip_all)
  np.testing.assert_array_equal(twice, image.astype(np.float32))


def test_crop_boxes_stay_inside_and_follow_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width = 50, 70
  scale, ratio = (0.2, 0.6), (3 / 4, 4 / 3)
  for _ in range(500):
    top, left, h, w = augment.sample_crop_box(rng, height, width, scale, ratio)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    # Rounding to whole pixels moves area and ratio by at most ~one pixel row/column.
    assert scale[0] * 0.9 <= h * w / (height * width) <= scale[1] * 1.1
    assert ratio[0] * 0.9 <= w / h <= ratio[1] * 1.1


def test_impossible_ratio_falls_back_to_central_crop():
  # An image far wider than any allowed ratio: every try fails, the fallback clamps the ratio.
  top, left, h, w = augment.sample_crop_box(np.random.default_rng(0), 10, 100, (0.99, 1.0), (1.0, 1.0))
  assert (top, h, w) == (0, 10, 10) and left == 45


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_gaussian_blur_matches_scipy_mirror(sigma):
  image = _image(15, 11, 3).astype(np.float32)
  ours = augment.gaussian_blur(image, sigma)
  ref = scipy.ndimage.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror",
                                      truncate=4.0)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=5e-3)


def test_gaussian_kernel_closed_form():
  kernel = augment.gaussian_kernel(1.0, truncate=2.0)
  x = np.arange(-2, 3)
  expected = np.exp(-x ** 2 / 2) / np.exp(-x ** 2 / 2).sum()
  np.testing.assert_allclose(kernel, expected)


def test_nodata_replaced_by_fill_before_resize():
  image = _image(8, 8, 4)
  image[2:5, 3:6] = -32768
  fill = np.array([100.0, 200.0, 300.0, 400.0], np.float32)
  config = augment.CropConfig(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0)
  out = augment.crop_view(image, np.random.default_rng(0), config, fill=fill, nodata=-32768)
  np.testing.assert_array_equal(out[2:5, 3:6], np.broadcast_to(fill, (3, 3, 4)))
  # Upsampled, the sentinel must not leak into interpolated neighbours either.
  config = dataclasses.replace(config, size=16)
  out = augment.crop_view(image, np.random.default_rng(0), config, fill=fill, nodata=-32768)
  assert out.min() > -2001


def test_timestamps_distinct_when_available_else_repeated():
  rng = np.random.default_rng(0)
  for _ in range(50):
    pair = augment.choose_timestamps(rng, 3, 2)
    assert pair[0] != pair[1] and set(pair) <= {0, 1, 2}
  np.testing.assert_array_equal(augment.choose_timestamps(rng, 1, 2), [0, 0])


def test_make_views_shapes_and_determinism():
  pixels = np.stack([_image(20, 20, 3, seed=s) for s in range(2)])
  global_crop = augment.CropConfig(size=16, blur_prob=0.5)
  local_crop = augment.CropConfig(size=6, scale=(0.05, 0.3))
  a = augment.make_views(pixels, np.random.default_rng(7), global_crop, 2, local_crop, 3)
  b = augment.make_views(pixels, np.random.default_rng(7), global_crop, 2, local_crop, 3)
  assert a["image"].shape == (2, 16, 16, 3) and a["local"].shape == (3, 6, 6, 3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = augment.make_views(pixels, np.random.default_rng(8), global_crop, 2, local_crop, 3)
  assert not np.array_equal(a["image"], c["image"])


def test_crop_values_come_from_the_cropped_region():
  # A ramp image: a crop at the output size without flips is an exact sub-array of the input.
  h = w = 32
  ramp = (np.arange(h)[:, None] * 100 + np.arange(w)[None, :]).astype(np.int16)[..., None]
  config = augment.CropConfig(size=10, scale=(0.05, 0.2), hflip=0.0, vflip=0.0)
  rng = np.random.default_rng(0)
  for _ in range(20):
    state = rng.bit_generator.state
    top, left, ch, cw = augment.sample_crop_box(rng, h, w, config.scale, config.ratio)
    rng.bit_generator.state = state
    out = augment.crop_view(ramp, rng, config)
    assert ramp[top, left, 0] - 1 <= out.min() and out.max() <= ramp[top + ch - 1, left + cw - 1, 0] + 1
    assert math.isclose(float(out.mean()), float(ramp[top:top + ch, left:left + cw].mean()), abs_tol=60)


def test_fused_view_equals_crop_resize_flip_blur_done_step_by_step():
  # Reference: slice the box, torch bilinear resize, flip, scipy Gaussian blur (mirror edges),
  # with the random parameters drawn in the order `view_matrices` documents.
  image = _image(30, 26, 3)
  config = augment.CropConfig(size=16, scale=(0.3, 0.9), hflip=1.0, vflip=1.0, blur_prob=1.0,
                              blur_sigma=(0.8, 1.5))
  seed = 11
  rng = np.random.default_rng(seed)
  top, left, h, w = augment.sample_crop_box(rng, 30, 26, config.scale, config.ratio)
  rng.uniform(), rng.uniform(), rng.uniform()  # hflip, vflip, blur draws (all taken)
  sigma = rng.uniform(*config.blur_sigma)
  crop = torch.from_numpy(image[top:top + h, left:left + w].astype(np.float32)).permute(2, 0, 1)[None]
  ref = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False,
                                        antialias=False)[0].permute(1, 2, 0).numpy()[::-1, ::-1]
  ref = scipy.ndimage.gaussian_filter(ref.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror")
  ours = augment.crop_view(image, np.random.default_rng(seed), config)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-2)
  # The same matrices embedded over the full image (the device path) give the same view.
  box, rows, cols = augment.view_matrices(np.random.default_rng(seed), 30, 26, config)
  full_rows, full_cols = augment.embed_matrices(box, rows, cols, 30, 26)
  np.testing.assert_allclose(augment.apply_separable(image, full_rows, full_cols), ours, rtol=1e-5, atol=2e-2)


@pytest.mark.parametrize("channels", [1, 4, 202, 600])   # 600 > OpenCV's 512: the matrix fallback
@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_host_view_equals_the_matrix_form_with_nodata_and_normalisation(channels, blur):
  # The host path (OpenCV resize/blur on a flipped int16 crop, normalised last) against the
  # matrix form the device path uses (normalise + fill first, then rows @ x @ cols.T).
  image = _image(40, 36, channels, seed=channels)
  image[5:9, 7:12] = -32768
  rng = np.random.default_rng(channels)
  mean = rng.uniform(-500, 3000, channels).astype(np.float32)
  inv_std = (1 / rng.uniform(500, 2000, channels)).astype(np.float32)
  config = augment.CropConfig(size=24, scale=(0.2, 1.0), hflip=0.5, vflip=0.5, blur_prob=blur)
  for seed in range(6):
    ours = augment.crop_view(image, np.random.default_rng(seed), config, fill=mean, nodata=-32768,
                             mean=mean, inv_std=inv_std)
    box, rows, cols = augment.view_matrices(np.random.default_rng(seed), 40, 36, config)
    normalised = np.where(image == -32768, 0.0, (image - mean) * inv_std).astype(np.float32)
    full_rows, full_cols = augment.embed_matrices(box, rows, cols, 40, 36)
    ref = augment.apply_separable(normalised, full_rows, full_cols)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scale,blur", [((1.0, 1.0), 0.0), ((0.2, 0.9), 0.0), ((0.2, 0.9), 1.0),
                                        ((1.0, 1.0), 1.0)])
def test_views_written_into_batch_slots_equal_returned_views(out_dtype, scale, blur):
  image = _image(24, 24, 7)
  mean, inv_std = np.full(7, 100.0, np.float32), np.full(7, 0.01, np.float32)
  config = augment.CropConfig(size=24, scale=scale, ratio=(1.0, 1.0), blur_prob=blur)
  batch = np.full((3, 24, 24, 7), np.nan, out_dtype)
  for seed in range(3):
    want = augment.crop_view(image, np.random.default_rng(seed), config, mean=mean, inv_std=inv_std)
    got = augment.crop_view(image, np.random.default_rng(seed), config, mean=mean, inv_std=inv_std,
                            out=batch[seed])
    assert np.shares_memory(got, batch)
    np.testing.assert_array_equal(batch[seed], want.astype(out_dtype))
