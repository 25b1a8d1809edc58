"""Entry point: `python -m fmjax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.key=value]`.

Dispatches on config.task. Other areas add their task to `TASKS` (a name -> 'module:function'
entry; the function takes (config, workdir)).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

TASKS: dict[str, str] = {
    "pretrain": "fmjax.train:train",
    "evaluate": "fmjax.evaluate.run:run",
    "forest": "fmjax.evaluate.forest_compare:train",   # Sentinel-2 tree cover (configs/s2/forest_*.py)
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")


def run(config, workdir: str):
  task = config.get("task", "pretrain")
  if task not in TASKS:
    raise ValueError(f"config.task={task!r} is not known; valid choices: {tuple(TASKS)}")
  module_name, fn_name = TASKS[task].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config, workdir)


def quiet_library_logs():
  """Orbax logs every save in detail at INFO; keep its warnings only."""
  for name in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value to override the config")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.getLogger().setLevel(logging.INFO)
  quiet_library_logs()
  # Let config files under configs/ import their shared `configs.common` from any cwd.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  flags.mark_flags_as_required(["config"])
  app.run(main)
