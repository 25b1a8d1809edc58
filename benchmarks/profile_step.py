"""Where a train step's time goes: a jax.profiler trace of the train loop's own jitted step, with the
time of every executed HLO op summed by the model scope it came from, forward and backward apart.

  python -m benchmarks.profile_step --objective mae --model spec_vit_s --image-size 128 --batch 4
  python -m benchmarks.profile_step --objective dino --image-size 32 --batch 8 --depth 1 --top 10

  python -m benchmarks.profile_step --from-trace OUT/profile_vit_g/xla     # a trace saved elsewhere

Builds the same step as `benchmarks/train_step.py` (same flags), runs --warmup untimed steps, then
traces --steps steps. `--from-trace DIR` instead sums a trace that `benchmarks/accelerator_step.py
--profile-dir` saved (perfetto_trace.json.gz, step.hlo.txt.gz, profile.json), e.g. on a GPU: there
the device's kernels are the events, named after their HLO fusion ('.' and '-' become '_'); kernels
that XLA did not generate (cuBLAS/cuDNN, memcpy) have no HLO name and are listed as such.

Each op's scope is its HLO `op_name` (the flax module path) without method calls, scan and
accumulation loops, and with layer indices folded (`blocks_3` -> `blocks_*`), cut to --depth
modules; ops under `transpose(...)` are the backward pass. Op times are wall times on their executor
thread: XLA CPU runs independent ops concurrently, so the per-scope sums can add up to more than the
step's wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) (.*)$", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DIRECTION_WRAPPER = re.compile(r"^(transpose|jvp|vmap|checkpoint|remat|jit)\(")
_LAYER_INDEX = re.compile(r"_\d+$")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (result shape, op_name or '')} from a compiled module's text."""
  instructions = {}
  for m in _INSTRUCTION.finditer(hlo_text):
    op_name = _OP_NAME.search(m.group(3))
    instructions[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
  return instructions


_CONTROL_FLOW = {"eval_jaxpr", "checkpoint", "remat", "closed_call"}


def _module_path(op_name: str, depth: int) -> tuple[str, str]:
  parts = op_name.split("/")[1:-1]   # drop the outer jit and the primitive itself
  direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  modules = []
  for i, part in enumerate(parts):
    loop = part == "while" or (part in ("body", "cond") and i and parts[i - 1] == "while")
    if (loop or part in _CONTROL_FLOW or _DIRECTION_WRAPPER.match(part) or "." in part or "," in part
        or "->" in part or " " in part):
      continue   # scan/grad-accumulation loops, autodiff wrappers, method calls (encoder.encode), einsum specs
    modules.append(_LAYER_INDEX.sub("_*", part) if part.startswith("blocks_") else part)
  return ("/".join(modules[:depth]) or "(outside the model)"), direction


def scope_of(op_name: str, depth: int) -> tuple[str, str]:
  """('module/path', 'fwd'|'bwd') of an op_name such as
  'jit(train_step)/transpose(jvp(MAEModel))/encoder.encode/encoder.adapt/spectral_adapter/bn_4/mul'.

  Ops that XLA merged (e.g. combined all-reduces) carry 'prefix/(name_a:name_b:...)'; they get their
  common scope, or '(merged over several scopes)' in the direction of most of the merged names.
  """
  merged = op_name.find("/(")
  if merged >= 0 and op_name.endswith(")") and ":" in op_name[merged:]:
    prefix = op_name[:merged]
    scopes = [_module_path(f"{prefix}/{name}", depth) for name in op_name[merged + 2:-1].split(":")]
    if len(set(scopes)) == 1:
      return scopes[0]
    backward = sum(d == "bwd" for _, d in scopes)
    return "(merged over several scopes)", "bwd" if 2 * backward >= len(scopes) else "fwd"
  return _module_path(op_name, depth)


def trace_op_times(trace_dir: str) -> tuple[list[tuple[str, float]], bool]:
  """(event name, seconds) of every complete event in the Perfetto trace jax.profiler wrote, and
  whether they are an accelerator's: where the trace has accelerator processes ('/device:GPU:0'),
  only their events (the kernels as they ran) are kept."""
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and e["args"]["name"].startswith("/device:")}
  return [(e["name"], e.get("dur", 0) / 1e6) for e in events
          if e.get("ph") == "X" and (not devices or e["pid"] in devices)], bool(devices)


def kernel_names(instructions: dict) -> dict[str, str]:
  """{GPU kernel name: HLO instruction}: XLA GPU names a fusion's kernel after the instruction with
  '.' and '-' as '_' (fusion.12 -> fusion_12)."""
  return {re.sub(r"[.\-]", "_", name): name for name in instructions}


