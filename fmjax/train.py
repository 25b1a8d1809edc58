"""The generic pretraining loop. It knows the objective protocol (fmjax/objectives/base.py), not MAE.

One jitted step (in/out shardings, state donated) does: micro-batch gradient accumulation with
`lax.scan`, the optimiser update (fp32 master weights; the model computes in config.model.dtype),
and `objective.after_update`. Around it the loop handles checkpoints
(every N steps, at the end, on SIGTERM, at the TPU preemption sync point), auto-resume, the
NaN/Inf guard, metrics (with the parameter and update norms of the logged steps), MFU, the
profiler window and the objective's images.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import checkpoint as checkpoint_lib
from fmjax import config_validation, metrics_logging, mfu, optim, parallel, train_state
from fmjax.kernels import cpu as cpu_kernels
from fmjax.objectives import build_objective

InputBuilder = Callable[..., Any]


class NonFiniteLossError(FloatingPointError):
  pass


# ---------------------------------------------------------------------------------------------
# The step


def make_train_step(objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int, mesh=None):
  """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings.

  `grad_norm` is computed on every step: the loop stops on a non-finite one. The parameter and
  update norms are not computed here but by `LoggedNorms` around the steps the loop logs: an update
  norm inside the step, even under a `lax.cond`, keeps the updates alive next to the in-place
  parameter update, and XLA then writes them out on every step (DINO SpecViT-S/4 on CPU: its
  optimiser, EMA and norms 76-78 ms with it and 45-47 ms without, docs/speed.md item 23).
  """

  def micro_loss(params, model_state, objective_state, batch, rng, step):
    out = objective.loss({"params": params, **model_state}, objective_state, batch, rng, step)
    return out.loss, out

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    params = state["params"]
    if grad_accum == 1:
      (loss, out), grads = grad_fn(params, state["model_state"], state["objective_state"], batch, rng, step)
      model_state, objective_state, metrics = out.model_state, out.objective_state, dict(out.metrics)
    else:
      # Micro-batch i takes rows i, i+A, i+2A, ...: every device contributes to every micro-batch,
      # so no device idles and the data sharding of the batch is kept.
      def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        if mesh is None:
          return x
        spec = P(None, parallel.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
      micro_batches = jax.tree.map(split, batch)

      def body(carry, xs):
        grads_sum, loss_sum, model_state, objective_state = carry
        micro, index = xs
        (loss, out), grads = grad_fn(params, model_state, objective_state, micro,
                                     jax.random.fold_in(rng, index), step)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, out.model_state, out.objective_state), out.metrics

      zeros = jax.tree.map(jnp.zeros_like, params)
      carry = (zeros, jnp.zeros([], jnp.float32), state["model_state"], state["objective_state"])
      (grads, loss, model_state, objective_state), metrics = jax.lax.scan(
          body, carry, (micro_batches, jnp.arange(grad_accum)))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      loss = loss / grad_accum
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    objective_state = objective.after_update({"params": new_params, **model_state}, objective_state, step)
    metrics.update(loss=loss.astype(jnp.float32), lr=jnp.asarray(schedule(step), jnp.float32),
                   grad_norm=optim.global_norm(grads))
    new_state = dict(state, params=new_params, model_state=model_state, opt_state=opt_state,
                     objective_state=objective_state, step=step + 1)
    return new_state, metrics

  return train_step


class LoggedNorms:
  """`param_norm` and `update_norm` of the steps the loop logs, measured around the step.

  `before(state)` keeps a copy of the parameters (the step donates its state) and `after(state)`
  returns the norms of the new parameters and of their change, as arrays the loop fetches with the
  step's other metrics. The copy lives from one to the other: one more set of parameters (not of
  the optimiser state) on the logged steps only.
  """

  def __init__(self):
    self._copy = jax.jit(lambda params: jax.tree.map(jnp.copy, params))
    self._norms = jax.jit(lambda new, old: {
        "param_norm": optim.global_norm(new),
        "update_norm": optim.global_norm(jax.tree.map(jnp.subtract, new, old))})
    self._old = None

  def before(self, state) -> None:
    self._old = self._copy(state["params"])

  def after(self, state) -> dict[str, jax.Array]:
    old, self._old = self._old, None
    if old is None:
      raise RuntimeError("LoggedNorms.after without a before")
    return self._norms(state["params"], old)


# ---------------------------------------------------------------------------------------------
# Input


def default_input_builder(config, mesh, views, seed):
  from fmjax.data import pipeline
  return pipeline.build_input(config.data, global_batch_size=config.batch_size, views=views, mesh=mesh,
                              seed=seed)


def peek_batch(data_iterator):
  """The first batch, then rewinds the iterator (its state is restored from checkpoints later)."""
  initial = data_iterator.get_state()
  batch = next(data_iterator)
  data_iterator.set_state(initial)
  return batch


def resolve_total_steps(config, data_iterator) -> int:
  if config.get("total_steps", 0) > 0:
    return int(config.total_steps)
  epochs = config.get("epochs", 0)
  steps_per_epoch = getattr(data_iterator, "steps_per_epoch", 0)
  if not (epochs and steps_per_epoch):
    raise ValueError("set config.total_steps > 0, or config.epochs > 0 with an input whose size is known "
                     f"(got total_steps={config.get('total_steps')}, epochs={epochs}, "
                     f"steps_per_epoch={steps_per_epoch})")
  return int(math.ceil(epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Signals and preemption


class _StopFlag:
  """Set by SIGTERM (save, then exit 0) — the notice schedulers and TPU maintenance send."""

  def __init__(self):
    self.signal = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def __bool__(self):
    return self.signal is not None


def _reached_preemption_sync_point(step: int, enabled: list[bool]) -> bool:
  if not enabled[0] or jax.process_count() == 1:
    return False
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError as e:  # preemption service not enabled in this jax.distributed setup
    logging.info("preemption sync point unavailable (%s); relying on SIGTERM", e)
    enabled[0] = False
    return False


def needs_unrolled_flops(config) -> bool:
  """Whether XLA's count of the step itself misses work: loops it counts once, attention custom calls,
  the CPU kernels (fmjax/kernels: the adapter's layers, short-sequence attention), which any model
  may call where they are available."""
  model = config.model
  attention = model.get("attention", "xla")
  fused_attention = attention == "cudnn" or (attention == "auto" and jax.default_backend() == "gpu")
  return (bool(model.get("scan", False)) or int(config.get("grad_accum", 1)) > 1 or fused_attention
          or cpu_kernels.kernels_available())


def step_flops_per_device(config, mesh, lowered, compiled=None) -> float:
  """Model FLOPs per device of one step, for MFU: from the program before XLA's optimisations,
  whatever the backend (on an H200 the compiled step's count was 3.6x below it, MAE SpecViT-S/4:
  6.4e11 vs 2.3e12; XLA CPU's compiled count is within ~6%), with loops unrolled where XLA would
  count them once. `compiled`'s count is the fallback when the lowered one is unavailable."""
  fallback = mfu.compiled_flops(compiled) if compiled is not None else 0.0
  if needs_unrolled_flops(config):
    return unrolled_flops_per_device(config, mesh, fallback)
  return mfu.lowered_flops(lowered) / mesh.size or fallback


def unrolled_flops_per_device(config, mesh, fallback: float) -> float:
  """FLOPs per device and step of the same step with its loops unrolled and XLA attention.

  XLA's cost analysis counts a loop body once, whatever its trip count: a scanned ViT-g/4 step
  reads ~8x too low, and gradient accumulation over A micro-batches (also a scan) A x too low. A
  cuDNN attention custom call counts no FLOPs at all. So the count comes from the same step with
  layers unrolled, one micro-batch of the whole batch and the XLA attention formulation, which
  does the same arithmetic, as do the XLA formulations of the CPU kernels. That step is only traced
  and lowered (no compile); its global count is divided over the devices.
  """
  from fmjax import plan
  unrolled = config.copy_and_resolve_references()
  with unrolled.unlocked():
    unrolled.model.scan = False
    unrolled.model.attention = "xla"
    unrolled.grad_accum = 1
  try:
    with cpu_kernels.kernels_enabled(False):
      total = mfu.lowered_flops(plan.lower_step(unrolled, mesh, int(config.batch_size))[0])
  except Exception as e:  # the count is for logging only: never stop training over it
    logging.warning("could not count FLOPs of the unrolled step (%s); MFU uses XLA's count of the "
                    "compiled step", e)
    return fallback
  return total / mesh.size if total else fallback


# ---------------------------------------------------------------------------------------------
# The loop


def train(config, workdir: str, input_builder: InputBuilder | None = None,
          devices: list | None = None) -> dict[str, Any]:
  """Pretrains per `config` in `workdir` (resuming from its newest checkpoint). Returns a summary.

  `input_builder(config, mesh, views, seed)` replaces the Grain pipeline (tests); `devices`
  restricts the mesh to some of the devices (default: all).
  """
  config_validation.validate_static(config)
  dist = config.get("distributed", {})
  parallel.initialize_distributed(dist.get("coordinator", ""), dist.get("num_processes", 0),
                                  dist.get("process_id", -1))
  mesh = parallel.make_mesh(dict(config.mesh), devices)
  config_validation.validate_with_mesh(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  with jax.set_mesh(mesh):  # scoped: callers (tests, notebooks) keep their own mesh context
    return _train_on_mesh(config, workdir, mesh, input_builder)


def _train_on_mesh(config, workdir, mesh, input_builder):
  objective = build_objective(config)
  data_iterator = (input_builder or default_input_builder)(config, mesh, objective.views, config.seed)
  try:
    return _build_and_run(config, workdir, mesh, objective, data_iterator)
  finally:
    if hasattr(data_iterator, "close"):  # stop the pipeline's reader threads / workers
      data_iterator.close()


def _build_and_run(config, workdir, mesh, objective, data_iterator):
  total_steps = resolve_total_steps(config, data_iterator)
  schedule = optim.build_schedule(config.schedule, total_steps, getattr(data_iterator, "steps_per_epoch", 0))
  tx = optim.build_optimizer(config.optimizer, schedule)
  if hasattr(objective, "wrap_optimizer"):  # optional protocol hook (fmjax/objectives/base.py)
    tx = objective.wrap_optimizer(tx)  # e.g. DINO: per-tensor clipping, frozen last layer

  first_batch = peek_batch(data_iterator)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), first_batch)
  init_fn = train_state.make_init_fn(objective, tx, example, config.seed)
  abstract_state, state_shardings = train_state.abstract_state_and_shardings(init_fn, mesh)

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                             async_save=config.checkpoint.get("async", True))
  state, restored_step = checkpointer.restore_latest(abstract_state, data_iterator)
  if state is None:
    state = train_state.create_state(init_fn, state_shardings)
    logging.info("initialised a new state: %s parameters\n%s", f"{train_state.num_params(state['params']):,}",
                 train_state.describe_shardings(state_shardings))
  else:
    logging.info("resumed from checkpoint step %d in %s", restored_step, checkpointer.directory)
  start_step = int(jax.device_get(state["step"]))

  batch_shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(parallel.BATCH_AXES, *([None] * (x.ndim - 1)))),
                                 first_batch)
  step_fn = jax.jit(make_train_step(objective, tx, schedule, int(config.get("grad_accum", 1)), mesh),
                    in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
  compile_start = time.perf_counter()
  lowered = train_state.trace_with_rules(lambda: step_fn.lower(abstract_state, first_batch))
  compiled = train_state.trace_with_rules(lowered.compile)
  compile_s = time.perf_counter() - compile_start
  flops = step_flops_per_device(config, mesh, lowered, compiled)
  peak, peak_source = mfu.peak_flops_per_device(compute_dtype=str(config.model.get("dtype", "float32")))
  logging.info("compiled the train step in %.1f s; %.3g FLOPs per device and step; peak %.3g FLOP/s (%s)",
               compile_s, flops, peak, peak_source)

  images_fn = None
  images_every = int(config.log.get("images_every", 0))
  if images_every and hasattr(objective, "images"):
    images_fn = jax.jit(lambda s, b: objective.images({"params": s["params"], **s["model_state"]},
                                                      s["objective_state"], b,
                                                      jax.random.wrap_key_data(s["rng"])))

  logger = metrics_logging.MetricsLogger(workdir, tensorboard=config.log.get("tensorboard", True))
  if start_step == 0:
    logger.hparams(config.to_dict())
  progress = metrics_logging.Progress(total_steps, start_step, config.batch_size,
                                      getattr(objective, "tokens_per_sample", 0))
  summary = _run_loop(config, workdir, compiled, state, data_iterator, start_step, total_steps, checkpointer,
                      logger, progress, images_fn, images_every, flops, peak)
  summary.update(compile_s=compile_s, flops_per_device_step=flops, total_steps=total_steps)
  return summary


def _run_loop(config, workdir, compiled, state, data_iterator, start_step, total_steps, checkpointer,
              logger, progress, images_fn, images_every, flops, peak):
  every_save = int(config.checkpoint.every_steps)
  every_log = max(1, int(config.log.every_steps))
  profile_start = int(config.log.get("profile_start_step", -1))
  profile_steps = int(config.log.get("profile_steps", 0))
  preemption_enabled = [True]
  norms = LoggedNorms()
  pending: collections.deque = collections.deque()
  last_saved = start_step
  last_metrics: dict[str, float] = {}
  stopped_by = None
  step = start_step

  def is_logged(finished_step: int) -> bool:
    """Whether the step that brings the count to `finished_step` writes a metrics row."""
    return finished_step % every_log == 0 or finished_step == total_steps

  def drain(keep: int):
    """Fetches metrics of finished steps (all but `keep` newest) and stops on a non-finite loss."""
    nonlocal last_metrics
    while len(pending) > keep:
      done_step, metrics = pending.popleft()
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {done_step}; training stopped. "
            f"The last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}")
      last_metrics = metrics
      if is_logged(done_step):
        timing = progress.measure(done_step)
        if timing:
          timing["mfu"] = mfu.mfu(flops, timing["step_time_s"], peak)
        values = {**metrics, **timing}
        logger.scalars(done_step, values)
        if jax.process_index() == 0:
          logging.info(metrics_logging.format_line(done_step, total_steps, values))

  try:
    with _StopFlag() as stop:
      progress.reset_clock(start_step)
      while step < total_steps:
        if profile_steps and step == profile_start:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next(data_iterator)
        logged = is_logged(step + 1)
        if logged:
          norms.before(state)
        state, metrics = compiled(state, batch)
        if logged:
          metrics = {**metrics, **norms.after(state)}
        step += 1
        pending.append((step, metrics))
        if profile_steps and step == profile_start + profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        if images_fn is not None and step % images_every == 0:
          with train_state.activation_rules():
            logger.images(step, jax.device_get(images_fn(state, batch)))
        preempted = _reached_preemption_sync_point(step, preemption_enabled)
        save_now = (every_save and step % every_save == 0) or step == total_steps or preempted or bool(stop)
        # Keep one step in flight (host overlaps the device) unless we must look at this step now.
        drain(0 if (save_now or step % every_log == 0) else 1)
        if save_now:
          checkpointer.save(step, state, data_iterator, config, force=True)
          last_saved = step
        if preempted or stop:
          stopped_by = "preemption" if preempted else "SIGTERM"
          logging.warning("%s at step %d: checkpoint saved, exiting", stopped_by, step)
          break
      drain(0)
      if last_saved != step:
        checkpointer.save(step, state, data_iterator, config, force=True)
  finally:
    # Also on errors (NaN guard, Ctrl-C): finish writing the last good checkpoint before leaving.
    try:
      checkpointer.wait()
    finally:
      checkpointer.close()
      logger.flush()
      logger.close()
  return {"final_step": step, "stopped_by": stopped_by, "last_metrics": last_metrics, "state": state}
