"""Export cost side by side: full-state restore + torch.save vs backbone-only, grouped partial
restore + streamed safetensors, on one MAE checkpoint (random weights), each in a fresh process.

  python benchmarks/export.py [--model spec_vit_s] [--image-size 64] [--read-budget-mb 64]   (CPU, ~2 min)

Prints wall time and peak host memory (ru_maxrss) of each path and their ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WRITE = r"""
import sys, numpy as np, optax, jax
sys.path.insert(0, {root!r})
from configs import common
from fmjax import checkpoint, train_state, parallel
from fmjax.objectives import build_objective
c = common.mae_config({size!r})
c.model.dtype = "float32"; c.data.crop_size = {image}; c.model.patch_size = {patch}
c.objective.decoder_width = 128; c.objective.decoder_heads = 4
obj = build_objective(c)
batch = {{"image": jax.ShapeDtypeStruct((1, 1, {image}, {image}, 202), np.float32)}}
init = train_state.make_init_fn(obj, optax.adamw(1e-3), batch, seed=0)
_, sh = train_state.abstract_state_and_shardings(init, parallel.make_mesh({{"data": 1}}, jax.devices()[:1]))
state = train_state.create_state(init, sh)
ck = checkpoint.Checkpointer({workdir!r}, keep=1, async_save=False); ck.save(1, state, config=c, force=True); ck.wait(); ck.close()
"""

_FULL = r"""
import resource, time, json
t = time.perf_counter()
from fmjax import checkpoint
from fmjax.export import exporter
config, variables = checkpoint.load_backbone({workdir!r})
exporter.export_variables(variables, {out!r}, config=config, step=1, show_progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

_PARTIAL = r"""
import resource, time, json
t = time.perf_counter()
from fmjax.export import exporter
exporter.export_checkpoint({workdir!r}, {out!r}, show_progress=False, read_budget_mb={budget})
print(json.dumps(dict(seconds=time.perf_counter() - t, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def _run(code: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="spec_vit_s", help="spec_vit_{t,s,b,l,h,g}")
  parser.add_argument("--patch-size", type=int, default=4)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--read-budget-mb", type=int, default=64, help="bytes read per Orbax call (streamed path)")
  args = parser.parse_args()
  size = args.model.rsplit("_", 1)[-1]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    t = time.perf_counter()
    _run("import json\n" + _WRITE.format(root=ROOT, size=size, image=args.image_size, patch=args.patch_size,
                                         workdir=workdir) + "\nprint(json.dumps({}))")
    print(f"wrote MAE checkpoint of {args.model}/{args.patch_size} at {args.image_size} px "
          f"in {time.perf_counter() - t:.1f} s")
    full = _run(_FULL.format(workdir=workdir, out=os.path.join(tmp, "full.pt")))
    partial = _run(_PARTIAL.format(workdir=workdir, out=os.path.join(tmp, "partial.safetensors"),
                                   budget=args.read_budget_mb))
    mb = os.path.getsize(os.path.join(tmp, "partial.safetensors")) / 2**20
  print(f"{'path':<48}{'seconds':>10}{'peak MB':>10}")
  print(f"{'load_backbone (full state) + torch .pt':<48}{full['seconds']:>10.1f}{full['peak_mb']:>10.0f}")
  print(f"{f'streamed ({args.read_budget_mb} MB reads) safetensors':<48}{partial['seconds']:>10.1f}{partial['peak_mb']:>10.0f}")
  print(f"ratio full/partial: time {full['seconds'] / partial['seconds']:.2f}x, "
        f"peak memory {full['peak_mb'] / partial['peak_mb']:.2f}x  (state_dict file {mb:.0f} MB)")


if __name__ == "__main__":
  main()
