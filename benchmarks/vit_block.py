"""One ViT block and its two halves, fmjax (`transformer.Attention`, `transformer.Mlp`,
`transformer.Block`) vs the official-layout torch modules (`fmjax.export.torch_modules`: timm's
layout, SDPA attention), forward and forward + backward (parameter and input gradients), same
weights on both sides.

  python -m benchmarks.vit_block [--batch 8 --tokens 65 --width 384 --heads 6 --rounds 30]

The defaults are one encoder block of the DINO / MoCo SpecViT-S/4 rows of `benchmarks/train_step`
(8 images of 32 px: 64 patches + cls). Those steps are mostly such blocks, so this tells whether a
row's ratio is decided in the blocks or elsewhere (adapter, optimiser). The loss is the sum of
squares of the output. Jax runs first, then torch, each timed in its own loop in one process; the
medians are compared.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("attention", "mlp", "block")


def copy_weights(torch_module, params) -> None:
  """fmjax parameters into the torch module of the same layout: torch's dotted module names are the
  Flax module paths (attn.qkv -> params['attn']['qkv']), Linear kernels transposed as the exporter does."""
  import torch
  from fmjax.export.mapping import to_torch_layout
  with torch.no_grad():
    for name, module in torch_module.named_modules():
      if not isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
        continue
      leaves = params
      for part in filter(None, name.split(".")):
        leaves = leaves[part]
      if isinstance(module, torch.nn.Linear):
        weight = to_torch_layout("linear", np.asarray(leaves["kernel"]), tuple(module.weight.shape))
      else:
        weight = np.array(leaves["scale"])
      module.weight.copy_(torch.from_numpy(weight))
      module.bias.copy_(torch.from_numpy(np.array(leaves["bias"])))


def build(part: str, width: int, heads: int):
  """(fmjax module, torch module) for one of PARTS."""
  from fmjax.export import torch_modules
  from fmjax.models import transformer
  mlp_dim = 4 * width
  if part == "attention":
    return transformer.Attention(heads), torch_modules.Attention(width, heads)
  if part == "mlp":
    return transformer.Mlp(mlp_dim), torch_modules.Mlp(width, mlp_dim)
  if part == "block":
    return transformer.Block(heads, mlp_dim), torch_modules.Block(width, heads, mlp_dim)
  raise ValueError(f"part {part!r} is not one of {PARTS}")


def measure(part: str, x: np.ndarray, heads: int, rounds: int) -> dict:
  """Median ms of forward and forward + backward on each side, and max |fmjax - torch| of the output."""
  import jax
  import jax.numpy as jnp
  import torch
  from flax import linen as nn
  from benchmarks.train_step import median_ms
  fmjax_module, torch_module = build(part, x.shape[-1], heads)
  inputs = jnp.asarray(x)
  params = nn.unbox(fmjax_module.init(jax.random.key(0), inputs))["params"]
  copy_weights(torch_module, params)

  apply = lambda p, x: fmjax_module.apply({"params": p}, x)
  forward = jax.jit(apply)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))
  ours = np.asarray(forward(params, inputs))
  fmjax_fwd = median_ms(lambda: jax.block_until_ready(forward(params, inputs)), rounds)
  fmjax_both = median_ms(lambda: jax.block_until_ready(grads(params, inputs)), rounds)

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch_inputs = torch.from_numpy(x).requires_grad_(True)

  def torch_forward():
    with torch.no_grad():
      return torch_module(torch_inputs)

  def torch_forward_backward():
    torch_module.zero_grad(set_to_none=True)
    torch_inputs.grad = None
    torch_module(torch_inputs).pow(2).sum().backward()

  theirs = torch_forward().numpy()
  return {"fmjax_fwd": fmjax_fwd, "fmjax_both": fmjax_both,
          "torch_fwd": median_ms(torch_forward, rounds), "torch_both": median_ms(torch_forward_backward, rounds),
          "max_abs_diff": float(np.max(np.abs(ours - theirs)))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=65)
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  args = parser.parse_args(argv)
  x = np.random.default_rng(0).normal(size=(args.batch, args.tokens, args.width)).astype(np.float32)
  cores = len(os.sched_getaffinity(0))
  print(f"ViT block parts on [{args.batch}, {args.tokens}, {args.width}], {args.heads} heads, MLP "
        f"{4 * args.width}, fp32, {cores} core(s), median of {args.rounds}")
  print(f"{'':22s} {'fmjax ms':>9s} {'torch ms':>9s} {'torch/fmjax':>12s}   max |fmjax - torch|")
  results = {}
  for part in args.parts.split(","):
    r = results[part] = measure(part, x, args.heads, args.rounds)
    for name, mine, theirs in (("forward", r["fmjax_fwd"], r["torch_fwd"]),
                               ("fwd + bwd", r["fmjax_both"], r["torch_both"])):
      print(f"{part + ' ' + name:22s} {mine:9.2f} {theirs:9.2f} {theirs / mine:11.2f}x   "
            f"{r['max_abs_diff']:.1e}")
  return results


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
