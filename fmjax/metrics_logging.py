"""Metrics out of the train loop: TensorBoard (clu), a JSONL log in the workdir, progress lines, PNGs.

Only process 0 writes files; every process may log to stderr. `metrics.jsonl` holds one JSON object
per logged step ({"step": ..., "loss": ..., ...}) so runs can be compared without TensorBoard.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

import jax
import numpy as np


def metric_writers():
  """clu's `metric_writers`, imported only where TensorBoard is wanted (it imports TensorFlow).

  TensorFlow only writes event files for fmjax, so its oneDNN graph rewrites are turned off unless
  the user set `TF_ENABLE_ONEDNN_OPTS`. With them on, the import logs twice that "you may see slightly
  different numerical results", a note about TensorFlow's own maths that reads as if it were about
  the run's.
  """
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  from clu import metric_writers as writers
  return writers


class MetricsLogger:
  def __init__(self, workdir: str, tensorboard: bool = True):
    self.is_main = jax.process_index() == 0
    self.workdir = workdir
    self.writer = None
    self.jsonl = None
    if self.is_main:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        self.writer = metric_writers().create_default_writer(os.path.join(workdir, "tensorboard"),
                                                             asynchronous=True)

  def scalars(self, step: int, values: Mapping[str, float]):
    values = {k: float(v) for k, v in values.items()}
    if not self.is_main:
      return
    self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self.jsonl.flush()
    if self.writer is not None:
      self.writer.write_scalars(step, values)

  def hparams(self, config_dict: Mapping):
    if self.is_main and self.writer is not None:
      flat = {}
      def walk(prefix, d):
        for k, v in d.items():
          if isinstance(v, Mapping):
            walk(f"{prefix}{k}.", v)
          elif isinstance(v, (int, float, str, bool)):
            flat[f"{prefix}{k}"] = v
      walk("", config_dict)
      self.writer.write_hparams(flat)

  def images(self, step: int, images: Mapping[str, np.ndarray]):
    """Writes each [H, W, 3] (or [N, H, W, 3]) float image in [0, 1] as PNG and to TensorBoard."""
    if not self.is_main:
      return
    from PIL import Image
    out_dir = os.path.join(self.workdir, "images")
    os.makedirs(out_dir, exist_ok=True)
    for name, image in images.items():
      image = np.asarray(image, np.float32)
      grid = image if image.ndim == 3 else np.concatenate(list(image), axis=0)
      path = os.path.join(out_dir, f"{name}_{step:08d}.png")
      Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(path)
      logging.info("wrote %s", path)
    if self.writer is not None:
      self.writer.write_images(step, {k: np.asarray(v, np.float32)[None] if np.ndim(v) == 3 else v
                                      for k, v in images.items()})

  def flush(self):
    if self.writer is not None:
      self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()
    if self.jsonl is not None:
      self.jsonl.close()


class Progress:
  """Step time, throughput and ETA from wall-clock between log points (compile time excluded)."""

  def __init__(self, total_steps: int, start_step: int, samples_per_step: int, tokens_per_sample: int = 0):
    self.total_steps = total_steps
    self.samples_per_step = samples_per_step
    self.tokens_per_sample = tokens_per_sample
    self.last_step = start_step
    self.last_time = None

  def reset_clock(self, step: int):
    self.last_step, self.last_time = step, time.perf_counter()

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    if self.last_time is None or step <= self.last_step:
      self.reset_clock(step)
      return {}
    step_time = (now - self.last_time) / (step - self.last_step)
    self.reset_clock(step)
    out = {"step_time_s": step_time, "samples_per_s": self.samples_per_step / step_time,
           "eta_min": (self.total_steps - step) * step_time / 60}
    if self.tokens_per_sample:
      out["tokens_per_s"] = out["samples_per_s"] * self.tokens_per_sample
    return out


def format_line(step: int, total: int, values: Mapping[str, float]) -> str:
  keys = ("loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "mfu", "eta_min")
  parts = [f"step {step}/{total}"]
  for k in keys:
    if k in values:
      v = values[k]
      parts.append(f"{k}={v:.4g}")
  return "  ".join(parts)
