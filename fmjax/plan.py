"""Memory and compile planning: compile the real train step for a big mesh without allocating it.

  python -m fmjax.plan --config=configs/mae_vit_g.py --devices 64 --mesh data=1,fsdp=64,tensor=1 \
      --device-memory 95GiB [--per-device-batch 4] [--max-batch] [--compare]

The step is lowered with abstract inputs (jax.ShapeDtypeStruct carrying the shardings the train
loop would use) for N fake CPU devices and compiled by XLA; nothing model-sized is allocated.
Reported per device: parameter, optimiser and objective-state bytes from the shardings, the ideal
(total / model shards, where model shards = fsdp x tensor), and XLA's memory analysis (arguments,
outputs, temporaries); the largest per-device batch that fits the given device memory (fitted from
two compiles, temporaries grow linearly with batch, then verified by a third); compile time.

CPU-compiled numbers are an estimate of what the TPU/GPU compiler does: the parameter and optimiser
bytes are exact (they follow from the shardings); temporaries depend on the backend's fusion.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, NamedTuple


def _force_device_count(argv: list[str]) -> None:
  """Fake CPU devices must be requested before jax initialises its backends."""
  count = None
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      count = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      count = argv[i + 1]
  if count is not None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(count)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
  """'95GiB' -> 102005473280; '16GB' -> 16e9; plain integers are bytes."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise ValueError(f"device memory {text!r} is not a size; use e.g. 95GiB, 16GB or 1000000")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for item in filter(None, text.split(",")):
    if "=" not in item:
      raise ValueError(f"mesh item {item!r} must look like axis=size (axes data, fsdp, tensor)")
    key, value = item.split("=", 1)
    out[key.strip()] = int(value)
  return out


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _shard_bytes(tree) -> int:
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * leaf.dtype.itemsize
  return total


def _total_bytes(tree) -> int:
  import jax
  import numpy as np
  return int(sum(int(np.prod(l.shape)) * l.dtype.itemsize for l in jax.tree.leaves(tree)))


def example_batch_spec(config, views, global_batch: int):
  """Abstract batch of the pipeline's batch contract (fmjax/objectives/base.py)."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(config.data.get("dtype", "float32"))
  crop, bands = int(config.data.crop_size), int(config.data.num_bands)
  spec = {"image": jax.ShapeDtypeStruct((global_batch, views.global_views, crop, crop, bands), dtype)}
  if views.local_views:
    size = int(config.data.local.size)
    spec["local"] = jax.ShapeDtypeStruct((global_batch, views.local_views, size, size, bands), dtype)
  return spec


def compile_step(config, mesh, global_batch: int, replicated: list | None = None):
  """Lowers and compiles the train loop's own step for `mesh`; returns (compiled, abstract state, seconds).

  `replicated`, when given, receives the state leaves whose indivisible dims were replicated."""
  import time
  lowered, abstract_state = lower_step(config, mesh, global_batch, replicated)
  start, cpu_start = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  # CPU seconds of this process (all threads) during the compile: on a shared, loaded host this is
  # the robust figure; wall-clock time there mostly measures the other processes.
  _last_compile_cpu_s[0] = time.process_time() - cpu_start
  return compiled, abstract_state, time.perf_counter() - start


_last_compile_cpu_s = [0.0]


class StepBuild(NamedTuple):
  """The train loop's step for one config and mesh, before lowering."""
  step_fn: Any            # jitted train_step(state, batch), in/out shardings set, state donated
  init_fn: Any            # train_state.make_init_fn's init (for train_state.create_state)
  abstract_state: Any     # jax.ShapeDtypeStruct tree with shardings
  state_shardings: Any
  batch: Any              # abstract global batch (ShapeDtypeStruct with shardings)


