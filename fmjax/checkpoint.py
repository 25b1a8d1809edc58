"""Orbax checkpoints: train state + Grain iterator state + config, with safe fallbacks.

Layout: <workdir>/checkpoints/<step>/{state, data, data_format, config}. `data` is the Grain
iterator state (one file per process) so a resumed run continues with exactly the next batch;
`data_format` says what its position counts (batches since 2026-12-01, when the pipeline started
loading whole batches per Grain element). A checkpoint without it counted samples: its position is
converted on restore (or refused with `CheckpointFormatError` when it cannot be).

- `Checkpointer.restore_latest` walks back from the newest step: a corrupt or half-written
  checkpoint is skipped with a warning and the previous one is used.
- Saving onto a full disk raises `CheckpointSaveError` saying so (async saves report it on the next
  save / at the end).
- Restoring uses the *current* mesh's shardings as the target, so a checkpoint written on 8 devices
  restores onto 4 (or 64).
- `load_backbone(path)` gives (config, backbone variables) to evaluation and export in one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointSaveError(RuntimeError):
  pass


class CheckpointFormatError(ValueError):
  """A checkpoint this version cannot resume exactly; never silently skipped by `restore_latest`."""


# What the Grain iterator position in `data` counts (fmjax.data.pipeline: one element per batch).
DATA_FORMAT = {"position_unit": "batch"}


def _grain_iterator(data_iterator):
  it = getattr(data_iterator, "grain_iterator", None)
  if it is None and data_iterator is not None and hasattr(data_iterator, "get_state"):
    it = data_iterator
  return it


def _is_disk_full(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:
  """A small wrapper over `ocp.CheckpointManager` for the train loop."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, config=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    grain_it = _grain_iterator(data_iterator)
    if grain_it is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(grain_it)
      items["data_format"] = ocp.args.JsonSave(DATA_FORMAT)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      self._raise_save_error(step, e)

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._raise_save_error(self.latest_step(), e)

  def _raise_save_error(self, step, error):
    if _is_disk_full(error):
      raise CheckpointSaveError(f"saving checkpoint {step} into {self.directory} failed: the disk is full "
                                f"(free space or lower checkpoint.keep)") from error
    raise CheckpointSaveError(f"saving checkpoint {step} into {self.directory} failed: {error}") from error

  def restore(self, step: int, abstract_state, data_iterator=None):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    grain_it = _grain_iterator(data_iterator)
    step_dir = os.path.join(self.directory, str(step))
    legacy_data = False
    if grain_it is not None and os.path.isdir(os.path.join(step_dir, "data")):
      import grain
      if os.path.isdir(os.path.join(step_dir, "data_format")):
        items["data"] = grain.checkpoint.CheckpointRestore(grain_it)
      else:
        legacy_data = True
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if legacy_data:
      _restore_sample_counted_position(os.path.join(step_dir, "data"), data_iterator, grain_it, step)
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator=None):
    """(state, step) from the newest readable checkpoint, or (None, None) when there is none."""
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state, data_iterator)
        _check_finite(state, step)
        return state, step
      except CheckpointFormatError:
        raise   # readable but not resumable exactly: falling back or starting afresh would hide it
      except Exception as e:  # a corrupt / truncated checkpoint: fall back to the previous one
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); falling back to the previous one",
                        step, self.directory, type(e).__name__, str(e)[:300])
    if self.all_steps():
      logging.warning("no checkpoint in %s could be restored; starting from scratch", self.directory)
    return None, None

  def close(self):
    self.manager.close()


