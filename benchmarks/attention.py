"""Self-attention fwd+bwd: fmjax's head-major `softmax_attention`, the token-major einsum form it
replaced, fmjax's CPU attention kernel (fmjax/kernels/attention.cc: sequences of up to 256 tokens,
an AVX-512 CPU) and torch's fused scaled_dot_product_attention, on the same inputs in one run.

  python -m benchmarks.attention [--batch 4 --length 1025 --heads 16 --head-dim 32 --rounds 6]
  python -m benchmarks.attention --batch 8 --length 65 --heads 6 --head-dim 64 --rounds 50   # ViT-S/4, 32 px

The default shape is the MAE SpecViT decoder's at 128 px / patch 4 (1024 patches + cls, 512 wide,
16 heads). The JAX variants are timed in interleaved rounds (one call of each per round); torch
runs afterwards in the same process. Prints medians and the ratio to the token-major form.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def token_major(qkv, head_dim):
  """The previous formulation: einsums over [B, L, heads, d], softmax over the [L, L] weights."""
  import jax
  import jax.numpy as jnp
  q, k, v = qkv[:, :, 0] * head_dim ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def head_major(qkv, head_dim):
  """What `transformer.Attention` does now."""
  import jax.numpy as jnp
  from fmjax.models.transformer import softmax_attention
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  return softmax_attention(q * head_dim ** -0.5, k, v, jnp.float32).transpose(0, 2, 1, 3)


def _median_times(fns: dict, rounds: int) -> dict:
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=1025)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp
  shape = (args.batch, args.length, 3, args.heads, args.head_dim)
  qkv_np = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  cotangent = np.random.default_rng(1).normal(size=shape[:2] + shape[3:]).astype(np.float32)
  qkv, cot = jnp.asarray(qkv_np), jnp.asarray(cotangent)
  from fmjax.kernels import cpu as cpu_kernels
  from fmjax.models import transformer
  forms = [("fmjax head-major", head_major), ("token-major einsum", token_major)]
  with cpu_kernels.kernels_enabled(True):
    if transformer.use_attention_kernel(args.length, args.length, args.head_dim, jnp.float32):
      no_bias = jnp.zeros((3, args.heads, args.head_dim), jnp.float32)
      forms.append(("fmjax CPU kernel", lambda x, d: transformer.attention_kernel(x, no_bias, d ** -0.5)))
  jax_fns, grads = {}, {}
  for name, attend in forms:
    grad_fn = jax.jit(jax.grad(lambda x, attend=attend: jnp.sum(attend(x, args.head_dim) * cot)))
    grads[name] = np.asarray(grad_fn(qkv))     # compiles; also the warm-up call
    jax_fns[name] = lambda grad_fn=grad_fn: jax.block_until_ready(grad_fn(qkv))
  diff = max(np.abs(grads[name] - grads["token-major einsum"]).max() for name in grads)
  times = _median_times(jax_fns, args.rounds)
  if not args.skip_torch:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.tensor(qkv_np, requires_grad=True)
    t_cot = torch.tensor(cotangent)

    def torch_step():
      q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
      out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
      (out * t_cot).sum().backward()
      x.grad = None
    torch_step()
    times.update(_median_times({"torch SDPA (fused)": torch_step}, args.rounds))
  print(f"attention fwd+bwd, [B={args.batch}, L={args.length}, heads={args.heads}, d={args.head_dim}], "
        f"fp32, median of {args.rounds} rounds; max |grad difference| of the JAX forms {diff:.2e}")
  base = times["token-major einsum"]
  for name, seconds in times.items():
    print(f"  {name:22s} {seconds * 1e3:8.1f} ms   {base / seconds:5.2f}x the token-major form")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
