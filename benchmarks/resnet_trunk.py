"""SpecResNet-50's stem-less ResNet-50 trunk alone: fmjax (`ResNetLayers`, as SpecResNet builds it)
vs the official-layout torch module (`ResNetNoStem`), forward and forward + backward, train-mode BN.

  python -m benchmarks.resnet_trunk [--batch 8 --size 32 --rounds 15]
  taskset -c 0 python -m benchmarks.resnet_trunk        # one core (torch takes the affinity's core count)

The input is the adapter's output, [B, size, size, 128]; the loss is the sum of squares of the
pooled layer-4 features, so the backward covers every conv, BN and the parameter gradients. Each
framework is timed in its own loop in one process (jax first, then torch); medians are compared.
The DINO SpecResNet-50 benchmark row runs this trunk three times per step (student and teacher
forward, student backward) on 8 images of 32 px.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_step import median_ms  # noqa: E402


def jax_times(x: np.ndarray, rounds: int) -> tuple[float, float]:
  import jax
  import jax.numpy as jnp
  from fmjax.models.resnet import ResNetLayers
  trunk = ResNetLayers((3, 4, 6, 3), True, (2, 2, 2, 2), (1, 1, 1, 1), first_block_width=256)
  inputs = jnp.asarray(x.transpose(0, 2, 3, 1))
  variables = trunk.init(jax.random.key(0), inputs, train=False)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss(params, state, inputs):
    feats, new_state = trunk.apply({"params": params, **state}, inputs, train=True, mutable=list(state))
    return jnp.sum(jnp.mean(feats[-1], axis=(1, 2)) ** 2), new_state
  forward = jax.jit(lambda *a: loss(*a)[0])
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return (median_ms(lambda: jax.block_until_ready(forward(params, state, inputs)), rounds),
          median_ms(lambda: jax.block_until_ready(grad(params, state, inputs)), rounds))


def torch_times(x: np.ndarray, rounds: int) -> tuple[float, float]:
  import torch
  from fmjax.export.torch_modules import ResNetNoStem
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = ResNetNoStem().train()
  inputs = torch.from_numpy(x)
  loss = lambda: model.forward_features(inputs)[-1].mean(dim=(2, 3)).pow(2).sum()

  def forward():
    with torch.no_grad():
      return loss()

  def forward_backward():
    model.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    return value
  return median_ms(forward, rounds), median_ms(forward_backward, rounds)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args(argv)
  x = np.random.default_rng(0).normal(size=(args.batch, 128, args.size, args.size)).astype(np.float32)
  fmjax_fwd, fmjax_both = jax_times(x, args.rounds)
  torch_fwd, torch_both = torch_times(x, args.rounds)
  cores = len(os.sched_getaffinity(0))
  print(f"ResNet-50 trunk (SpecResNet-50 without its adapter), [{args.batch}, {args.size}, {args.size}, 128], "
        f"train-mode BN, {cores} core(s), median of {args.rounds}")
  print(f"{'':14s} {'fmjax ms':>9s} {'torch ms':>9s} {'torch/fmjax':>12s}")
  for name, mine, theirs in (("forward", fmjax_fwd, torch_fwd), ("fwd + bwd", fmjax_both, torch_both)):
    print(f"{name:14s} {mine:9.1f} {theirs:9.1f} {theirs / mine:11.2f}x")


if __name__ == "__main__":
  from fmjax import host_memory
  host_memory.reexec_with_host_allocator()
  main()
