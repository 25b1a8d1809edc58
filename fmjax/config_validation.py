"""Checks a config before any compute, with messages naming the bad key and the valid choices.

Unknown keys are already rejected by ml_collections config_flags (`--config.bad=1` fails); these are
the checks across keys: batch vs devices, patch vs crop, bands vs dataset.
"""
from __future__ import annotations

import logging

from fmjax import parallel

TASKS = ("pretrain",)


class ConfigError(ValueError):
  pass


def _get(config, dotted, default=None):
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return default
    node = node.get(part, None)
  return default if node is None else node


def validate_static(config) -> None:
  for key in ("seed", "batch_size", "objective", "optimizer", "schedule", "mesh", "checkpoint", "log"):
    if _get(config, key) is None:
      raise ConfigError(f"config.{key} is missing (start from configs/common.py:get_config())")
  if int(config.batch_size) <= 0:
    raise ConfigError(f"batch_size={config.batch_size} must be positive")
  accum = int(config.get("grad_accum", 1))
  if accum < 1 or config.batch_size % accum:
    raise ConfigError(f"grad_accum={accum} must be >= 1 and divide batch_size={config.batch_size}")
  patch = _get(config, "model.patch_size")
  crop = _get(config, "data.crop_size")
  if patch and crop and int(crop) % int(patch):
    valid = [p for p in (1, 2, 4, 8, 16, 32) if int(crop) % p == 0]
    raise ConfigError(f"model.patch_size={patch} does not divide data.crop_size={crop}; "
                      f"valid patch sizes for this crop: {valid}")
  if int(config.checkpoint.get("keep", 1)) < 1:
    raise ConfigError(f"checkpoint.keep={config.checkpoint.keep} must be >= 1")
  _validate_bands(config)


def validate_with_mesh(config, mesh) -> None:
  data_parallel = parallel.data_parallel_size(mesh)
  accum = int(config.get("grad_accum", 1))
  if config.batch_size % (data_parallel * accum):
    valid = [b for b in range(data_parallel * accum, 4 * data_parallel * accum + 1, data_parallel * accum)]
    raise ConfigError(
        f"batch_size={config.batch_size} is not divisible by the data-parallel devices (mesh data x fsdp = "
        f"{data_parallel}) times grad_accum={accum}; valid batch sizes include {valid}")


def _validate_bands(config) -> None:
  """data.num_bands (what the model is built for) must match the dataset directory's band count."""
  num_bands = _get(config, "data.num_bands")
  data_dir = _get(config, "data.dir")
  if not num_bands or not data_dir:
    return
  try:
    from fmjax.data.dataset_dir import read_dataset_info
    info = read_dataset_info(data_dir)
  except Exception as e:  # a missing dataset is reported by the pipeline with its own message
    logging.info("band check skipped: %s", e)
    return
  data_bands = info.get("num_bands")
  if data_bands and int(num_bands) != int(data_bands):
    raise ConfigError(f"data.num_bands={num_bands} but the dataset at data.dir={data_dir!r} has {data_bands} "
                      f"bands; set --config.data.num_bands={data_bands}")