def _restore_sample_counted_position(data_dir, data_iterator, grain_it, step):
  """A checkpoint of the per-sample pipeline (no `data_format`): its Grain position counted samples.

  Batches never straddled a dropped remainder (they span epochs), so sample position // per-host
  batch is the batch position. Worker-process states, or a position that is not a whole number of
  batches, cannot be converted.
  """
  path = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
  with open(path) as f:
    state = json.load(f)
  global_batch = getattr(data_iterator, "global_batch_size", None)
  per_host = global_batch // jax.process_count() if global_batch else None
  if set(state) != {"next_index"} or not per_host or state["next_index"] % per_host:
    raise CheckpointFormatError(
        f"checkpoint {step}: its input-pipeline position {state} was written by an fmjax version that "
        f"counted samples and cannot be converted to batches of {per_host} per host; resume without "
        f"the data state (pass data_iterator=None) or from a newer checkpoint")
  grain_it.set_state({"next_index": state["next_index"] // per_host})
  logging.warning("checkpoint %d: input position %d samples (earlier fmjax format) = batch %d of %d per host",
                  step, state["next_index"], state["next_index"] // per_host, per_host)


def _check_finite(state, step):
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.get("params", {}))[0]:
    if jnp_is_float(leaf) and not bool(np.isfinite(np.asarray(jax.device_get(leaf.addressable_data(0)))).all()):
      raise ValueError(f"checkpoint {step} holds non-finite values in {jax.tree_util.keystr(path)}")


def jnp_is_float(x) -> bool:
  return hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.floating)


def read_config(checkpoint_path: str):
  """The ml_collections config stored with a checkpoint (path: a step directory or a workdir)."""
  import ml_collections
  step_dir = resolve_step_dir(checkpoint_path)
  config_dir = os.path.join(step_dir, "config")
  files = [f for f in os.listdir(config_dir) if not f.startswith(".")] if os.path.isdir(config_dir) else []
  if not files:
    raise FileNotFoundError(f"{step_dir} has no stored config")
  with open(os.path.join(config_dir, files[0])) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_step_dir(path: str) -> str:
  """Accepts a workdir, its checkpoints/ dir, or one step dir; returns the newest step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint found under {path} (expected <workdir>/checkpoints/<step>/state)")
  return os.path.join(path, str(steps[-1]))


class _StepLevelMetadataFilter(logging.Filter):
  """Drops orbax's "Metadata file does not exist" for an item directory (`<step>/state`) whose step
  directory has its `_CHECKPOINT_METADATA`: the checkpoint manager writes that file at the step level,
  so an item-level checkpointer reading `<step>/state` alone always misses it, and the warning would
  tell evaluation and export users about a problem their checkpoint does not have."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not (isinstance(record.msg, str) and record.msg.startswith("Metadata file does not exist")
            and record.args):
      return True
    missing = str(record.args[0])
    item_dir = os.path.dirname(missing)
    step_metadata = os.path.join(os.path.dirname(item_dir), os.path.basename(missing))
    return not (os.path.basename(item_dir) == "state" and os.path.exists(step_metadata))


@contextlib.contextmanager
def state_item_checkpointer(checkpointer_type=ocp.StandardCheckpointer):
  """An item-level orbax checkpointer for reading `<step>/state`, without orbax's warning that the item
  has no `_CHECKPOINT_METADATA` (see `_StepLevelMetadataFilter`)."""
  absl_logger, metadata_filter = logging.getLogger("absl"), _StepLevelMetadataFilter()
  absl_logger.addFilter(metadata_filter)
  try:
    with checkpointer_type() as checkpointer:
      yield checkpointer
  finally:
    absl_logger.removeFilter(metadata_filter)


def load_state(path: str) -> tuple[Any, dict]:
  """(config, raw state tree as host numpy arrays) of the newest checkpoint under `path`."""
  config = read_config(path)
  step_dir = resolve_step_dir(path)
  with state_item_checkpointer() as ckptr:
    metadata = ckptr.metadata(os.path.join(step_dir, "state"))
    tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                            tree)
    state = ckptr.restore(os.path.join(step_dir, "state"), abstract)
  return config, jax.device_get(state)


def load_backbone(path: str):
  """(config, backbone variables) from a pretraining checkpoint, for evaluation and export.

  Backbone variables are {'params': ..., 'batch_stats': ...} of the encoder that downstream tasks
  use (the MAE encoder, the DINO student, the MoCo query encoder) as chosen by the objective.
  """
  from fmjax.objectives import build_objective
  config, state = load_state(path)
  objective = build_objective(config)
  variables = {"params": state["params"], **state.get("model_state", {})}
  return config, objective.backbone_variables(variables, state.get("objective_state"))
