"""Where a train step's time goes: a jax.profiler trace of the train loop's own jitted step, with the
time of every executed HLO op summed by the model scope it came from, forward and backward apart.

  python -m benchmarks.profile_step --objective mae --model spec_vit_s --image-size 128 --batch 4
  python -m benchmarks.profile_step --objective dino --image-size 32 --batch 8 --depth 1 --top 10

Builds the same step as `benchmarks/train_step.py` (same flags), runs --warmup untimed steps, then
traces --steps steps. Each op's scope is its HLO `op_name` (the flax module path) without method
calls and with layer indices folded (`blocks_3` -> `blocks_*`), cut to --depth modules; ops under
`transpose(...)` are the backward pass. Op times are wall times on their executor thread: XLA CPU
runs independent ops concurrently, so the per-scope sums can add up to more than the step's wall time.
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


def _module_path(op_name: str, depth: int) -> tuple[str, str]:
  parts = op_name.split("/")[1:-1]   # drop the outer jit and the primitive itself
  direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  modules = []
  for part in parts:
    if _DIRECTION_WRAPPER.match(part) or "." in part or "," in part or "->" in part or " " in part:
      continue   # autodiff wrappers, method calls (encoder.encode), einsum specs
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


def trace_op_times(trace_dir: str) -> list[tuple[str, float]]:
  """(event name, seconds) of every complete event in the Perfetto trace jax.profiler wrote."""
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [(e["name"], e.get("dur", 0) / 1e6) for e in events if e.get("ph") == "X"]


def summarise(op_times, instructions, steps: int, depth: int):
  """Per-step seconds by (scope, direction), and the per-step seconds of each instruction."""
  by_scope = collections.Counter()
  by_op = collections.Counter()
  for name, seconds in op_times:
    if name not in instructions:
      continue   # runtime events (ThunkExecutor::Execute, Python frames), not HLO ops
    by_scope[scope_of(instructions[name][1], depth)] += seconds / steps
    by_op[name] += seconds / steps
  return by_scope, by_op


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
  by_scope, by_op = summarise(trace_op_times(trace_dir), instructions, args.steps, args.depth)
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
  args = train_step.parse_step_arguments(parser, argv)
  result = profile(args)
  by_scope, by_op = result["by_scope"], result["by_op"]
  scopes = sorted({s for s, _ in by_scope}, key=lambda s: -(by_scope[s, "fwd"] + by_scope[s, "bwd"]))
  total = sum(by_scope.values())
  print(f"{args.objective} {args.model}, image {args.image_size}, batch {args.batch}: {result['wall_s']:.3f} s "
        f"wall per traced step (tracing included), {total:.3f} s of op time; trace in {result['trace_dir']}")
  print(f"{'fwd s':>8s} {'bwd s':>8s} {'share':>6s}  scope")
  for s in scopes:
    fwd, bwd = by_scope[s, "fwd"], by_scope[s, "bwd"]
    print(f"{fwd:8.3f} {bwd:8.3f} {(fwd + bwd) / total:6.1%}  {s}")
  if args.top:
    print(f"\nslowest {args.top} HLO ops (s per step, result shape, op_name):")
    for name, seconds in by_op.most_common(args.top):
      shape, op_name = result["instructions"][name]
      print(f"{seconds:8.3f}  {name}  {shape}  {op_name}")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
