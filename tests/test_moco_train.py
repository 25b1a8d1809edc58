"""MoCo-v2 through the engine's generic step: 1 vs 8 devices, queue/key encoder resume, training (slow)."""
import jax
import numpy as np
import optax
import pytest

from fmjax import parallel
from fmjax.objectives import moco as moco_lib
from tests.test_dino import TinyBackbone
from tests.test_dino_train import (check_resume_bit_exact, check_same_on_1_and_8_devices, location_batches,
                                   make_runner)


def small_moco():
  # K = 3 global batches of 8: the pointer wraps around within the tests' steps.
  return moco_lib.MoCo(TinyBackbone(), queue_size=24, dim=8, hidden_dim=24, temperature=0.2, momentum=0.9)


def moco_tx(objective):
  return optax.sgd(0.05, momentum=0.9)


def test_moco_same_losses_on_1_and_8_devices():
  """BatchNorm statistics are global under jit: the 8-device run sees the same batch statistics."""
  check_same_on_1_and_8_devices(small_moco, moco_tx)


def test_moco_queue_and_key_encoder_survive_checkpoint(tmp_path):
  check_resume_bit_exact(small_moco, moco_tx, tmp_path, ("queue", "queue_ptr", "key_encoder"))


@pytest.mark.slow
def test_moco_trains_without_collapse():
  """300 steps on 32 'locations': InfoNCE falls and the embedding does not collapse.

  Threshold: per-dim std of the L2-normalised embedding above a fifth of 1/sqrt(D) (spread directions give
  ~1/sqrt(D); collapse to one point gives ~0). Positive-key accuracy must beat chance (1/(K+1)) clearly.
  """
  steps = 300
  obj = moco_lib.MoCo(TinyBackbone(), queue_size=64, dim=16, hidden_dim=32, temperature=0.2, momentum=0.99)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 30, steps), weight_decay=1e-4)
  mesh = parallel.make_mesh({"data": -1})
  first = next(location_batches(1, batch=16))
  state, step_fn, put, _ = make_runner(obj, tx, mesh, first)
  losses, std, acc = [], [], []
  for b in location_batches(steps, batch=16):
    state, m = step_fn(state, put(b))
    losses.append(float(m["loss"]))
    std.append(float(m["embedding_std"]))
    acc.append(float(m["accuracy"]))
  print("moco first/last 30 mean loss", np.mean(losses[:30]), np.mean(losses[-30:]),
        "accuracy", np.mean(acc[-30:]), "embedding std", np.min(std[-30:]))
  assert np.mean(losses[-30:]) < 0.8 * np.mean(losses[:30]), (losses[:30], losses[-30:])
  assert np.min(std[-30:]) > 0.2 / np.sqrt(16), std[-30:]
  assert np.mean(acc[-30:]) > 10 / 65, acc[-30:]