def unattributed_kind(event_name: str) -> str:
  """What a device kernel with no HLO instruction of its name is, for the summary."""
  if re.search(r"gemm|nvjet|xmma|cutlass|cublas", event_name, re.I):
    return "(cuBLAS matmuls)"
  if re.search(r"cudnn|flash|fmha|sdpa", event_name, re.I):
    return "(cuDNN kernels)"
  if event_name.startswith("memcpy") or event_name.startswith("memset"):
    return "(copies and memsets)"
  return "(other kernels)"


def summarise(op_times, instructions, steps: int, depth: int, device_kernels: bool = False):
  """Per-step seconds by (scope, direction), and the per-step seconds of each instruction.

  Host traces (CPU) skip events that are no HLO op (ThunkExecutor::Execute, Python frames). Device
  traces (`device_kernels`) keep every kernel: those with no HLO name go under `unattributed_kind`."""
  by_scope = collections.Counter()
  by_op = collections.Counter()
  kernels = kernel_names(instructions) if device_kernels else {}
  for name, seconds in op_times:
    name = name if name in instructions else kernels.get(name, name)
    if name in instructions:
      by_scope[scope_of(instructions[name][1], depth)] += seconds / steps
      by_op[name] += seconds / steps
    elif device_kernels:
      by_scope[unattributed_kind(name), "-"] += seconds / steps
  return by_scope, by_op


def from_trace(directory: str, depth: int) -> dict:
  """The summary of a trace saved by `benchmarks/accelerator_step.py --profile-dir`."""
  with open(os.path.join(directory, "profile.json")) as f:
    steps = json.load(f)["steps"]
  with gzip.open(os.path.join(directory, "step.hlo.txt.gz"), "rt") as f:
    instructions = hlo_instructions(f.read())
  op_times, on_device = trace_op_times(directory)
  by_scope, by_op = summarise(op_times, instructions, steps, depth, device_kernels=on_device)
  return {"wall_s": float("nan"), "trace_dir": directory, "by_scope": by_scope, "by_op": by_op,
          "instructions": instructions, "steps": steps}


def profile(args) -> dict:
  import jax
  from benchmarks import train_step
  compiled, state, batch, compile_s, flops = train_step.OBJECTIVES[args.objective][0](args)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="fmjax_profile_")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics["loss"])
  wall = (time.perf_counter() - start) / args.steps
  instructions = hlo_instructions(compiled.as_text())
  op_times, on_device = trace_op_times(trace_dir)
  by_scope, by_op = summarise(op_times, instructions, args.steps, args.depth, device_kernels=on_device)
  return {"wall_s": wall, "compile_s": compile_s, "flops": flops, "trace_dir": trace_dir,
          "by_scope": by_scope, "by_op": by_op, "instructions": instructions}


def main(argv=None):
  from benchmarks import train_step
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  train_step.add_step_arguments(parser)
  parser.add_argument("--warmup", type=int, default=train_step.WARMUP_STEPS, help="untimed steps before the trace")
  parser.add_argument("--steps", type=int, default=2, help="traced steps (times are per step)")
  parser.add_argument("--depth", type=int, default=4, help="module levels of the scope to keep")
  parser.add_argument("--top", type=int, default=15, help="also list the N slowest HLO ops")
  parser.add_argument("--trace-dir", default="", help="keep the trace here (TensorBoard / Perfetto)")
  parser.add_argument("--from-trace", default="", metavar="DIR",
                      help="summarise a trace saved by benchmarks/accelerator_step.py --profile-dir instead")
  args = train_step.parse_step_arguments(parser, argv)
  if args.from_trace:
    result = from_trace(args.from_trace, args.depth)
    print(f"{args.from_trace}: {result['steps']} traced step(s)")
  else:
    result = profile(args)
    print(f"{args.objective} {args.model}, image {args.image_size}, batch {args.batch}: {result['wall_s']:.3f} s "
          f"wall per traced step (tracing included); trace in {result['trace_dir']}")
  print_summary(result, args.top)


def print_summary(result: dict, top: int):
  by_scope, by_op = result["by_scope"], result["by_op"]
  scope_total = lambda s: by_scope[s, "fwd"] + by_scope[s, "bwd"] + by_scope[s, "-"]
  scopes = sorted({s for s, _ in by_scope}, key=lambda s: -scope_total(s))
  total = sum(by_scope.values())
  print(f"{total:.4f} s of op time per step")
  print(f"{'fwd s':>8s} {'bwd s':>8s} {'share':>6s}  scope")
  for s in scopes:
    fwd, bwd = by_scope[s, "fwd"], by_scope[s, "bwd"]
    columns = f"{fwd:8.4f} {bwd:8.4f}" if by_scope[s, "-"] == 0 else f"{scope_total(s):17.4f}"
    print(f"{columns} {scope_total(s) / total:6.1%}  {s}")
  if top:
    print(f"\nslowest {top} HLO ops (s per step, result shape, op_name):")
    for name, seconds in by_op.most_common(top):
      shape, op_name = result["instructions"][name]
      print(f"{seconds:8.4f}  {name}  {shape}  {op_name}")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
