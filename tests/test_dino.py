"""DINO objective: loss, centre, schedules, EMA and optimiser extras against the official formulas (NumPy)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fmjax.models.ssl_heads import DINOHead, WeightNormDense
from fmjax.objectives import dino as dino_lib


class TinyBackbone(nn.Module):
  """A stand-in backbone with the fmjax contract: __call__(x, *, train) -> {'embedding': [B, D]}, BN state."""
  embed_dim: int = 16

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(8, (3, 3), strides=2)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return {"embedding": nn.Dense(self.embed_dim)(x)}


# ---- independent NumPy references, written from the official code ----------------------------------------

def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_dino_loss(student_output, teacher_output, center, ncrops, teacher_temp, student_temp=0.1,
                 center_momentum=0.9):
  """facebookresearch/dino DINOLoss.forward + update_center, float64, one process."""
  student_out = np.split(student_output / student_temp, ncrops)
  teacher_out = np.split(np_softmax((teacher_output - center) / teacher_temp), 2)
  total_loss, n_loss_terms = 0.0, 0
  for iq, q in enumerate(teacher_out):
    for v in range(len(student_out)):
      if v == iq:
        continue
      loss = np.sum(-q * np_log_softmax(student_out[v]), axis=-1)
      total_loss += loss.mean()
      n_loss_terms += 1
  total_loss /= n_loss_terms
  batch_center = np.sum(teacher_output, axis=0, keepdims=True) / len(teacher_output)
  new_center = center * center_momentum + batch_center * (1 - center_momentum)
  return total_loss, new_center[0]


def np_teacher_temp_schedule(warmup_temp, temp, warmup_epochs, nepochs):
  return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(nepochs - warmup_epochs) * temp))


def np_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
  iters = np.arange(epochs * niter_per_ep)
  return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def rel_close(a, b, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=1e-7)


def make_batch(batch=4, size=8, local=3, local_size=4, channels=3, seed=0):
  r = np.random.RandomState(seed)
  out = {"image": jnp.asarray(r.randn(batch, 2, size, size, channels), jnp.float32)}
  if local:
    out["local"] = jnp.asarray(r.randn(batch, local, local_size, local_size, channels), jnp.float32)
  return out


def small_dino(**kw):
  args = dict(total_steps=20, steps_per_epoch=2, out_dim=32, hidden_dim=24, bottleneck_dim=8)
  args.update(kw)
  return dino_lib.DINO(TinyBackbone(), **args)


def init_unboxed(objective, batch, seed=0):
  variables, state = objective.init(jax.random.key(seed), batch)
  return nn.unbox(variables), nn.unbox(state)


# ---- the loss ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("local_crops", [0, 4])
def test_loss_and_centre_match_official_formula(local_crops):
  r = np.random.RandomState(1)
  batch, k = 5, 32
  ncrops = 2 + local_crops
  student = r.randn(ncrops * batch, k).astype(np.float32) * 3
  teacher = r.randn(2 * batch, k).astype(np.float32) * 3
  center = r.randn(k).astype(np.float32) * 0.5
  temp = 0.055
  loss, metrics = dino_lib.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center),
                                     num_global=2, batch_size=batch, student_temp=0.1, teacher_temp=temp)
  ref_loss, _ = np_dino_loss(student.astype(np.float64), teacher.astype(np.float64), center.astype(np.float64),
                             ncrops, temp)
  rel_close(loss, ref_loss)
  # Collapse metrics from their definitions.
  q = np_softmax((teacher.astype(np.float64) - center) / temp)
  rel_close(metrics["teacher_entropy"], np.mean(-np.sum(q * np.log(q), -1)))
  log_ps = np_log_softmax(student.astype(np.float64) / 0.1)
  log_q = np.log(q)
  kls = [np.mean(np.sum(np.exp(log_ps[v * batch:(v + 1) * batch]) *
                        (log_ps[v * batch:(v + 1) * batch] - log_q[i * batch:(i + 1) * batch]), -1))
         for i in range(2) for v in range(ncrops) if v != i]
  rel_close(metrics["kl_student_teacher"], np.mean(kls))


def test_objective_loss_with_schedule_local_crops_and_centre():
  """Whole objective: official crop order, centring, the temperature of the step, the centre after the loss."""
  objective = small_dino(local_views=3, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
  data = make_batch()
  variables, state = init_unboxed(objective, data)
  # A teacher different from the student and a non-zero centre, so that both matter.
  state["teacher"]["params"] = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                                            state["teacher"]["params"])
  state["center"] = jnp.linspace(-1.0, 1.0, 32)
  x = np.asarray(data["image"])
  globals_ = np.concatenate([x[:, 0], x[:, 1]])                 # official: crops concatenated view by view
  locals_ = np.concatenate([np.asarray(data["local"])[:, i] for i in range(3)])
  net = objective.network
  s_glob, bs = net.apply(variables, globals_, train=True, mutable=["batch_stats"])
  s_loc, bs = net.apply({**variables, **bs}, locals_, train=True, mutable=["batch_stats"])
  t_out, _ = net.apply(state["teacher"], globals_, train=True, mutable=["batch_stats"])
  student = np.concatenate([s_glob["projection"], s_loc["projection"]]).astype(np.float64)
  teacher = np.asarray(t_out["projection"], np.float64)
  schedule = np_teacher_temp_schedule(0.04, 0.07, 4, 10)
  loss_fn = jax.jit(objective.loss)
  for step in (0, 3, 5, 19):
    out = loss_fn(variables, state, data, jax.random.key(0), jnp.int32(step))
    ref_loss, ref_center = np_dino_loss(student, teacher, np.asarray(state["center"], np.float64), 5,
                                        schedule[step // 2])
    rel_close(out.loss, ref_loss)
    rel_close(out.objective_state["center"], ref_center)
    rel_close(out.metrics["teacher_temp"], schedule[step // 2])
    np.testing.assert_allclose(out.model_state["batch_stats"]["backbone"]["BatchNorm_0"]["mean"],
                               bs["batch_stats"]["backbone"]["BatchNorm_0"]["mean"], rtol=1e-6)


def test_schedules_match_official_arrays():
  temps = np_teacher_temp_schedule(0.04, 0.07, 30, 100)
  for epoch in (0, 1, 17, 29, 30, 99):
    rel_close(dino_lib.teacher_temperature(epoch * 7 + 3, warmup_temp=0.04, temp=0.07, warmup_epochs=30,
                                           steps_per_epoch=7), temps[epoch])
  momentum = np_cosine_scheduler(0.996, 1.0, 10, 13)
  for it in (0, 1, 64, 129):
    rel_close(dino_lib.cosine_momentum(it, 130, 0.996), momentum[it], rtol=1e-7)


# ---- the head ------------------------------------------------------------------------------------------------

def test_head_is_mlp_l2norm_and_weight_normed_last_layer():
  head = DINOHead(out_dim=12, hidden_dim=10, bottleneck_dim=6)
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  params = nn.unbox(head.init(jax.random.key(0), x))["params"]
  params = jax.tree.map(np.asarray, params)
  params["last_layer"]["g"] = np.linspace(0.5, 2.0, 12).astype(np.float32)   # g enters the formula
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))   # exact GELU
  h = gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  h = gelu(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
  h = h @ params["fc3"]["kernel"] + params["fc3"]["bias"]
  h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  v, g = params["last_layer"]["v"], params["last_layer"]["g"]
  ref = h @ (v * g / np.linalg.norm(v, axis=0, keepdims=True))
  rel_close(head.apply({"params": params}, x), ref, rtol=1e-5)
  assert params["last_layer"]["v"].shape == (6, 12) and params["last_layer"]["g"].shape == (12,)
  np.testing.assert_array_equal(nn.unbox(head.init(jax.random.key(0), x))["params"]["last_layer"]["g"], 1.0)


def test_frozen_g_gets_no_gradient():
  layer = WeightNormDense(4, freeze_g=True)
  x = jnp.ones((2, 3))
  params = nn.unbox(layer.init(jax.random.key(0), x))
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
  assert np.all(np.asarray(grads["params"]["g"]) == 0) and np.any(np.asarray(grads["params"]["v"]) != 0)


# ---- teacher: EMA and no gradient ------------------------------------------------------------------------------

def test_teacher_gets_no_gradient():
  objective = small_dino(local_views=3)
  data = make_batch()
  variables, state = init_unboxed(objective, data)

  def loss_of(student_params, teacher_params):
    st = {**state, "teacher": {**state["teacher"], "params": teacher_params}}
    return objective.loss({**variables, "params": student_params}, st, data, jax.random.key(0), 0).loss

  g_student, g_teacher = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(variables["params"], state["teacher"]["params"])
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_teacher))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_student))


def test_after_update_is_ema_of_raw_parameters():
  objective = small_dino(total_steps=50)
  data = make_batch(local=0)
  variables, state = init_unboxed(objective, data)
  student = jax.tree.map(lambda p: p + 1.0, variables["params"])   # raw v and g included
  step = 17
  new_state = objective.after_update({**variables, "params": student}, state, jnp.int32(step))
  m = np_cosine_scheduler(0.996, 1.0, 50, 1)[step]
  for t_old, s, t_new in zip(jax.tree_util.tree_leaves(state["teacher"]["params"]), jax.tree_util.tree_leaves(student),
                             jax.tree_util.tree_leaves(new_state["teacher"]["params"])):
    rel_close(t_new, m * np.asarray(t_old, np.float64) + (1 - m) * np.asarray(s, np.float64), rtol=1e-6)
  # Teacher BatchNorm statistics are not averaged (official: buffers are the teacher's own).
  assert new_state["teacher"]["batch_stats"] is state["teacher"]["batch_stats"]
  np.testing.assert_array_equal(new_state["center"], state["center"])


# ---- optimiser extras -------------------------------------------------------------------------------------------

def test_per_tensor_clipping_matches_official():
  r = np.random.RandomState(0)
  grads = {"a": r.randn(4, 5).astype(np.float32) * 10, "b": r.randn(3).astype(np.float32) * 0.01}
  clipped, _ = dino_lib.clip_per_tensor(3.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
  for k, g in grads.items():
    coef = 3.0 / (np.linalg.norm(g.astype(np.float64)) + 1e-6)
    rel_close(clipped[k], g * coef if coef < 1 else g)


def test_last_layer_frozen_first_epoch_and_g_always():
  objective = small_dino(steps_per_epoch=2, freeze_last_layer_epochs=1, clip_grad=3.0)
  data = make_batch(local=0)
  variables, state = init_unboxed(objective, data)
  tx = objective.wrap_optimizer(optax.adamw(1e-2, weight_decay=0.1))
  opt_state = tx.init(variables["params"])
  params = variables["params"]
  history = []
  @jax.jit
  def train_step(params, opt_state, step):
    grads = jax.grad(lambda p: objective.loss({**variables, "params": p}, state, data, jax.random.key(0),
                                              step).loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for step in range(4):
    params, opt_state = train_step(params, opt_state, jnp.int32(step))
    history.append(jax.tree.map(np.asarray, params["head"]["last_layer"]))
  v0, g0 = np.asarray(variables["params"]["head"]["last_layer"]["v"]), variables["params"]["head"]["last_layer"]["g"]
  np.testing.assert_array_equal(history[1]["v"], v0)          # epoch 0 = steps 0 and 1: not even weight decay
  assert np.any(history[2]["v"] != v0)                        # epoch 1: trains
  for h in history:
    np.testing.assert_array_equal(h["g"], g0)                 # norm_last_layer: g stays 1
  assert np.any(np.asarray(params["head"]["fc1"]["kernel"]) != np.asarray(variables["params"]["head"]["fc1"]["kernel"]))


def test_weight_decay_schedule_is_decoupled_cosine():
  lr = lambda step: 0.1 * (1.0 + step)
  wd_fn = lambda step: dino_lib.cosine_momentum(step, 10, 0.04, 0.4)
  tx = optax.chain(optax.adamw(lr, weight_decay=0.04, mask=lambda p: {"w": True, "b": False}),
                   dino_lib.scheduled_weight_decay(lr, wd_fn, 0.04, lambda p: {"w": True, "b": False}))
  params = {"w": jnp.full((3,), 2.0), "b": jnp.full((3,), 2.0)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(zeros, state, params)   # zero gradients: only weight decay moves w
    wd = np_cosine_scheduler(0.04, 0.4, 10, 1)[step]
    rel_close(updates["w"], -0.1 * (1.0 + step) * wd * np.asarray(params["w"]))
    np.testing.assert_array_equal(updates["b"], 0.0)
    params = optax.apply_updates(params, updates)