def build_step(config, mesh, global_batch: int, replicated: list | None = None) -> StepBuild:
  """The jitted step the train loop would run on `mesh`, with abstract state and batch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from fmjax import optim, parallel, train, train_state
  from fmjax.objectives import build_objective

  objective = build_objective(config)
  # The schedule does not change the compiled step's memory; it only has to be valid (warm-up given in
  # epochs must fit: 100 steps per epoch assumed).
  total_steps = max(int(config.get("total_steps", 0)), int(config.get("epochs", 0)) * 100, 1000)
  schedule = optim.build_schedule(config.schedule, total_steps, 100)
  tx = optim.build_optimizer(config.optimizer, schedule)
  if hasattr(objective, "wrap_optimizer"):
    tx = objective.wrap_optimizer(tx)
  batch = example_batch_spec(config, objective.views, global_batch)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), batch)
  init_fn = train_state.make_init_fn(objective, tx, example, config.seed)
  with jax.set_mesh(mesh):
    abstract_state, state_shardings = train_state.abstract_state_and_shardings(init_fn, mesh, replicated)
    batch_shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P(parallel.BATCH_AXES, *([None] * (x.ndim - 1)))), batch)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, batch_shardings)
    step_fn = jax.jit(train.make_train_step(objective, tx, schedule, int(config.get("grad_accum", 1)), mesh),
                      in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
  return StepBuild(step_fn, init_fn, abstract_state, state_shardings, batch)


def lower_step(config, mesh, global_batch: int, replicated: list | None = None):
  """The train loop's step for `mesh`, lowered (not compiled); returns (lowered, abstract state)."""
  import jax

  from fmjax import parallel

  build = build_step(config, mesh, global_batch, replicated)
  with jax.set_mesh(mesh), parallel.with_rules():
    lowered = build.step_fn.lower(build.abstract_state, build.batch)
  return lowered, build.abstract_state


