"""Writes a synthetic SpectralEarth-like archive: physically plausible EnMAP patches as GeoTIFFs.

    python -m data_prep.synthetic --output ROOT --locations 50 [--seed 0] [--defects]
        [--size 128] [--bands 202]

Layout (the same as the real SpectralEarth archive, plus sidecars):
  ROOT/enmap/<7-digit location id>/<5-digit timestamp>.tif  int16 reflectance*10000, bands first,
                                    30 m pixels, UTM CRS (EPSG:326xx/327xx), nodata -32768, the
                                    band wavelengths in the dataset tag `wavelengths_nm`.
  ROOT/landcover/<location id>.npy  uint8 [H, W] latent land-cover map: the dominant material of
                                    each pixel (classes in ROOT/landcover/classes.json, = MATERIALS).
                                    Static over a location's timestamps (clouds are not land cover).
  ROOT/synthetic.json               generation parameters.
  ROOT/defects.json                 with --defects: every injected defect (kind, path, details).

Each pixel is a linear mixture of material spectra (water, forest, cropland, soil, built-up, snow)
evaluated on the EnMAP wavelengths; abundances come from spatially smooth random fields, sharpened
by a softmax so land cover forms patches. Timestamps of one location differ by vegetation vigour
(season), illumination, transient clouds and sensor noise.

Defects (--defects), each an EXTRA timestamp file in some location, so every location keeps at
least one good image:
  truncated         a GeoTIFF cut to 30% of its bytes (unreadable)
  wrong_band_count  a GeoTIFF with 22 extra bands (an unsubsetted 224-band-like product)
  all_nodata        every pixel -32768
  partial_nodata    swath-edge nodata (a diagonal cut), fractions in defects.json; 3 below 0.5
                    and 1 above (0.7), so a converter with --max-nodata 0.5 keeps 3, rejects 1
  duplicate         a byte copy of the location's latest timestamp under a later timestamp name:
                    "duplicate" = identical pixel content to an earlier timestamp of one location
  not_geotiff       a PNG image saved under a `<timestamp>.tif` name
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import time

import numpy as np
import rasterio
from rasterio.transform import Affine
import tqdm

from fmjax.data import sensors

MATERIALS = ("water", "forest", "cropland", "soil", "built_up", "snow")
# Land-cover prior weights (water, forest, cropland, soil, built-up, snow): vegetation dominates,
# like the EnMAP acquisitions SpectralEarth samples; snow keeps visible-band variance realistic.
_PRIOR = np.array([0.10, 0.26, 0.24, 0.24, 0.10, 0.06])
PIXEL_SIZE_M = 30.0
NODATA = sensors.ENMAP_NODATA
DEFECT_PARTIAL_FRACTIONS = (0.12, 0.25, 0.40, 0.70)


# --- spectra -------------------------------------------------------------------------------------

def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _dip(w, centre, width, depth):
  """Multiplicative Gaussian absorption feature."""
  return 1.0 - depth * np.exp(-0.5 * ((w - centre) / width) ** 2)


def _leaf_water(w, strength=1.0):
  return (_dip(w, 975, 25, 0.06 * strength) * _dip(w, 1195, 40, 0.14 * strength)
          * _dip(w, 1450, 70, 0.55 * strength) * _dip(w, 1940, 80, 0.65 * strength))


def green_vegetation(w, nir=0.38, green=0.09):
  visible = 0.025 + (green - 0.025) * np.exp(-0.5 * ((w - 552) / 28) ** 2)
  visible = visible * _dip(w, 675, 25, 0.35)
  swir_envelope = 1.0 - 0.42 * _sigmoid((w - 1330) / 60) - 0.30 * _sigmoid((w - 1870) / 60)
  plateau = nir * swir_envelope * _leaf_water(w)
  return visible + (plateau - visible) * _sigmoid((w - 718) / 11)


def dry_vegetation(w):
  """Senescent vegetation: soil-like rise, no red edge, cellulose/lignin absorption at 2100 nm."""
  return (0.07 + 0.30 * (1 - np.exp(-(w - 400) / 600))) * _dip(w, 2100, 50, 0.25) * _leaf_water(w, 0.3)


def soil(w, brightness=1.0):
  base = 0.04 + 0.30 * (1 - np.exp(-(w - 400) / 500)) - 0.05 * _sigmoid((w - 2000) / 150)
  return brightness * base * _dip(w, 1410, 40, 0.15) * _dip(w, 1915, 45, 0.2) * _dip(w, 2205, 25, 0.12)


def water(w, turbidity=1.0):
  return (0.012 + 0.05 * turbidity * np.exp(-0.5 * ((w - 520) / 90) ** 2)) * _sigmoid(-(w - 760) / 40) + 0.004


def built_up(w, brightness=1.0):
  return brightness * (0.13 + 0.07 * (w - 400) / 2000) * _dip(w, 1730, 30, 0.06) * _dip(w, 2310, 30, 0.08)


def snow(w, grain=1.0):
  visible = 0.95 - 0.18 * _sigmoid((w - 850) / 90)
  ice = _dip(w, 1030, 45, 0.25 * grain) * _dip(w, 1250, 50, 0.4 * grain)
  swir = 1.0 - 0.93 * _sigmoid((w - 1380) / 40)
  return visible * ice * swir + 0.04 * np.exp(-0.5 * ((w - 1800) / 60) ** 2)


def cloud(w):
  return 0.72 - 0.22 * _sigmoid((w - 1500) / 300)


# --- fields --------------------------------------------------------------------------------------

def smooth_fields(rng, count, size, length_px):
  """`count` unit-variance Gaussian random fields [count, size, size], correlation ~length_px."""
  noise = rng.standard_normal((count, size, size))
  f = np.fft.fftfreq(size)
  k2 = f[:, None] ** 2 + f[None, :] ** 2
  length = np.asarray(length_px, np.float64).reshape(-1, 1, 1)
  kernel = np.exp(-2 * np.pi ** 2 * k2[None] * length ** 2)
  fields = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
  fields -= fields.mean(axis=(1, 2), keepdims=True)
  return fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-12)


def choose_wavelengths(bands: int) -> np.ndarray:
  """202 -> SpectralEarth bands, 224 -> all EnMAP bands, else an even subset of the 202."""
  if bands == sensors.SPECTRALEARTH_NUM_BANDS:
    return sensors.enmap_wavelengths(kept_only=True)
  if bands == sensors.ENMAP_NUM_BANDS:
    return sensors.enmap_wavelengths(kept_only=False)
  if not 1 <= bands < sensors.SPECTRALEARTH_NUM_BANDS:
    raise ValueError(f"--bands {bands}: valid are 1..202 (a subset of the kept bands), 202 or 224")
  index = np.round(np.linspace(0, sensors.SPECTRALEARTH_NUM_BANDS - 1, bands)).astype(int)
  return sensors.enmap_wavelengths(kept_only=True)[index]


class LocationScene:
  """The static part of one location: abundances, material variants, land cover."""

  def __init__(self, rng, size, w):
    self.w = w
    prior = rng.dirichlet(_PRIOR * 6)
    length = rng.uniform(6, 22, len(MATERIALS)) * size / 128
    logits = smooth_fields(rng, len(MATERIALS), size, length) + 2.0 * np.log(prior + 1e-3)[:, None, None]
    tau = rng.uniform(0.25, 0.5)
    logits = (logits - logits.max(0)) / tau
    abundance = np.exp(logits)
    self.abundance = (abundance / abundance.sum(0)).transpose(1, 2, 0).astype(np.float32)  # [H, W, K]
    self.landcover = self.abundance.argmax(-1).astype(np.uint8)
    self.shading = (1 + 0.08 * smooth_fields(rng, 1, size, 3 * size / 128)[0]).astype(np.float32)
    self.soil_brightness = rng.uniform(0.5, 2.0)
    self.built_brightness = rng.uniform(0.7, 1.6)
    self.turbidity = rng.uniform(0.3, 2.0)
    self.snow_grain = rng.uniform(0.6, 1.4)
    self.forest_nir = rng.uniform(0.25, 0.38)
    self.crop_nir = rng.uniform(0.33, 0.5)
    self.phase = rng.uniform(0, 2 * np.pi)  # where the location's growing season peaks

  def endmembers(self, day: int) -> np.ndarray:
    """Material spectra [K, C] on `day`: vegetation vigour follows a yearly cycle."""
    w = self.w
    season = 0.5 + 0.5 * np.cos(2 * np.pi * day / 365.0 - self.phase)  # 0 dormant .. 1 peak
    forest_vigour = 0.65 + 0.35 * season
    crop_vigour = 0.1 + 0.9 * season
    forest = forest_vigour * green_vegetation(w, self.forest_nir, 0.07) + (1 - forest_vigour) * dry_vegetation(w)
    crop = crop_vigour * green_vegetation(w, self.crop_nir, 0.1) + (1 - crop_vigour) * soil(w, self.soil_brightness)
    return np.stack([water(w, self.turbidity), forest, crop, soil(w, self.soil_brightness),
                     built_up(w, self.built_brightness), snow(w, self.snow_grain)]).astype(np.float32)

  def image(self, rng, day: int, noise_sigma: np.ndarray) -> np.ndarray:
    """One acquisition as int16 reflectance*10000, [C, H, W] (bands first, like GeoTIFF)."""
    size = self.abundance.shape[0]
    # Computed bands-first straight away: no transpose copy of the 6.6 MB cube afterwards.
    flat = self.abundance.reshape(-1, len(MATERIALS))
    reflectance = (self.endmembers(day).T @ flat.T).reshape(-1, size, size)  # [C, H, W]
    reflectance *= self.shading * np.float32(rng.uniform(0.85, 1.15))
    if rng.random() < 0.15:  # a transient cloud deck over part of the patch
      cover = _sigmoid(3 * (smooth_fields(rng, 1, size, 10 * size / 128)[0] - rng.uniform(0, 1.5)))
      reflectance += cover.astype(np.float32) * (cloud(self.w).astype(np.float32)[:, None, None] - reflectance)
    # Uniform noise with the band's standard deviation: 6x cheaper to draw than Gaussian noise,
    # and its shape does not matter at these amplitudes.
    noise = rng.random(reflectance.shape, dtype=np.float32)
    noise -= 0.5
    noise *= (noise_sigma * np.float32(np.sqrt(12.0) * 10000))[:, None, None]
    reflectance *= 10000
    reflectance += noise
    np.rint(reflectance, out=reflectance)
    np.clip(reflectance, -200, 32767, out=reflectance)
    return reflectance.astype(np.int16)


def noise_sigma(w):
  """Per-band noise (reflectance units), from EnMAP's SNR (~400 VNIR, ~150 SWIR at ~30%
  reflectance); worse at the detector ends and next to the water vapour bands."""
  edge = np.exp(-(w - 400) / 40) + np.exp((w - 2450) / 60)
  water_vapour = np.exp(-0.5 * ((w - 1390) / 30) ** 2) + np.exp(-0.5 * ((w - 1800) / 60) ** 2)
  detector = np.where(w < 960, 0.00075, 0.002)
  return (detector + 0.01 * edge + 0.003 * water_vapour).astype(np.float32)


# --- writing -------------------------------------------------------------------------------------

def geo(rng):
  zone = int(rng.integers(1, 61))
  epsg = (32600 if rng.random() < 0.85 else 32700) + zone
  x0 = 30 * int(rng.integers(200000 // 30, 800000 // 30))
  y0 = 30 * int(rng.integers(1000000 // 30, 8000000 // 30))
  return f"EPSG:{epsg}", Affine(PIXEL_SIZE_M, 0, x0, 0, -PIXEL_SIZE_M, y0)


def write_geotiff(path, pixels_chw, crs, transform, wavelengths_nm):
  count, height, width = pixels_chw.shape
  profile = dict(driver="GTiff", dtype="int16", count=count, height=height, width=width, crs=crs,
                 transform=transform, nodata=NODATA, interleave="band")
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(pixels_chw)
    dst.update_tags(wavelengths_nm=",".join(f"{v:.3f}" for v in wavelengths_nm))


def _timestamps(rng, count):
  days = 7000 + np.cumsum(rng.integers(20, 400, count))
  return [f"{d:05d}" for d in days]


def generate(output, locations, seed=0, defects=False, size=128, bands=202, progress=True):
  """Writes the archive; returns a summary dict (also ROOT/synthetic.json)."""
  if locations < 1:
    raise ValueError(f"--locations must be >= 1, got {locations}")
  if size < 8:
    raise ValueError(f"--size must be >= 8 pixels, got {size}")
  root = pathlib.Path(output)
  rng = np.random.default_rng(seed)
  w = choose_wavelengths(bands)
  sigma = noise_sigma(w)
  ids = set()
  while len(ids) < locations:
    ids.update(f"{i:07d}" for i in rng.integers(0, 10**7, locations - len(ids)))
  ids = sorted(ids)
  (root / "landcover").mkdir(parents=True, exist_ok=True)
  scenes, files = {}, []
  for loc in tqdm.tqdm(ids, desc="synthetic locations", unit="loc", disable=not progress):
    loc_rng = np.random.default_rng([seed, int(loc)])
    scene = LocationScene(loc_rng, size, w)
    crs, transform = geo(loc_rng)
    count = int(loc_rng.integers(2, 5)) if loc_rng.random() < 0.2 else 1
    folder = root / "enmap" / loc
    folder.mkdir(parents=True, exist_ok=True)
    for ts in _timestamps(loc_rng, count):
      write_geotiff(folder / f"{ts}.tif", scene.image(loc_rng, int(ts), sigma), crs, transform, w)
      files.append(f"enmap/{loc}/{ts}.tif")
    np.save(root / "landcover" / f"{loc}.npy", scene.landcover)
    scenes[loc] = (scene, crs, transform, loc_rng)
  (root / "landcover" / "classes.json").write_text(json.dumps(list(MATERIALS)))
  injected = _write_defects(root, rng, scenes, w, sigma) if defects else []
  summary = dict(seed=seed, locations=len(ids), files=len(files) + len(injected),
                 good_files=len(files), size=size, bands=bands, pixel_size_m=PIXEL_SIZE_M,
                 nodata=NODATA, materials=list(MATERIALS), wavelengths_nm=[float(v) for v in w])
  (root / "synthetic.json").write_text(json.dumps(summary, indent=1))
  if defects:
    counts = {}
    for d in injected:
      counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    (root / "defects.json").write_text(json.dumps({"counts": counts, "defects": injected}, indent=1))
  return summary


def _write_defects(root, rng, scenes, w, sigma):
  """Adds one extra timestamp file per defect; returns their descriptions."""
  kinds = (["truncated", "wrong_band_count", "all_nodata"] + ["partial_nodata"] * len(DEFECT_PARTIAL_FRACTIONS)
           + ["duplicate", "not_geotiff"])
  ids = sorted(scenes)
  if len(ids) < len(kinds):
    raise ValueError(f"--defects needs >= {len(kinds)} locations (one per defect), got {len(ids)}")
  chosen = [ids[i] for i in rng.permutation(len(ids))[:len(kinds)]]
  out, partial = [], iter(DEFECT_PARTIAL_FRACTIONS)
  for kind, loc in zip(kinds, chosen):
    scene, crs, transform, loc_rng = scenes[loc]
    folder = root / "enmap" / loc
    latest = max(int(p.stem) for p in folder.glob("*.tif"))
    ts = f"{latest + int(rng.integers(1, 300)):05d}"
    path = folder / f"{ts}.tif"
    entry = dict(kind=kind, path=f"enmap/{loc}/{ts}.tif", location_id=loc, timestamp=ts)
    image = scene.image(loc_rng, int(ts), sigma)
    if kind == "truncated":
      write_geotiff(path, image, crs, transform, w)
      data = path.read_bytes()
      path.write_bytes(data[:int(len(data) * 0.3)])
    elif kind == "wrong_band_count":
      extra = np.concatenate([image, image[-22:]], axis=0)
      write_geotiff(path, extra, crs, transform, np.concatenate([w, w[-22:]]))
      entry["bands"] = int(extra.shape[0])
    elif kind == "all_nodata":
      write_geotiff(path, np.full_like(image, NODATA), crs, transform, w)
    elif kind == "partial_nodata":
      target = next(partial)
      size = image.shape[1]
      yy, xx = np.mgrid[:size, :size]
      ramp = (xx + 0.6 * yy).ravel()  # a slanted swath edge, like EnMAP scene borders
      cut = np.sort(ramp)[::-1][int(round(target * size * size)) - 1]
      mask = (ramp >= cut).reshape(size, size)
      image[:, mask] = NODATA
      write_geotiff(path, image, crs, transform, w)
      entry["nodata_fraction"] = float(mask.mean())
    elif kind == "duplicate":
      source = folder / f"{latest:05d}.tif"
      path.write_bytes(source.read_bytes())
      entry["duplicate_of"] = f"enmap/{loc}/{latest:05d}.tif"
    elif kind == "not_geotiff":
      from PIL import Image  # a quicklook PNG that someone saved with a .tif name
      rgb = np.clip(image[[min(43, len(w) - 1), len(w) // 7, 0]] / 12, 0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(rgb.transpose(1, 2, 0)).save(buffer, format="PNG")
      path.write_bytes(buffer.getvalue())
    out.append(entry)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", required=True, help="archive root to write")
  parser.add_argument("--locations", type=int, required=True, help="number of locations")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--defects", action="store_true", help="inject defects (see defects.json)")
  parser.add_argument("--size", type=int, default=128, help="patch height = width in pixels")
  parser.add_argument("--bands", type=int, default=202, help="202 (SpectralEarth), 224 or fewer")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  summary = generate(args.output, args.locations, args.seed, args.defects, args.size, args.bands)
  print(f"wrote {summary['files']} files for {summary['locations']} locations to {args.output} "
        f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
