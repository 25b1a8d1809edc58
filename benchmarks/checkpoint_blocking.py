"""How long async Orbax checkpointing holds up the training loop, against the time between saves.

  python -m benchmarks.checkpoint_blocking [--config configs/demo.py] [--every N] [--saves 3] [--devices 1]

Runs the engine's own pieces (fmjax.train.make_train_step, fmjax.train_state, fmjax.checkpoint.
Checkpointer with async saves) in a loop that saves the way fmjax/train.py's `_run_loop` does: on a
save step it waits for the step to finish (drain), then calls `Checkpointer.save(..., force=True)`,
which returns once the arrays are copied to host and leaves the write to a background thread.
Batches are synthetic (the data pipeline is not what is measured).

Reported, one run, side by side:
  step       median step time of steps with no save nearby (the baseline)
  blocking   time inside save() + the forced drain on save steps
  after      extra time of the `--window` steps following each save over the baseline (the background
             write competes with those steps for the host)
  overhead   (blocking + after) / (every x step), the share of the time between saves lost; target < 2%
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/demo.py", help="config file (its get_config(arg))")
  parser.add_argument("--config-arg", default="", help="the text after ':' in --config=FILE:ARG")
  parser.add_argument("--every", type=int, default=0, help="steps between saves (default: config.checkpoint.every_steps)")
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--window", type=int, default=10, help="steps after a save charged with the background write")
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (data-parallel mesh)")
  parser.add_argument("--workdir", default="", help="where checkpoints go (default: a temporary directory)")
  args = parser.parse_args(argv)
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tqdm import tqdm

  from benchmarks import config_file
  from fmjax import checkpoint, optim, parallel, train, train_state
  from fmjax.objectives import build_objective

  config = config_file.load(args.config, args.config_arg)
  every = args.every or int(config.checkpoint.every_steps)
  if every < 1:
    raise SystemExit(f"--every={every}: the config saves no checkpoints; pass --every N (N >= 1)")
  if args.window >= every:
    raise SystemExit(f"--window={args.window} must be below the save interval {every}")

  mesh = parallel.make_mesh({"data": -1})
  objective = build_objective(config)
  total_steps = every * args.saves + args.window  # `saves` timed saves, each followed by `window` steps
  schedule = optim.build_schedule(config.schedule, total_steps, 0)
  tx = optim.build_optimizer(config.optimizer, schedule)
  if hasattr(objective, "wrap_optimizer"):
    tx = objective.wrap_optimizer(tx)
  crop, bands = int(config.data.crop_size), int(config.data.num_bands)
  views = objective.views
  rng = np.random.default_rng(0)
  host_batch = {"image": rng.normal(size=(config.batch_size, views.global_views, crop, crop, bands)).astype(np.float32)}
  if views.local_views:
    size = int(config.data.local.size)
    host_batch["local"] = rng.normal(size=(config.batch_size, views.local_views, size, size, bands)).astype(np.float32)

  workdir = args.workdir or tempfile.mkdtemp(prefix="ckpt_blocking_")
  with jax.set_mesh(mesh):
    batch_shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(parallel.BATCH_AXES, *([None] * (x.ndim - 1)))),
                                   host_batch)
    batch = jax.device_put(host_batch, batch_shardings)
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), host_batch)
    init_fn = train_state.make_init_fn(objective, tx, example, config.seed)
    abstract_state, state_shardings = train_state.abstract_state_and_shardings(init_fn, mesh)
    state = train_state.create_state(init_fn, state_shardings)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    step_fn = jax.jit(train.make_train_step(objective, tx, schedule, int(config.get("grad_accum", 1)), mesh),
                      in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
    compiled = train_state.trace_with_rules(lambda: step_fn.lower(abstract_state, batch).compile())

    checkpointer = checkpoint.Checkpointer(workdir, keep=int(config.checkpoint.get("keep", 3)), async_save=True)
    # Warm-up: a few steps and one save, so that Orbax's first-save set-up is not charged to the loop.
    for _ in range(3):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    checkpointer.save(0, state, None, config, force=True)
    checkpointer.wait()

    step_times, blocking, after = [], [], []
    pending = None
    since_save = None
    for step in tqdm(range(1, total_steps + 1), desc=f"steps (save every {every})"):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      if pending is not None:  # keep one step in flight, like the train loop
        jax.device_get(pending)
      pending = metrics["loss"]
      save_now = step % every == 0
      if save_now:
        jax.device_get(pending)  # the loop drains before saving
        drained = time.perf_counter()
        checkpointer.save(step, state, None, config, force=True)
        blocking.append(time.perf_counter() - start)
        since_save = 0
        step_times.append(("save", drained - start))
        continue
      elapsed = time.perf_counter() - start
      if since_save is not None and since_save < args.window:
        step_times.append(("after", elapsed))
        since_save += 1
      else:
        step_times.append(("plain", elapsed))
    jax.device_get(pending)
    checkpointer.wait()
    checkpointer.close()

  plain = [t for kind, t in step_times if kind == "plain"]
  base = statistics.median(plain)
  after_excess = [t - base for kind, t in step_times if kind == "after"]
  per_save_after = sum(after_excess) / len(blocking)
  # On save steps the step itself would have cost ~base anyway; only the rest is charged to the save.
  per_save_block = statistics.median(blocking) - base
  between = every * base
  result = {
      "config": args.config, "state_mb": state_bytes / 1e6, "every": every, "saves": len(blocking),
      "step_s": base, "between_saves_s": between, "blocking_s": per_save_block, "after_s": per_save_after,
      "overhead": (per_save_block + per_save_after) / between, "load": os.getloadavg()[0],
  }
  print(f"config {args.config}: train state {result['state_mb']:.1f} MB on {jax.device_count()} device(s), "
        f"save every {every} steps, {len(blocking)} saves timed (load average {result['load']:.1f})")
  print(f"  step (median, no save nearby)        {base * 1e3:9.2f} ms")
  print(f"  time between saves ({every} x step)     {between * 1e3:9.1f} ms")
  print(f"  save step blocking (save() + drain)  {per_save_block * 1e3:9.2f} ms   median over saves, minus one step")
  print(f"  slower steps after a save            {per_save_after * 1e3:9.2f} ms   summed over {args.window} steps")
  print(f"  overhead / time between saves       {result['overhead']:9.2%}   (target < 2%)")
  return result


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
