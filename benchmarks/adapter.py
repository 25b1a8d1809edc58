"""Spectral adapter, forward + backward: fmjax (band-axis unfold + matmul; layers 1-2 as the CPU
kernels of fmjax/kernels where they run, and also as XLA ops then) vs the same maths as a JAX 3-D
convolution vs the official torch.nn.Conv3d/BatchNorm3d stack, all on CPU.

    python -m benchmarks.adapter [--batch 4] [--bands 202] [--size 128] [--rounds 2] [--threads N]
        [--conv3d-size 32]

One run, same machine, same thread count (torch.set_num_threads = XLA's CPU threads), train-mode
BatchNorm (batch statistics), loss = mean of squares of the [B, H, W, 128] output; backward gives
gradients for every parameter (not for the input: training never needs them). Each variant is
compiled / warmed up once, then the variants are timed in interleaved rounds; the median round is
reported with the ratios. All variants compute the same function (checked on the warm-up outputs
before timing).

XLA CPU's Conv3d is so slow (one 128x128 step takes minutes here) that by default the JAX conv3d
variant runs on a --conv3d-size crop and its time is scaled by the pixel ratio (the kernels are
1x1 spatially, so the work is linear in pixels); the table marks it "extrapolated". Pass
--conv3d-size equal to --size to measure it directly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--bands", type=int, default=202)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--conv3d-size", type=int, default=32,
                      help="spatial size for the JAX conv3d variant (time scaled to --size)")
  args = parser.parse_args(argv)

  # One XLA CPU device using `threads` threads; torch gets the same count.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
      f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import linen as nn

  from fmjax.kernels import cpu as cpu_kernels
  from fmjax.models.spectral_adapter import ADAPTER_LAYERS, SpectralAdapter

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(args.batch, args.size, args.size, args.bands)).astype(np.float32)
  x = jnp.asarray(x_np)

  model = SpectralAdapter()
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  params, stats = nn.unbox(variables["params"]), variables["batch_stats"]

  # 1) fmjax: layer 1 folded into layer 2's windows, unfold + matmul for layer 3; layers 1-2 as the
  # CPU kernels where they run (one AVX-512 device), and 1b) the same with layers 1-2 as XLA ops.
  def fast_loss(p, x):
    out, _ = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return jnp.mean(out ** 2), out
  fast = jax.jit(jax.value_and_grad(fast_loss, has_aux=True))
  with_kernels = cpu_kernels.kernels_available()
  with cpu_kernels.kernels_enabled(False):   # a separate trace: the decision is taken while tracing
    xla_ops = jax.jit(jax.value_and_grad(lambda p, x: fast_loss(p, x), has_aux=True)).lower(params, x).compile()

  # 2) the same maths written as a 3-D convolution (what a direct port of Conv3d gives)
  def conv3d_loss(p, x):
    h = jnp.transpose(x, (0, 3, 1, 2))[:, None]                      # [B, 1, C, H, W]
    for i, (kernel, stride, padding, _) in enumerate(ADAPTER_LAYERS):
      w = jnp.transpose(p[f"conv_{3 * i}"]["kernel"], (2, 1, 0))[..., None, None]   # [O, I, k, 1, 1]
      h = jax.lax.conv_general_dilated(h, w, (stride, 1, 1), [(padding, padding), (0, 0), (0, 0)],
                                       dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
      h = h + p[f"conv_{3 * i}"]["bias"][None, :, None, None, None]
      mean = h.mean(axis=(0, 2, 3, 4), keepdims=True)
      var = jnp.square(h - mean).mean(axis=(0, 2, 3, 4), keepdims=True)
      bn = p[f"bn_{3 * i + 1}"]
      h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * bn["scale"][None, :, None, None, None] \
          + bn["bias"][None, :, None, None, None]
      h = jax.nn.relu(h)
    out = jnp.transpose(h.mean(axis=2), (0, 2, 3, 1))
    return jnp.mean(out ** 2), out
  conv3d = jax.jit(jax.value_and_grad(conv3d_loss, has_aux=True))

  # 3) torch: the official module layout
  mods, c_in = [], 1
  for kernel, stride, padding, c_out in ADAPTER_LAYERS:
    mods += [torch.nn.Conv3d(c_in, c_out, (kernel, 1, 1), (stride, 1, 1), (padding, 0, 0)),
             torch.nn.BatchNorm3d(c_out), torch.nn.ReLU()]
    c_in = c_out
  seq = torch.nn.Sequential(*mods).train()
  with torch.no_grad():
    for i in range(3):
      k = np.asarray(params[f"conv_{3 * i}"]["kernel"])
      seq[3 * i].weight.copy_(torch.from_numpy(k.transpose(2, 1, 0)[..., None, None].copy()))
      seq[3 * i].bias.copy_(torch.from_numpy(np.array(params[f"conv_{3 * i}"]["bias"])))
  x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())

  def torch_step():
    seq.zero_grad(set_to_none=True)
    out = seq(x_t[:, None]).mean(dim=2)
    loss = (out ** 2).mean()
    loss.backward()
    return out.detach().permute(0, 2, 3, 1).numpy()

  conv3d_size = min(args.conv3d_size, args.size)
  x_crop = x[:, :conv3d_size, :conv3d_size]
  conv3d_scale = (args.size / conv3d_size) ** 2

  def jax_step(fn, inp):
    def run():
      (loss, out), grads = fn(params, inp)
      jax.block_until_ready(grads)
      return out
    return run

  fmjax_name = "fmjax (CPU kernels)" if with_kernels else "fmjax (XLA ops)"
  variants = {fmjax_name: jax_step(fast, x), "jax conv3d": jax_step(conv3d, x_crop), "torch Conv3d": torch_step}
  if with_kernels:
    variants["fmjax (XLA ops)"] = jax_step(xla_ops, x)
  scale = {"jax conv3d": conv3d_scale}
  print(f"spectral adapter fwd+bwd, batch {args.batch} x {args.size}x{args.size} x {args.bands} bands, "
        f"train-mode BN, {args.threads} threads, median of {args.rounds} interleaved rounds")
  outputs = {}
  for name, fn in variants.items():
    t0 = time.perf_counter()
    outputs[name] = np.asarray(fn())
    print(f"  warm-up {name:<22} {time.perf_counter() - t0:7.2f} s (incl. compilation)", flush=True)
  ref = outputs["torch Conv3d"]
  for name in [n for n in variants if n.startswith("fmjax")]:
    print(f"  max |{name} - torch| = {float(np.abs(outputs[name] - ref).max()):.2e}", flush=True)
  # The conv3d variant may run on a crop (its own batch statistics): compare with fmjax on that crop.
  crop_ref = ref if conv3d_scale == 1.0 else np.asarray(jax_step(fast, x_crop)())
  err = float(np.abs(outputs["jax conv3d"] - crop_ref).max())
  print(f"  max |jax conv3d - {'torch' if conv3d_scale == 1.0 else 'fmjax on the same crop'}| = {err:.2e}",
        flush=True)

  # Wall time, and CPU time of this process (all its threads): on a shared, overloaded machine the
  # CPU seconds are the steadier measure of work done.
  times = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      t0, c0 = time.perf_counter(), time.process_time()
      fn()
      times[name].append((time.perf_counter() - t0) * scale.get(name, 1.0))
      cpu[name].append((time.process_time() - c0) * scale.get(name, 1.0))
  med = {name: statistics.median(t) for name, t in times.items()}
  med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
  torch_t, torch_c = med["torch Conv3d"], med_cpu["torch Conv3d"]
  print(f"{'variant':<22}{'wall s':>9}{'torch/this':>11}{'cpu s':>9}{'torch/this':>11}   wall rounds (s)", flush=True)
  for name, t in med.items():
    rounds = ", ".join(f"{v:.2f}" for v in times[name])
    note = f"  (extrapolated from {conv3d_size}x{conv3d_size})" if scale.get(name, 1.0) != 1.0 else ""
    print(f"{name:<22}{t:>9.2f}{torch_t / t:>10.2f}x{med_cpu[name]:>9.2f}{torch_c / med_cpu[name]:>10.2f}x   "
          f"{rounds}{note}", flush=True)
  print(f"fmjax vs jax conv3d: {med['jax conv3d'] / med[fmjax_name]:.2f}x faster (wall)", flush=True)
  if with_kernels:
    print(f"fmjax with the CPU kernels vs XLA ops: {med['fmjax (XLA ops)'] / med[fmjax_name]:.2f}x faster (wall)",
          flush=True)


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
