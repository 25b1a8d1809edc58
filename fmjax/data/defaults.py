"""The `data` section of a training config, in a module that imports no pipeline code: configs
(and tools that only read them, such as the accelerator benchmarks) work without Grain installed."""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of a training config."""
  c = ml_collections.ConfigDict()
  c.dir = ""                    # dataset directory (ArrayRecord shards + dataset_info)
  c.split = "train"
  c.num_bands = 202             # checked against the data at start-up
  c.crop_size = 128             # global views are crop_size x crop_size
  c.aug = ml_collections.ConfigDict(dict(
      scale=(0.4, 1.0),         # random resized crop: area fraction range
      ratio=(3 / 4, 4 / 3),     # aspect-ratio range
      hflip=0.5, vflip=0.5,     # flip probabilities
      blur_prob=0.0, blur_sigma=(0.1, 2.0)))
  c.local = ml_collections.ConfigDict(dict(  # DINO multi-crop (count comes from the objective's ViewSpec)
      size=48, scale=(0.05, 0.4), hflip=0.5, vflip=0.5, blur_prob=0.5, blur_sigma=(0.1, 2.0)))
  c.nodata_fill = "mean"        # 'mean' (normalises to 0) | 'zero' | 'none'
  c.stats = "dataset"           # band mean/std: 'dataset' (dataset_info) | 'sample' | 'none'
                                #   | 'scale10000' (x / 10000 clipped to [0, 1]: Sentinel-2 reflectance)
  c.stats_samples = 256         # records read when stats='sample'
  c.shuffle = True
  c.seed = -1                   # data-order/augmentation seed; -1: use build_input's seed
  c.read_threads = 2            # threads per process, each loading whole batches (no GIL held)
  c.worker_count = 0            # Grain worker processes (0: none; state is tied to this number)
  c.prefetch = 2                # batches buffered ahead per process (at least read_threads)
  c.dtype = "float32"           # 'float32' | 'bfloat16' | 'float16' on the host and on device
  # Where crop/resize/flip/blur/normalise run: 'host' (NumPy in the Grain threads, ships float
  # views) or 'device' (ships int16 images + two small matrices per view; a jitted function makes
  # the same views on the accelerator). See docs/pipeline.md for measurements.
  c.augment_on = "host"
  # NumPy BLAS threads in this process (0: leave alone). Blurred views use BLAS matmuls; OpenBLAS'
  # own threads fighting the Grain threads made them ~10x slower on a 2-core host.
  c.blas_threads = 1
  return c
