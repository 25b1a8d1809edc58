"""The train loop's step on an accelerator: step time, MFU and memory, per attention kernel.

  python -m benchmarks.accelerator_step --config configs/mae_vit_g_h100x64.py --per-device-batch 64 \
      --attention xla,cudnn [--steps 10] [--set model.remat=full] [--json results.jsonl]
  python -m benchmarks.accelerator_step --attention-check     # the kernels alone: parity and speed

Each attention implementation runs in a fresh process (clean allocator statistics), which builds
the step exactly as the train loop does (`fmjax.plan.build_step`: objective, optimiser, shardings,
donation, grad_accum) on a data-parallel mesh of the local devices (`--mesh` to change), creates
the state on the devices, generates random batches there, and reports:
- compile seconds;
- step seconds: throughput of `--steps` steps dispatched back to back (the train loop keeps one step
  in flight) and the median of the same number of steps with a sync after each;
- model FLOPs per step (`fmjax.train.step_flops_per_device`, as the train loop counts them: the
  lowered program, with layers and micro-batches unrolled and XLA attention where needed) and MFU against the datasheet bf16 peak and a measured bf16 matmul;
- memory: XLA's memory analysis of the compiled step (the figures `fmjax.plan` reports from a CPU
  compile) and the device allocator's peak bytes in use.
Runs on CPU too (small configs), which is how its code is tested.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import config_file  # noqa: E402

RESULT = "RESULT "


def load_config(spec: str, overrides: list[str]):
  """configs/FILE.py[:ARG] -> get_config(ARG), then `key.sub=value` overrides (Python literals)."""
  path, _, arg = spec.partition(":")
  return config_file.load(path, arg, overrides)


def random_batch(abstract_batch, seed: int):
  """Standard-normal arrays with the batch's shapes and shardings, generated on the devices."""
  import jax
  import jax.numpy as jnp
  leaves, treedef = jax.tree.flatten(abstract_batch)

  def make(key):
    keys = jax.random.split(key, len(leaves))
    return [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
  arrays = jax.jit(make, out_shardings=[x.sharding for x in leaves])(jax.random.key(seed))
  return jax.tree.unflatten(treedef, arrays)


def run_variant(args, attention: str) -> dict:
  """One attention implementation, in this process."""
  import jax
  import jax.numpy as jnp

  from fmjax import mfu, parallel, plan, train, train_state
  config = load_config(args.config, args.set)
  mesh = parallel.make_mesh(plan.parse_mesh(args.mesh))
  global_batch = args.per_device_batch * parallel.data_parallel_size(mesh)
  with config.unlocked():
    config.model.attention = attention
    config.batch_size = global_batch
  build = plan.build_step(config, mesh, global_batch)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = train_state.trace_with_rules(lambda: build.step_fn.lower(build.abstract_state, build.batch))
    compiled = train_state.trace_with_rules(lowered.compile)
    compile_s = time.perf_counter() - start
    memory = plan.memory_dict(compiled.memory_analysis())
    state = train_state.create_state(build.init_fn, build.state_shardings)
    batches = [random_batch(build.batch, seed) for seed in range(2)]
    holder = {"state": state}

    def step(i):
      holder["state"], metrics = compiled(holder["state"], batches[i % 2])
      return metrics
    for i in range(args.warmup):
      loss = float(step(i)["loss"])
    start = time.perf_counter()
    for i in range(args.steps):
      metrics = step(i)
    jax.block_until_ready((holder["state"], metrics))
    pipelined_s = (time.perf_counter() - start) / args.steps
    synced = []
    for i in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(step(i))
      synced.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if args.profile_dir:
      save_profile(os.path.join(args.profile_dir, attention), compiled, lambda: step(0), args.profile_steps)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  flops = args.flops_per_step or train.step_flops_per_device(config, mesh, lowered, compiled)
  datasheet, source = mfu.peak_flops_per_device(device)
  matmul_peak = (mfu.measured_matmul_peak(8192, jnp.bfloat16) if device.platform != "cpu"
                 else mfu.measured_cpu_peak())
  return {
      "config": args.config, "set": args.set, "attention": attention, "device": device.device_kind,
      "platform": device.platform, "devices": mesh.size, "mesh": dict(mesh.shape), "jax": jax.__version__,
      "per_device_batch": args.per_device_batch, "grad_accum": int(config.get("grad_accum", 1)),
      "remat": config.model.get("remat", "none"), "scan": bool(config.model.get("scan", False)),
      "compile_s": compile_s, "step_s": pipelined_s, "synced_step_s": float(np.median(synced)),
      "samples_per_s_per_device": args.per_device_batch / pipelined_s,
      "flops_per_device_step": flops, "datasheet_peak": datasheet, "datasheet_source": source,
      "matmul_peak": matmul_peak, "mfu_datasheet": mfu.mfu(flops, pipelined_s, datasheet),
      "mfu_matmul": mfu.mfu(flops, pipelined_s, matmul_peak), "loss": loss,
      "xla_memory": memory, "xla_peak_bytes": plan.peak_bytes(memory),
      "device_peak_bytes": int(stats.get("peak_bytes_in_use", 0)),
      "device_bytes_limit": int(stats.get("bytes_limit", 0)),
  }


def save_profile(directory: str, compiled, run_step, steps: int):
  """A jax.profiler trace of `steps` synced steps and the compiled step's HLO text, in `directory`:
  `python -m benchmarks.profile_step --from-trace DIRECTORY` sums its op times by model scope."""
  import glob
  import gzip
  import shutil
  import tempfile

  import jax
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory() as trace_dir:   # the profiler nests its files four folders down
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(run_step())
    trace, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    shutil.move(trace, os.path.join(directory, "perfetto_trace.json.gz"))
  with gzip.open(os.path.join(directory, "step.hlo.txt.gz"), "wt") as f:
    f.write(compiled.as_text())
  with open(os.path.join(directory, "profile.json"), "w") as f:
    json.dump({"steps": steps}, f)


def attention_check(shapes, steps: int) -> list[dict]:
  """transformer.Attention with each available implementation vs the same module in float32.

  Per shape [B, L, width, heads]: relative errors (max |difference| / max |reference|) of the bf16
  module's loss, input gradient and qkv-kernel gradient against the float32 module (same parameters),
  and fwd+bwd milliseconds."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from fmjax.models import transformer
  rows = []
  for batch, length, width, heads in shapes:
    x = jax.random.normal(jax.random.key(0), (batch, length, width), jnp.float32)
    cot = jax.random.normal(jax.random.key(1), (batch, length, width), jnp.float32)
    params = nn.meta.unbox(transformer.Attention(heads).init(jax.random.key(2), x[:1]))

    def loss_fn(impl, dtype):
      module = transformer.Attention(heads, impl, dtype=dtype)
      # The cotangent is an argument: captured, it became a constant that XLA GPU spent seconds folding.
      return lambda p, x, cot: jnp.sum(module.apply(p, x).astype(jnp.float32) * cot)
    reference = jax.jit(jax.value_and_grad(loss_fn("xla", jnp.float32), argnums=(0, 1)))(params, x, cot)
    head_dim = width // heads
    for impl in ("xla", "cudnn"):
      if impl == "cudnn" and not transformer.cudnn_attention_supported(head_dim, jnp.bfloat16):
        continue
      row = {"shape": [batch, length, width, heads], "attention": impl}
      try:
        fn = jax.jit(jax.value_and_grad(loss_fn(impl, jnp.bfloat16), argnums=(0, 1)))
        value, grads = jax.block_until_ready(fn(params, x, cot))
        times = []
        for _ in range(steps):
          start = time.perf_counter()
          jax.block_until_ready(fn(params, x, cot))
          times.append(time.perf_counter() - start)
      except Exception as e:  # one refused kernel must not hide the other rows
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      else:
        error = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        qkv_kernel = lambda g: g["params"]["qkv"]["kernel"]
        row.update(ms=1e3 * float(np.median(times)), rel_err_dx=error(grads[1], reference[1][1]),
                   rel_err_dqkv=error(qkv_kernel(grads[0]), qkv_kernel(reference[1][0])),
                   rel_err_loss=abs(float(value) - float(reference[0])) / abs(float(reference[0])))
      rows.append(row)
      print(RESULT + json.dumps(row), flush=True)
  return rows


def _run_child(argv, attention: str, timeout: float) -> dict:
  try:
    out = subprocess.run([sys.executable, "-m", "benchmarks.accelerator_step", *argv, "--child", attention],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"attention": attention, "error": f"did not finish within --child-timeout {timeout:.0f} s"}
  lines = [l for l in out.stdout.splitlines() if l.startswith(RESULT)]
  if out.returncode or not lines:
    sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
    errors = [l for l in out.stderr.splitlines() if re.match(r"^[\w.]*(Error|Exception)\b", l)] or [""]
    return {"attention": attention, "error": f"exit {out.returncode}: {errors[-1]}"}
  return json.loads(lines[-1][len(RESULT):])


def format_row(r: dict) -> str:
  if "error" in r:
    return f"  {r['attention']:6s} FAILED ({r['error'][:300]})"
  gib = 2.0 ** 30
  return (f"  {r['attention']:6s} compile {r['compile_s']:6.1f} s  step {r['step_s'] * 1e3:8.1f} ms "
          f"(synced {r['synced_step_s'] * 1e3:8.1f})  {r['samples_per_s_per_device']:8.1f} samples/s/device  "
          f"MFU {r['mfu_datasheet']:5.1%} of datasheet, {r['mfu_matmul']:5.1%} of measured matmul  "
          f"XLA peak {r['xla_peak_bytes'] / gib:6.2f} GiB (temp {r['xla_memory']['temp'] / gib:6.2f})  "
          f"device peak {r['device_peak_bytes'] / gib:6.2f} GiB  loss {r['loss']:.4f}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/mae_vit_s.py", help="FILE.py[:ARG]")
  parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  parser.add_argument("--per-device-batch", type=int, default=32)
  parser.add_argument("--mesh", default="data=-1", help="mesh shape over the local devices")
  parser.add_argument("--attention", default="xla,cudnn", help="implementations to compare (comma-separated)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--flops-per-step", type=float, default=0.0,
                      help="FLOPs per device and step, if already counted (skips tracing the unrolled step)")
  parser.add_argument("--child-timeout", type=float, default=1800, help="seconds per implementation")
  parser.add_argument("--json", default="", help="append one JSON line per result to this file")
  parser.add_argument("--profile-dir", default="",
                      help="also trace --profile-steps steps into DIR/ATTENTION (see benchmarks/profile_step.py)")
  parser.add_argument("--profile-steps", type=int, default=1)
  parser.add_argument("--attention-check", action="store_true", help="the attention kernels alone")
  # MAE decoder at 128 px / patch 4; ViT-L/4 and ViT-g/4 encoders on MAE's 103 visible tokens;
  # DINO/MoCo ViT-L/4 on all 1025 tokens.
  parser.add_argument("--shapes", default="32x1025x512x16,32x103x1024x16,32x103x1536x24,32x1025x1024x16",
                      help="--attention-check shapes, BxLxWIDTHxHEADS, comma-separated")
  parser.add_argument("--child", default="", help="internal: run one implementation in this process")
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.child:
    print(RESULT + json.dumps(run_variant(args, args.child)), flush=True)
    return
  if args.attention_check:
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    rows = attention_check(shapes, args.steps)
  else:
    rows = []
    print(f"{args.config} {' '.join(args.set)}: {args.per_device_batch} per device, mesh {args.mesh}", flush=True)
    for attention in args.attention.split(","):
      rows.append(_run_child(argv, attention, args.child_timeout))
      print(format_row(rows[-1]), flush=True)
  if args.json:
    with open(args.json, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
