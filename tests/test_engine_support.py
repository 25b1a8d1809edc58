"""A toy objective and toy input for fast engine tests (no tests here; imported by test_engine_*).

The toy is a small linear-conv autoencoder with a BatchNorm (so `model_state` is exercised) and a
DINO-like running centre (so `objective_state` is exercised). Run as a module it trains with a
toy config: `python -m tests.test_engine_support --workdir DIR [--total_steps N] ...`, which the
kill / SIGTERM / multi-process tests use as a real separate process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext as _nullcontext

import numpy as np

TOY_SIZE = 8
TOY_BANDS = 3


def toy_objective_factory(config):
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from fmjax.objectives.base import LossOutput, ViewSpec

  class ToyModel(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
      kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out"))
      h = nn.Dense(self.width, kernel_init=kernel_init, name="encode")(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(h)
      h = jnp.tanh(h)
      return nn.Dense(x.shape[-1], name="decode")(h)

  nan_at = int(config.objective.get("nan_at_step", -1))

  class Toy:
    name = "toy"
    views = ViewSpec(global_views=1)
    model = ToyModel()

    def init(self, rng, batch):
      variables = self.model.init(rng, batch["image"][:, 0], train=False)
      return variables, {"centre": jnp.zeros([TOY_BANDS], jnp.float32)}

    def loss(self, variables, objective_state, batch, rng, step):
      x = batch["image"][:, 0]
      noisy = x + 0.1 * jax.random.normal(rng, x.shape)
      y, updates = self.model.apply(variables, noisy, train=True, mutable=["batch_stats"])
      loss = jnp.mean(jnp.square(y - x))
      loss = jnp.where(step + 1 == nan_at, jnp.nan, loss)
      centre = 0.9 * objective_state["centre"] + 0.1 * jnp.mean(y, axis=(0, 1, 2))
      return LossOutput(loss, {"centre_norm": jnp.linalg.norm(centre)}, updates, {"centre": centre})

    def after_update(self, variables, objective_state, step):
      return objective_state

    def backbone_variables(self, variables, objective_state):
      return variables

  return Toy()


class ToyInput:
  """Deterministic batches of a Grain iterator, assembled into global arrays on the mesh.

  Every process computes the whole global batch (tiny) and gives each device its rows, so 1 process
  x 8 devices and 2 processes x 4 devices see identical data. `slow_after`: sleep per batch after
  that many batches (lets tests kill a process mid-run).
  """

  def __init__(self, mesh, batch_size, seed, slow_after=-1, sleep_s=0.0):
    import grain
    import jax
    from fmjax import parallel
    self.mesh, self.batch_size = mesh, batch_size
    self.slow_after, self.sleep_s = slow_after, sleep_s
    self.sharding = parallel.batch_sharding(mesh, 5)
    ds = grain.MapDataset.range(10_000).shuffle(seed=seed).map(
        lambda i: np.random.default_rng(i).normal(size=(1, TOY_SIZE, TOY_SIZE, TOY_BANDS)).astype(np.float32))
    self.grain_iterator = ds.batch(batch_size).to_iter_dataset().__iter__()
    self.num_examples = 10_000
    self._served = 0

  def __iter__(self):
    return self

  def __next__(self):
    import jax
    if 0 <= self.slow_after <= self._served:
      time.sleep(self.sleep_s)
    self._served += 1
    full = next(self.grain_iterator)
    image = jax.make_array_from_callback(full.shape, self.sharding, lambda index: full[index])
    return {"image": image}

  def get_state(self):
    return self.grain_iterator.get_state()

  def set_state(self, state):
    self.grain_iterator.set_state(state)


def register():
  from fmjax.objectives import register_objective
  register_objective("toy", toy_objective_factory)


def toy_config(**overrides):
  import sys as _sys
  _sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import common
  c = common.get_config()
  c.model.name = "toy"
  c.model.patch_size = 0
  c.model.in_bands = 0
  c.objective.name = "toy"
  c.objective.nan_at_step = -1
  c.batch_size = 16
  c.total_steps = 20
  c.schedule.base_lr = 1e-2
  c.schedule.warmup_steps = 2
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 3
  c.log.every_steps = 1
  c.log.tensorboard = False
  c.mesh.data = -1
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    if parts[-1] in node or not hasattr(node, "unlock"):
      node[parts[-1]] = value
    else:
      with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
        node[parts[-1]] = value
  return c


def toy_input_builder(slow_after=-1, sleep_s=0.0):
  def build(config, mesh, views, seed):
    return ToyInput(mesh, config.batch_size, seed, slow_after, sleep_s)
  return build


def read_losses(workdir):
  """{step: loss} from metrics.jsonl (later lines win: a resumed run rewrites its steps)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      losses[row["step"]] = row["loss"]
  return losses


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], help="key=json_value config override")
  parser.add_argument("--slow_after", type=int, default=-1)
  parser.add_argument("--sleep_s", type=float, default=0.0)
  parser.add_argument("--devices", type=int, default=8)
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  from fmjax import train
  register()
  overrides = {kv.split("=", 1)[0]: json.loads(kv.split("=", 1)[1]) for kv in args.set}
  config = toy_config(**overrides)
  summary = train.train(config, args.workdir, toy_input_builder(args.slow_after, args.sleep_s))
  print("FINAL", json.dumps({"final_step": summary["final_step"], "stopped_by": summary["stopped_by"]}), flush=True)


if __name__ == "__main__":
  main()


def ml_dict(**kwargs):
  import ml_collections
  return ml_collections.ConfigDict(kwargs)
