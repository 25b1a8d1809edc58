"""MoCo-v2 objective: InfoNCE logits/labels, queue update and wrap-around, EMA, no key gradient (NumPy refs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fmjax.models.ssl_heads import MoCoProjector
from fmjax.objectives import moco as moco_lib
from tests.test_dino import TinyBackbone, rel_close


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_moco_forward(q, k, queue_dk, ptr, temperature):
  """facebookresearch/moco MoCo.forward after the encoders, float64. queue_dk is [dim, K] as there."""
  l_pos = np.einsum("nc,nc->n", q, k)[:, None]
  l_neg = np.einsum("nc,ck->nk", q, queue_dk)
  logits = np.concatenate([l_pos, l_neg], axis=1) / temperature
  labels = np.zeros(logits.shape[0], np.int64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  loss = -np.mean(log_p[np.arange(len(labels)), labels])
  # _dequeue_and_enqueue
  batch = k.shape[0]
  assert queue_dk.shape[1] % batch == 0
  queue_dk = queue_dk.copy()
  queue_dk[:, ptr:ptr + batch] = k.T
  return loss, logits, queue_dk, (ptr + batch) % queue_dk.shape[1]


def small_moco(**kw):
  args = dict(queue_size=12, dim=8, hidden_dim=24, temperature=0.2)
  args.update(kw)
  return moco_lib.MoCo(TinyBackbone(), **args)


def make_batch(batch=4, size=8, channels=3, seed=0):
  r = np.random.RandomState(seed)
  return {"image": jnp.asarray(r.randn(batch, 2, size, size, channels), jnp.float32)}


def init_unboxed(objective, batch, seed=0):
  variables, state = objective.init(jax.random.key(seed), batch)
  return nn.unbox(variables), nn.unbox(state)


def test_infonce_logits_labels_and_loss_match_official():
  r = np.random.RandomState(0)
  q, k = np_normalize(r.randn(6, 8)), np_normalize(r.randn(6, 8))
  queue = np_normalize(r.randn(18, 8))
  loss, logits = moco_lib.infonce_with_queue(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                             jnp.asarray(queue, jnp.float32), 0.07)
  ref_loss, ref_logits, _, _ = np_moco_forward(q, k, queue.T, 0, 0.07)
  rel_close(loss, ref_loss)
  # Logits near zero: absolute tolerance at float32 resolution of |logit| <= 1/T.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_objective_steps_queue_with_wrap_around():
  """Four steps with K=12, B=4: the pointer goes 0 -> 4 -> 8 -> 0 -> 4, rows overwritten in place."""
  objective = small_moco(queue_size=12, temperature=0.2)
  variables, state = init_unboxed(objective, make_batch())
  ref_queue = np.asarray(state["queue"], np.float64).T.copy()
  np.testing.assert_allclose(np.linalg.norm(ref_queue, axis=0), 1.0, rtol=1e-6)   # unit keys at init
  ref_ptr = 0
  loss_fn = jax.jit(objective.loss)
  for step in range(4):
    data = make_batch(seed=step)
    out = loss_fn(variables, state, data, jax.random.key(0), jnp.int32(step))
    x = np.asarray(data["image"])
    q_out, _ = objective.network.apply(variables, x[:, 0], train=True, mutable=["batch_stats"])
    k_out, _ = objective.network.apply(state["key_encoder"], x[:, 1], train=True, mutable=["batch_stats"])
    q = np_normalize(np.asarray(q_out["projection"], np.float64))
    k = np_normalize(np.asarray(k_out["projection"], np.float64))
    written = slice(ref_ptr, ref_ptr + 4)
    ref_loss, _, ref_queue, ref_ptr = np_moco_forward(q, k, ref_queue, ref_ptr, 0.2)
    rel_close(out.loss, ref_loss)
    new_queue = np.asarray(out.objective_state["queue"])
    # Keys are unit vectors recomputed here outside jit (BN over 4 samples): 1e-5 absolute is fp32 level.
    np.testing.assert_allclose(new_queue.T, ref_queue, rtol=1e-5, atol=1e-5)
    untouched = np.ones(12, bool)
    untouched[written] = False
    np.testing.assert_array_equal(new_queue[untouched], np.asarray(state["queue"])[untouched])
    assert int(out.objective_state["queue_ptr"]) == ref_ptr
    state = out.objective_state
  assert ref_ptr == 4


def test_queue_size_must_divide_by_global_batch():
  with pytest.raises(ValueError, match="queue_size=10 must be a positive multiple of the global batch size 4"):
    small_moco(queue_size=10).init(jax.random.key(0), make_batch(batch=4))


def test_key_encoder_gets_no_gradient_and_ema_is_the_formula():
  objective = small_moco(momentum=0.99)
  data = make_batch()
  variables, state = init_unboxed(objective, data)

  def loss_of(q_params, k_params):
    st = {**state, "key_encoder": {**state["key_encoder"], "params": k_params}}
    return objective.loss({**variables, "params": q_params}, st, data, jax.random.key(0), 0).loss

  g_q, g_k = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(variables["params"], state["key_encoder"]["params"])
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_k))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_q))

  moved = jax.tree.map(lambda p: p - 0.5, variables["params"])
  new_state = objective.after_update({**variables, "params": moved}, state, jnp.int32(3))
  for k_old, q, k_new in zip(jax.tree_util.tree_leaves(state["key_encoder"]["params"]),
                             jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(new_state["key_encoder"]["params"])):
    rel_close(k_new, 0.99 * np.asarray(k_old, np.float64) + 0.01 * np.asarray(q, np.float64), rtol=1e-6)


def test_projector_is_linear_bn_relu_linear_bn():
  proj = MoCoProjector(hidden_dim=6, out_dim=3)
  x = np.random.RandomState(0).randn(5, 4).astype(np.float32)
  variables = nn.unbox(proj.init(jax.random.key(0), x, train=False))
  out, _ = proj.apply(variables, x, train=True, mutable=["batch_stats"])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  assert set(p["fc1"]) == {"kernel"} and set(p["fc2"]) == {"kernel"}   # no biases

  def bn(h, prm):  # training-mode BN: batch mean, biased variance, eps 1e-5
    return (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * prm["scale"] + prm["bias"]
  h = np.maximum(bn(x @ p["fc1"]["kernel"], p["bn1"]), 0)
  rel_close(out, bn(h @ p["fc2"]["kernel"], p["bn2"]), rtol=1e-4)


def _load_config(name, arg=None):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["dino_vit_s", "dino_rn50", "moco_vit_b", "moco_rn50"])
def test_configs_build_the_recipes(name):
  from fmjax.objectives import build_objective
  config = _load_config(name)
  config.total_steps = 1000
  config.objective.steps_per_epoch = 10
  objective = build_objective(config)
  assert objective.name == config.objective.name
  if objective.name == "moco":
    assert (objective.queue_size, objective.temperature, objective.momentum) == (32768, 0.1, 0.999)
    assert config.optimizer.name == "sgd" and config.schedule.name == "step"
  else:
    assert (objective.out_dim, objective.student_temp, objective.teacher_temp) == (128, 0.1, 0.04)
    assert objective.freeze_last_layer_steps == 10 and objective.views.local_views == 0


def test_config_errors_name_the_keys():
  from fmjax.objectives import build_objective
  config = _load_config("moco_vit_s")
  config.batch_size = 300
  with pytest.raises(ValueError, match="queue_size=32768 must be a positive multiple of the global batch size 300"):
    build_objective(config)
  config = _load_config("dino_vit_s")   # epochs=100 but no data directory to count an epoch
  with pytest.raises(ValueError, match="config.total_steps > 0, or config.epochs"):
    build_objective(config)