def plan(config, mesh_shape: dict[str, int], device_memory: int | None = None,
         per_device_batch: int | None = None, find_max_batch: bool = False, refine: int = 1) -> dict:
  """The planning report for one config and mesh (a dict; `format_report` prints it)."""
  import jax

  from fmjax import mfu, parallel

  mesh = parallel.make_mesh(mesh_shape)
  dp = parallel.data_parallel_size(mesh)
  model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
  if per_device_batch is None:
    per_device_batch = max(1, int(config.batch_size) // dp)
  replicated: list[str] = []
  compiled, state, seconds = compile_step(config, mesh, per_device_batch * dp, replicated)
  memory = compiled.memory_analysis()
  parts = {k: state[k] for k in ("params", "opt_state", "objective_state", "model_state")}
  report = {
      "model": config.model.name, "objective": config.objective.name,
      "devices": mesh.size, "mesh": dict(mesh.shape), "per_device_batch": per_device_batch,
      "global_batch": per_device_batch * dp,
      "remat": config.model.get("remat", "none"), "scan": bool(config.model.get("scan", False)),
      "attention": config.model.get("attention", "xla") if "vit" in config.model.name else "",
      "compile_s": seconds, "compile_cpu_s": _last_compile_cpu_s[0],
      "load_average": os.getloadavg()[0],
      "num_params": sum(int(x.size) for x in jax.tree.leaves(state["params"])),
      "per_device": {k: _shard_bytes(v) for k, v in parts.items()},
      "total": {k: _total_bytes(v) for k, v in parts.items()},
      "xla": {**memory_dict(memory), "code": memory.generated_code_size_in_bytes},
      "flops_per_device_step": mfu.compiled_flops(compiled),
      "model_shards": model_shards,
      # State leaves the logical rules would shard over an axis that does not divide them: the train
      # loop's shardings (fmjax/train_state.py) fail on these; the plan replicates those dims.
      "replicated_indivisible": replicated,
  }
  state_total = sum(report["total"][k] for k in ("params", "opt_state"))
  state_per_device = sum(report["per_device"][k] for k in ("params", "opt_state"))
  report["params_opt_per_device"] = state_per_device
  report["params_opt_ideal"] = state_total / model_shards
  report["params_opt_vs_ideal"] = state_per_device / max(report["params_opt_ideal"], 1)
  report["peak_estimate"] = peak_bytes(report["xla"])
  if device_memory:
    report["device_memory"] = device_memory
    report["fits"] = report["peak_estimate"] <= device_memory
    if find_max_batch:
      report["max_batch"] = max_per_device_batch(config, mesh_shape, device_memory, report, refine)
  return report


def peak_bytes(xla: dict) -> int:
  """Live bytes at the step's peak: inputs + outputs not aliased to inputs (donation) + temporaries."""
  return int(xla["argument"] + xla["output"] - xla["alias"] + xla["temp"])


def max_per_device_batch(config, mesh_shape, device_memory: int, report_at_b: dict, refine: int = 1) -> dict:
  """Largest per-device batch with peak <= device memory: a linear fit over two compiles, verified.

  Temporaries are not exactly linear in the batch (measured: ViT-g, fsdp=8, a fit from batches 4 and
  8 predicted 116 whose compile then peaked 3% above 95 GiB), so a failed verification refits
  through the last two points (secant) and verifies again, up to `refine` more compiles.
  """
  from fmjax import parallel
  mesh = parallel.make_mesh(mesh_shape)
  dp = parallel.data_parallel_size(mesh)
  b1 = report_at_b["per_device_batch"]
  points = [(b1, report_at_b["peak_estimate"])]
  b2 = b1 * 2
  compiled, _, _ = compile_step(config, mesh, b2 * dp)
  points.append((b2, peak_bytes(memory_dict(compiled.memory_analysis()))))
  result = {"verified": None, "tries": []}
  for attempt in range(refine + 1):
    (ba, pa), (bb, pb) = points[-2:]
    slope = max((pb - pa) / (bb - ba), 1.0)
    fixed = pa - slope * ba
    predicted = int((device_memory - fixed) // slope)
    result.update(bytes_per_sample=slope, fixed_bytes=fixed, predicted=predicted)
    if predicted < 1 or predicted in (b for b, _ in points):
      break
    compiled, _, _ = compile_step(config, mesh, predicted * dp)
    peak = peak_bytes(memory_dict(compiled.memory_analysis()))
    result["tries"].append((predicted, peak))
    result.update(verified=peak <= device_memory, peak_at_predicted=peak)
    if peak <= device_memory:
      break
    points.append((predicted, peak))
  return result


def memory_dict(memory) -> dict:
  """The byte counts of XLA's memory analysis of a compiled program (what `peak_bytes` takes)."""
  return {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
          "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes}


def format_report(r: dict) -> str:
  lines = [
      f"{r['model']} / {r['objective']}  mesh {r['mesh']} ({r['devices']} devices)  remat={r['remat']} "
      f"scan={r['scan']}  batch {r['per_device_batch']}/device ({r['global_batch']} global)",
      f"  parameters: {r['num_params']:,}   compile: {r['compile_s']:.1f} s ({r.get('compile_cpu_s', 0):.1f} CPU s, "
      f"load {r.get('load_average', 0):.1f})   "
      f"FLOPs/device/step: {r['flops_per_device_step']:.3g}",
      "  per device:  " + "  ".join(f"{k} {gib(v)}" for k, v in r["per_device"].items()),
      f"  params+optimiser per device {gib(r['params_opt_per_device'])} vs ideal {gib(r['params_opt_ideal'])} "
      f"(total / {r['model_shards']} model shards): {r['params_opt_vs_ideal']:.3f}x",
      "  XLA memory analysis: " + "  ".join(f"{k} {gib(v)}" for k, v in r["xla"].items()),
      f"  peak estimate (args + non-aliased outputs + temps): {gib(r['peak_estimate'])}",
  ]
  if r.get("replicated_indivisible"):
    lines.append(f"  WARNING: {len(r['replicated_indivisible'])} state leaves do not divide by their mesh axes and "
                 "were replicated on those dims (train_state's shardings would raise IndivisibleError): "
                 + "; ".join(r["replicated_indivisible"][:6]) + (" ..." if len(r["replicated_indivisible"]) > 6 else ""))
  if r["scan"]:
    lines.append("  note: XLA's cost analysis counts a scanned loop body once, so FLOPs above under-count the "
                 "blocks by the depth (use benchmarks/plan_tables.py flops)")
  elif r["remat"] != "none":
    lines.append(f"  note: remat={r['remat']} on unrolled blocks saved no memory in XLA CPU compiles (ViT-B/4, "
                 "DINO ViT-B/4: temporaries unchanged; scanned: 9.6 -> 1.0 GiB): plan it with --scan")
  if r.get("attention") in ("auto", "cudnn"):
    lines.append(f"  note: attention={r['attention']} takes cuDNN's fused kernel on a GPU; this CPU compile "
                 "stores XLA attention's [L, L] weights instead, so a GPU run needs less (DINO ViT-B/4, 32 "
                 "per H200: 87 GiB with XLA attention, 38 GiB with cuDNN)")
  if "device_memory" in r:
    lines.append(f"  device memory {gib(r['device_memory'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
  if "max_batch" in r:
    m = r["max_batch"]
    lines.append(f"  largest per-device batch: {m['predicted']} (≈{gib(m['bytes_per_sample'])} per sample, "
                 f"{gib(m['fixed_bytes'])} fixed; verified by compiling it: {m['verified']})")
  return "\n".join(lines)


COMPARE_POLICIES = ("none", "full", "dots_saveable")


def normalize_argv(argv: list[str]) -> list[str]:
  """Accepts --device-memory style spellings (absl wants underscores); --config.* keys are left alone.

  Only the dashes after the leading '--' change ('--per-device-batch' -> '--per_device_batch'): an
  earlier version also turned the leading '--' into '__', and absl then took the flag for a
  positional argument and silently ignored it (and its value)."""
  return [re.sub(r"^--([a-z]+(?:-[a-z]+)+)", lambda m: "--" + m.group(1).replace("-", "_"), a)
          if a.startswith("--") and not a.startswith("--config") else a for a in argv]


def main(argv=None) -> None:
  argv = normalize_argv(list(sys.argv if argv is None else argv))
  _force_device_count(argv)
  import json

  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_integer("devices", None, "number of (fake CPU) devices to plan for")
  flags.DEFINE_string("mesh", "fsdp=-1", "mesh shape, e.g. data=1,fsdp=64,tensor=1 (one axis may be -1)")
  flags.DEFINE_string("device_memory", "", "memory per device, e.g. 95GiB (v5p), 80GB (H100)")
  flags.DEFINE_integer("per_device_batch", None, "default: config.batch_size / data-parallel devices")
  flags.DEFINE_bool("max_batch", False, "find the largest per-device batch that fits --device_memory")
  flags.DEFINE_integer("refine", 1, "--max_batch: extra compiles to refit when the first guess does not fit")
  flags.DEFINE_string("remat", None, f"override config.model.remat (e.g. {', '.join(COMPARE_POLICIES)})")
  flags.DEFINE_bool("scan", None, "override config.model.scan (the shared configs have no such key, so "
                    "--config.model.scan=True is refused by ml_collections)")
  flags.DEFINE_bool("compare", False, f"compare remat policies {COMPARE_POLICIES} x scan on/off")
  flags.DEFINE_string("json", "", "also write the report(s) to this JSON file")
  config_flags.DEFINE_config_file("config", None, "training config file", lock_config=False)

  def run(_):
    import jax
    cfg = flags.FLAGS.config
    if flags.FLAGS.devices and jax.device_count() != flags.FLAGS.devices:
      raise SystemExit(f"asked for {flags.FLAGS.devices} devices but jax sees {jax.device_count()} "
                       "(XLA_FLAGS was set before fmjax.plan could set it?)")
    memory = parse_bytes(flags.FLAGS.device_memory) if flags.FLAGS.device_memory else None
    remat = flags.FLAGS.remat if flags.FLAGS.remat is not None else cfg.model.get("remat", "none")
    scan = flags.FLAGS.scan if flags.FLAGS.scan is not None else bool(cfg.model.get("scan", False))
    variants = [(remat, scan)]
    if flags.FLAGS.compare:
      variants = [(p, s) for s in (True, False) for p in COMPARE_POLICIES]
    reports = []
    for remat, scan in variants:
      cfg.model.remat, cfg.model.scan = remat, scan
      r = plan(cfg, parse_mesh(flags.FLAGS.mesh), memory, flags.FLAGS.per_device_batch, flags.FLAGS.max_batch,
               flags.FLAGS.refine)
      print(format_report(r), flush=True)
      reports.append(r)
    if flags.FLAGS.json:
      with open(flags.FLAGS.json, "w") as f:
        json.dump(reports, f, indent=1, default=float)

  app.run(run, argv=argv)


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
