"""NumPy/OpenCV augmentations that run inside Grain workers: crops, flips, blur, multi-crop views.

Everything is channels-last ([H, W, C], C = 202 for EnMAP) and seeded by a `np.random.Generator`
that the pipeline derives from (seed, epoch, record index), so a run is reproducible whatever the
number of hosts, threads or workers.

Cost model (why the code looks like this): an EnMAP patch is 128x128x202 int16 (6.6 MB). The crop is
sliced in int16 (a view, no copy) and flipped there (negative strides: bilinear resizing with
half-pixel centres commutes with flips), converted to float32 once, resized with OpenCV's bilinear
kernel (the same weights as torch `interpolate(align_corners=False)`, 2 taps per axis) and blurred
with OpenCV's separable filter; normalisation runs last, over the output. On this 2-core host that is
~7 ms for a 100x100x202 crop -> 128x128, against ~22 ms for the two BLAS matmuls of the matrix form
(`view_matrices`), which computes every zero of the interpolation matrices. The matrix form stays:
it is the reference the tests hold OpenCV to, the fallback beyond OpenCV's 512 channels, and the
device path (`plan_views` / `apply_planned_views`), where a batched matmul is what an accelerator
does best.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

# OpenCV's limit on channels per image (CV_CN_MAX in OpenCV 4; OpenCV 5 lowered it to 128).
_CV_MAX_CHANNELS = 512


@dataclasses.dataclass(frozen=True)
class CropConfig:
  """One kind of view: random resized crop to `size`, then flips and blur."""
  size: int = 128
  scale: tuple[float, float] = (0.4, 1.0)          # fraction of the image area
  ratio: tuple[float, float] = (3 / 4, 4 / 3)      # aspect ratio w/h range (log-uniform)
  hflip: float = 0.5                                # probabilities
  vflip: float = 0.5
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)     # pixels at the output resolution


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop rule.

  Ten tries at a box of area U(scale)*H*W and log-uniform aspect ratio that fits; else the
  central crop with the aspect ratio clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] bilinear interpolation matrix (half-pixel centres, no antialiasing).

  Same weights as torch `interpolate(mode='bilinear', align_corners=False, antialias=False)`;
  equal sizes give the identity matrix (so a full crop at the output size is exact).
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """Normalised 1-D Gaussian with radius int(truncate*sigma + 0.5) (scipy.ndimage's rule)."""
  radius = max(int(truncate * sigma + 0.5), 0)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return kernel / kernel.sum()


def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """[size, size] matrix of the 1-D Gaussian convolution with mirror ('reflect' in torch) edges."""
  kernel = gaussian_kernel(sigma, truncate)
  radius = len(kernel) // 2
  matrix = np.zeros((size, size), np.float64)
  rows = np.arange(size)
  period = max(2 * (size - 1), 1)
  for offset, weight in zip(range(-radius, radius + 1), kernel):
    # Mirror about the edge pixels (d c b | a b c d | c b a), repeated for kernels wider than the image.
    src = np.abs(rows + offset) % period if size > 1 else np.zeros_like(rows)
    src = np.where(src >= size, period - src, src)
    np.add.at(matrix, (rows, src), weight)
  return matrix


def apply_separable(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """out[s, t, c] = sum_{h, w} rows[s, h] * image[h, w, c] * cols[t, w]: two BLAS matmuls."""
  image = np.asarray(image, np.float32)
  h, w, c = image.shape
  out = (rows.astype(np.float32) @ image.reshape(h, w * c)).reshape(rows.shape[0], w, c)
  return np.matmul(cols.astype(np.float32)[None], out)  # [1, T, w] @ [S, w, c] -> [S, T, c]


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize of [H, W, C] to [out_h, out_w, C] float32 (no antialiasing)."""
  h, w = image.shape[:2]
  return apply_separable(image, resize_matrix(h, out_h), resize_matrix(w, out_w))


def gaussian_blur(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """Separable Gaussian blur of [H, W, C] (mirror edges) in float32."""
  h, w = image.shape[:2]
  return apply_separable(image, blur_matrix(h, sigma, truncate), blur_matrix(w, sigma, truncate))


@dataclasses.dataclass(frozen=True)
class ViewDraw:
  """The random parameters of one view: crop box (top, left, h, w), flips, blur sigma (None: none)."""
  box: tuple[int, int, int, int]
  hflip: bool
  vflip: bool
  sigma: float | None


def draw_view(rng: np.random.Generator, height: int, width: int, config: CropConfig) -> ViewDraw:
  """Draws one view's parameters, always in this order: crop box, hflip, vflip, blur (+ sigma).

  The host path (`crop_view`) and the device path (`plan_views`) both draw through here, so the
  same generator gives the same views on both.
  """
  box = sample_crop_box(rng, height, width, config.scale, config.ratio)
  hflip = bool(rng.uniform() < config.hflip)
  vflip = bool(rng.uniform() < config.vflip)
  sigma = None
  if config.blur_prob > 0 and rng.uniform() < config.blur_prob:
    sigma = float(rng.uniform(*config.blur_sigma))
  return ViewDraw(box, hflip, vflip, sigma)


def draw_matrices(draw: ViewDraw, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The [S, h] / [S, w] matrices doing a drawn view's resize, flips and blur at once."""
  _, _, h, w = draw.box
  rows, cols = resize_matrix(h, size), resize_matrix(w, size)
  if draw.hflip:
    cols = cols[::-1]
  if draw.vflip:
    rows = rows[::-1]
  if draw.sigma is not None:
    blur = blur_matrix(size, draw.sigma)
    rows, cols = blur @ rows, blur @ cols
  return np.ascontiguousarray(rows), np.ascontiguousarray(cols)


def view_matrices(rng: np.random.Generator, height: int, width: int, config: CropConfig):
  """Random crop box and the two [S, h] / [S, w] matrices doing resize, flips and blur at once.

  Every geometric/filtering step here is linear and separable, so the whole augmentation of a view
  is `rows @ crop @ cols.T` per band; the same matrices over the full image (`embed_matrices`,
  `plan_views`) let a jitted function (`apply_planned_views`) do it on the accelerator from int16
  pixels (pipeline augment_on='device').
  """
  draw = draw_view(rng, height, width, config)
  return (draw.box, *draw_matrices(draw, config.size))


def embed_matrices(box, rows: np.ndarray, cols: np.ndarray, height: int, width: int):
  """The view's matrices over the FULL image ([S, H], [S, W]): zero outside the crop box."""
  top, left, h, w = box
  full_rows = np.zeros((rows.shape[0], height), np.float32)
  full_cols = np.zeros((cols.shape[0], width), np.float32)
  full_rows[:, top:top + h] = rows
  full_cols[:, left:left + w] = cols
  return full_rows, full_cols


def crop_view(pixels: np.ndarray, rng: np.random.Generator, config: CropConfig,
              fill: np.ndarray | None = None, nodata: int | None = None,
              mean: np.ndarray | None = None, inv_std: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
  """One augmented view [S, S, C] float32 of one timestamp [H, W, C].

  `fill` [C] (raw units) replaces pixels equal to `nodata` before resizing, so the sentinel never
  bleeds into neighbours through interpolation or blur. With `mean`/`inv_std` [C] the view is
  normalised, (x - mean) * inv_std, after resizing (every interpolation/blur weight row sums to
  1, so that equals normalising the crop first). `out` [S, S, C] (e.g. a slot of the batch array)
  receives the view; a C-contiguous float32 `out` is written by OpenCV directly, with no copy.
  """
  draw = draw_view(rng, pixels.shape[0], pixels.shape[1], config)
  top, left, h, w = draw.box
  crop = pixels[top:top + h, left:left + w]          # int16 view: no copy yet
  if draw.vflip:
    crop = crop[::-1]
  if draw.hflip:
    crop = crop[:, ::-1]
  size, channels = config.size, crop.shape[-1]
  dst = out if out is not None and out.dtype == np.float32 and out.flags.c_contiguous else None
  resize = (h, w) != (size, size)
  direct = dst is not None and not resize and draw.sigma is None
  image = dst if direct else np.empty(crop.shape, np.float32)
  np.copyto(image, crop)                             # the one conversion of the crop, contiguous
  if fill is not None and nodata is not None:
    bad = crop == nodata
    if bad.any():
      np.copyto(image, np.broadcast_to(np.asarray(fill, np.float32), image.shape), where=bad)
  if channels > _CV_MAX_CHANNELS:
    rows, cols = draw_matrices(ViewDraw(draw.box, False, False, draw.sigma), size)  # flips done above
    view = apply_separable(image, rows, cols)
  else:
    view = image
    if resize:  # straight into `dst` unless a blur follows (it reads the resized view)
      resize_dst = dst if draw.sigma is None else None
      view = _cv_into(cv2.resize(view, (size, size), dst=resize_dst, interpolation=cv2.INTER_LINEAR),
                      resize_dst, channels)
    if draw.sigma is not None:
      view = _cv_blur(view, draw.sigma, dst)
  if dst is not None and view is not dst:
    np.copyto(dst, view)
    view = dst
  if mean is not None:
    # Tiled over a whole output row, the per-band vectors broadcast in long inner loops: 3x faster
    # than broadcasting [C] over [S, S, C].
    flat = view.reshape(size, size * channels)
    flat -= np.tile(np.asarray(mean, np.float32), size)
    flat *= np.tile(np.asarray(inv_std, np.float32), size)
  if out is not None and view is not out:
    out[...] = view                                  # another dtype (bfloat16 batches) or layout
    return out
  return view


def _cv_into(result: np.ndarray, dst: np.ndarray | None, channels: int) -> np.ndarray:
  """An OpenCV result as [S, S, C]: `dst` when OpenCV wrote into it (it may reallocate instead,
  and it drops a trailing channel axis of length 1)."""
  if dst is not None and np.shares_memory(result, dst):
    return dst
  return result if result.ndim == 3 else result.reshape(*result.shape, channels)


def _cv_blur(image: np.ndarray, sigma: float, dst: np.ndarray | None = None) -> np.ndarray:
  """`gaussian_blur` through OpenCV's separable filter (mirror edges = BORDER_REFLECT_101)."""
  kernel = gaussian_kernel(sigma).astype(np.float32)
  if len(kernel) // 2 >= min(image.shape[:2]):  # kernel wider than the image: repeated mirroring
    return gaussian_blur(image, sigma)
  out = cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, dst=dst, borderType=cv2.BORDER_REFLECT_101)
  return _cv_into(out, dst, image.shape[-1])


def choose_timestamps(rng: np.random.Generator, num_timestamps: int, num_views: int) -> np.ndarray:
  """Timestamp index per view: distinct while the location has enough, then repeated.

  With 2 views and a location of >= 2 timestamps the views are two different dates (temporal
  positives); a single-timestamp location gives the same date twice (augmentations still differ).
  """
  order = rng.permutation(num_timestamps)
  return order[np.arange(num_views) % num_timestamps]


def make_views(pixels: np.ndarray, rng: np.random.Generator, global_crop: CropConfig,
               num_global: int, local_crop: CropConfig | None = None, num_local: int = 0,
               fill: np.ndarray | None = None, nodata: int | None = None,
               mean: np.ndarray | None = None, inv_std: np.ndarray | None = None,
               out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Global (and local) views of one location [T, H, W, C] (an array or a `records.CompressedStack`).

  Returns {'image': [V, S, S, C], 'local': [L, s, s, C] (when num_local > 0),
  'timestamp_index': [V]} in float32 (normalised when `mean`/`inv_std` are given). Local crops
  come from the timestamps of the global views, cycling through them. `out` {'image', 'local'}:
  arrays to write the views into (the pipeline passes this sample's slots of the batch arrays).
  """
  if num_local and local_crop is None:
    raise ValueError(f"num_local={num_local} local crops asked for but no local CropConfig given")
  out = dict(out or {})
  chosen = choose_timestamps(rng, pixels.shape[0], num_global)
  views = [crop_view(pixels[int(t)], rng, global_crop, fill, nodata, mean, inv_std,
                     None if "image" not in out else out["image"][v]) for v, t in enumerate(chosen)]
  result = {"image": out["image"] if "image" in out else np.stack(views),
            "timestamp_index": chosen.astype(np.int32)}
  if num_local:
    local = [crop_view(pixels[int(chosen[i % num_global])], rng, local_crop, fill, nodata, mean, inv_std,
                       None if "local" not in out else out["local"][i]) for i in range(num_local)]
    result["local"] = out["local"] if "local" in out else np.stack(local)
  return result


def plan_views(pixels: np.ndarray, rng: np.random.Generator, global_crop: CropConfig, num_global: int,
               local_crop: CropConfig | None = None, num_local: int = 0) -> dict[str, np.ndarray]:
  """`make_views` without doing the pixel work: what a jitted function needs to do it on device.

  Draws the same random numbers in the same order as `make_views`, so both paths give the same
  views. Returns {'pixels': [V, H, W, C] int16 (the chosen timestamps), 'rows': [V, S, H],
  'cols': [V, S, W] float32, 'timestamp_index': [V]} plus, with local crops, 'local_rows'
  [L, s, H], 'local_cols' [L, s, W] and 'local_source' [L] (index into the V views).
  """
  _, height, width, _ = pixels.shape
  chosen = choose_timestamps(rng, pixels.shape[0], num_global)
  mats = [embed_matrices(*view_matrices(rng, height, width, global_crop), height, width) for _ in chosen]
  out = {"pixels": np.stack([pixels[int(t)] for t in chosen]), "rows": np.stack([m[0] for m in mats]),
         "cols": np.stack([m[1] for m in mats]), "timestamp_index": chosen.astype(np.int32)}
  if num_local:
    if local_crop is None:
      raise ValueError(f"num_local={num_local} local crops asked for but no local CropConfig given")
    mats = [embed_matrices(*view_matrices(rng, height, width, local_crop), height, width)
            for _ in range(num_local)]
    out["local_rows"] = np.stack([m[0] for m in mats])
    out["local_cols"] = np.stack([m[1] for m in mats])
    out["local_source"] = (np.arange(num_local) % num_global).astype(np.int32)
  return out


def apply_planned_views(batch, mean, inv_std, fill, nodata: int, dtype, clip=None):
  """Jittable (jax.numpy): a batch of `plan_views` outputs [B, ...] -> {'image', 'local'}.

  Nodata pixels take `fill` (raw units), then (x - mean) * inv_std, then rows @ x @ cols.T per
  band: the same arithmetic as `crop_view`, over the full image (zeros outside the crop box).
  `clip` (low, high) clips the normalised views (the pipeline's data.stats='scale10000').
  """
  import jax.numpy as jnp
  pixels = batch["pixels"]                                     # [B, V, H, W, C] int16
  x = (pixels.astype(jnp.float32) - mean) * inv_std
  if fill is not None:
    x = jnp.where(pixels == nodata, (fill - mean) * inv_std, x)

  def apply(x, rows, cols):
    x = jnp.einsum("bvsh,bvhwc->bvswc", rows, x)
    x = jnp.einsum("bvtw,bvswc->bvstc", cols, x)
    return (x if clip is None else jnp.clip(x, *clip)).astype(dtype)

  out = {"image": apply(x, batch["rows"], batch["cols"])}
  if "local_rows" in batch:
    source = jnp.take_along_axis(x, batch["local_source"][:, :, None, None, None], axis=1)
    out["local"] = apply(source, batch["local_rows"], batch["local_cols"])
  return out
