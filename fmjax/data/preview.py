"""Pseudo-RGB previews of records or batches: a quick look at what the model is fed.

    write_preview_png(batch, "views.png")                  # rows = samples, columns = views
    write_preview_png(records, "locations.png")            # rows = locations, columns = timestamps

Three bands (default 43/28/10 of the 202-band SpectralEarth layout: red ~650 nm, green ~550 nm,
blue ~470 nm) are stretched between per-channel percentiles computed per row (over all tiles of one
sample / location), so the timestamps or views of one location are directly comparable while a
bright scene (snow, cloud) does not darken the other rows. Nodata pixels show black.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fmjax.data import records as records_lib

RGB_BANDS_202 = (43, 28, 10)
_GAP = 2  # pixels between tiles


def _tiles_from_input(batch_or_records, max_samples: int):
  """-> (rows of [H, W, C] float tiles or None, rows of [H, W] valid masks)."""
  if isinstance(batch_or_records, Mapping):
    if "image" not in batch_or_records:
      raise ValueError(f"a batch needs an 'image' entry [B, V, H, W, C]; got keys {sorted(batch_or_records)}")
    image = np.asarray(batch_or_records["image"], np.float32)
    if image.ndim == 4:  # [B, H, W, C]: one view
      image = image[:, None]
    if image.ndim != 5:
      raise ValueError(f"batch['image'] must be [B, V, H, W, C], got shape {image.shape}")
    rows = [list(sample) for sample in image[:max_samples]]
    masks = [[np.ones(t.shape[:2], bool) for t in row] for row in rows]
    return rows, masks
  rows, masks = [], []
  for record in list(batch_or_records)[:max_samples]:
    if not isinstance(record, records_lib.LocationRecord):
      raise TypeError(f"expected a batch dict or LocationRecords, got {type(record).__name__}")
    pixels = record.pixels
    rows.append([p.astype(np.float32) for p in pixels])
    masks.append([np.all(p != record.nodata, axis=-1) for p in pixels])
  return rows, masks


def preview_image(batch_or_records, bands: Sequence[int] = RGB_BANDS_202, max_samples: int = 4,
                  percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
  """The preview as a uint8 [rows*H, cols*W, 3] array (see the module docstring)."""
  rows, masks = _tiles_from_input(batch_or_records, max_samples)
  if not rows:
    raise ValueError("nothing to preview: the batch / record list is empty")
  num_channels = rows[0][0].shape[-1]
  bands = [int(b) for b in bands]
  if len(bands) != 3 or any(not 0 <= b < num_channels for b in bands):
    raise ValueError(f"bands {bands} must be 3 indices in [0, {num_channels - 1}] "
                     f"(the data has {num_channels} bands)")
  rgb_rows = [[tile[..., bands] for tile in row] for row in rows]
  stretches = []
  for row, mrow in zip(rgb_rows, masks):
    valid = np.concatenate([rgb[m] for rgb, m in zip(row, mrow)])
    low, high = np.percentile(valid, percentiles, axis=0) if valid.size else (np.zeros(3), np.ones(3))
    stretches.append((low, np.where(high > low, high - low, 1.0)))
  tile_h = max(t.shape[0] for row in rgb_rows for t in row)
  tile_w = max(t.shape[1] for row in rgb_rows for t in row)
  cols = max(len(row) for row in rgb_rows)
  canvas = np.full((len(rgb_rows) * (tile_h + _GAP) - _GAP, cols * (tile_w + _GAP) - _GAP, 3), 255, np.uint8)
  for r, (row, mrow, (low, span)) in enumerate(zip(rgb_rows, masks, stretches)):
    for c, (rgb, mask) in enumerate(zip(row, mrow)):
      tile = np.clip((rgb - low) / span, 0.0, 1.0)
      tile = np.where(mask[..., None], tile, 0.0)
      y, x = r * (tile_h + _GAP), c * (tile_w + _GAP)
      canvas[y:y + rgb.shape[0], x:x + rgb.shape[1]] = np.round(tile * 255).astype(np.uint8)
  return canvas


def write_preview_png(batch_or_records, path: str, bands: Sequence[int] = RGB_BANDS_202,
                      max_samples: int = 4, percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
  """Writes the preview PNG to `path` and returns the image array."""
  from PIL import Image
  image = preview_image(batch_or_records, bands, max_samples, percentiles)
  Image.fromarray(image).save(path)
  return image
