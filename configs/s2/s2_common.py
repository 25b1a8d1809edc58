"""Shared Sentinel-2 (SSL4EO-S12) settings for the configs in configs/s2/.

Every S2 pretraining config starts from the SpectralEarth recipe builder of the same objective
(configs/common.py, moco_vit_s.py, dino_vit_s.py) and changes only the data and the model:
  data   DIR written by `python -m data_prep.ssl4eo_s12`; 13 bands (L1C, product=s2c) or 12 (L2A,
         product=s2a); random 224 crops of the 264 px patches; the two MoCo/DINO views come from two
         different seasons of a location (the pipeline draws two distinct timestamps of a record);
         normalisation norm=dataset (per-band mean/std, DIR/band_stats.json) or norm=scale10000
         (x / 10000 clipped to [0, 1]).
  model  resnet18 / resnet50 (torchvision layout, 13 input channels) or ViT-S/16 on the raw bands
         (no spectral adapter: it needs >= 75 bands).
Config arguments (after ':'), besides the recipe's own: product=s2c|s2a, norm=dataset|scale10000,
crop=224.
"""
from __future__ import annotations

NUM_BANDS = {"s2c": 13, "s2a": 12}
NORMS = ("dataset", "scale10000")


def split_arg(arg: str | None) -> tuple[dict, str]:
  """Pulls the S2 keys out of 'k=v,...' and returns (s2 options, the rest for the recipe builder)."""
  s2 = dict(product="s2c", norm="dataset", crop="224")
  rest = []
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key in s2:
      s2[key] = value
    else:
      rest.append(item)
  if s2["product"] not in NUM_BANDS:
    raise ValueError(f"product={s2['product']!r} is not known; valid choices: {sorted(NUM_BANDS)}")
  if s2["norm"] not in NORMS:
    raise ValueError(f"norm={s2['norm']!r} is not known; valid choices: {NORMS}")
  return s2, ",".join(rest)


def apply_s2(c, s2: dict, model: str):
  """Sets the S2 data block and the backbone on a pretraining config built by a recipe builder."""
  c.data.num_bands = NUM_BANDS[s2["product"]]
  c.data.crop_size = int(s2["crop"])
  c.data.stats = s2["norm"]
  c.data.nodata_fill = "mean"     # Sentinel-2 nodata is 0 in every band
  c.model.name = model
  if model.startswith("resnet"):
    for key in ("patch_size", "remat"):   # ViT-only options
      if key in c.model:
        del c.model[key]
  else:
    c.model.patch_size = 16
    c.model.use_adapter = False
  return c
