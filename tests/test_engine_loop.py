"""Engine tests in one process: sharding equivalence, NaN guard, checkpoint fallback, mesh change.

They use the toy objective/input of tests/test_engine_support.py (and a tiny MAE for sharding) so
that every run compiles in seconds.
"""
import json
import logging
import os

import jax
import numpy as np
import pytest

from fmjax import checkpoint as checkpoint_lib
from fmjax import train, train_state, optim, parallel
from fmjax.objectives import build_objective
from tests import test_engine_support as support

support.register()


def _run(tmp_path, name, devices=None, builder=None, **overrides):
  config = support.toy_config(**overrides)
  workdir = str(tmp_path / name)
  summary = train.train(config, workdir, builder or support.toy_input_builder(), devices=devices)
  return config, workdir, summary


def _tiny_mae_overrides(**extra):
  return {"objective": support.ml_dict(name="mae", mask_ratio=0.75, norm_pix=True, decoder_width=16,
                                       decoder_depth=1, decoder_heads=2),
          "model.name": "spec_vit", "model.width": 16, "model.depth": 1, "model.num_heads": 2,
          "model.mlp_dim": 32, "model.patch_size": 4, "model.use_adapter": False, "model.dtype": "float32",
          "data.crop_size": support.TOY_SIZE, "data.num_bands": support.TOY_BANDS, **extra}


@pytest.mark.slow  # two sharded compiles: minutes on a loaded 2-core machine
def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
  """Tiny MAE (ViT: heads/mlp over `tensor`, width over `fsdp`) on 1 device vs data=2,fsdp=2,tensor=2."""
  common = _tiny_mae_overrides(total_steps=5, **{"checkpoint.every_steps": 0})
  _, one_dir, _ = _run(tmp_path, "one", devices=jax.devices()[:1], **common, **{"mesh.data": 1})
  _, eight_dir, summary = _run(tmp_path, "eight", **common,
                               **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  one, eight = support.read_losses(one_dir), support.read_losses(eight_dir)
  assert sorted(one) == sorted(eight) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([eight[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=2e-5)
  # the parameters really were sharded over fsdp and tensor
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(summary["state"]["params"])}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs


class _LinearRegression:
  """loss = mean((x W - y)^2): the mean of equal-sized micro-batch means is the full-batch mean."""
  def loss(self, variables, objective_state, batch, rng, step):
    from fmjax.objectives.base import LossOutput
    import jax.numpy as jnp
    pred = batch["x"] @ variables["params"]["w"]
    return LossOutput(jnp.mean(jnp.square(pred - batch["y"])), {}, {}, objective_state)

  def after_update(self, variables, objective_state, step):
    return objective_state


def _linear_regression_problem(seed: int, rows: int):
  """(batch, AdamW, initial train state) for `_LinearRegression` with 5 inputs and 3 outputs."""
  import optax
  rng = np.random.default_rng(seed)
  batch = {"x": rng.normal(size=(rows, 5)).astype(np.float32), "y": rng.normal(size=(rows, 3)).astype(np.float32)}
  tx = optax.adamw(1e-2, weight_decay=0.1)
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32)}
  state = {"params": params, "model_state": {}, "opt_state": tx.init(params), "objective_state": {},
           "step": np.int32(0), "rng": jax.random.key_data(jax.random.key(0))}
  return batch, tx, state


def test_grad_accumulation_matches_one_big_batch():
  batch, tx, state = _linear_regression_problem(0, 16)
  params = state["params"]
  schedule = lambda step: 1e-2
  results = {}
  mesh = parallel.make_mesh({"data": 2}, jax.devices()[:2])
  batch_sharded = jax.device_put(batch, parallel.batch_sharding(mesh, 2))
  for accum in (1, 4):
    step_fn = jax.jit(train.make_train_step(_LinearRegression(), tx, schedule, accum, mesh))
    results[accum] = step_fn(state, batch_sharded)
  (s1, m1), (s4, m4) = results[1], results[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(s4["params"]["w"], s1["params"]["w"], rtol=1e-5, atol=1e-7)
  # and the gradient itself against the closed form 2/(N*K) X^T (XW - Y)
  x, y, w = batch["x"], batch["y"], params["w"]
  grad = 2 * x.T @ (x @ w - y) / y.size
  np.testing.assert_allclose(m1["grad_norm"], np.linalg.norm(grad), rtol=1e-5)


def test_logged_norms_around_a_donated_step():
  """`LoggedNorms` keeps its own copy of the parameters across a step that donates them, and its
  norms are NumPy's norms of the new parameters and of their change; the step itself leaves them out."""
  batch, tx, state = _linear_regression_problem(1, 8)
  step = jax.jit(train.make_train_step(_LinearRegression(), tx, lambda step: 1e-2, 1), donate_argnums=0)
  state = jax.device_put(state)
  norms = train.LoggedNorms()
  for _ in range(3):
    before = np.array(state["params"]["w"])
    donated = state["params"]["w"]
    norms.before(state)
    state, metrics = step(state, batch)
    assert donated.is_deleted()   # the step really consumed the buffers the copy was taken from
    assert "param_norm" not in metrics and "update_norm" not in metrics
    logged = jax.device_get(norms.after(state))
    after = np.array(state["params"]["w"])   # a copy: a NumPy view would pin the buffer the next step donates
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(logged["param_norm"], np.linalg.norm(after), rtol=1e-6)
    np.testing.assert_allclose(logged["update_norm"], np.linalg.norm(after - before), rtol=1e-4)
  with pytest.raises(RuntimeError, match="without a before"):
    norms.after(state)


def test_loop_logs_parameter_and_update_norms_on_logged_steps(tmp_path):
  """Logged every 3 steps of 5: rows for steps 3 and 5, each with both norms; the last one's
  parameter norm is the norm of the parameters the run ends with."""
  _, workdir, summary = _run(tmp_path, "norms", total_steps=5, **{"log.every_steps": 3, "checkpoint.every_steps": 0})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = {row["step"]: row for row in map(json.loads, f)}
  assert sorted(rows) == [3, 5]
  for row in rows.values():
    assert row["update_norm"] > 0 and np.isfinite(row["update_norm"])
  final = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(summary["state"]["params"])))
  np.testing.assert_allclose(rows[5]["param_norm"], final, rtol=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = support.toy_config(total_steps=12, **{"objective.nan_at_step": 7, "checkpoint.every_steps": 5})
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="at step 7") as info:
    train.train(config, workdir, support.toy_input_builder())
  assert "last good checkpoint is step 5" in str(info.value)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  assert checkpointer.all_steps() == [5]
  checkpointer.close()
  _, state = checkpoint_lib.load_state(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert int(state["step"]) == 5


def _abstract_state(config, mesh):
  objective = build_objective(config)
  schedule = optim.build_schedule(config.schedule, config.total_steps)
  tx = optim.build_optimizer(config.optimizer, schedule)
  spec = {"image": jax.ShapeDtypeStruct((1, 1, support.TOY_SIZE, support.TOY_SIZE, support.TOY_BANDS), np.float32)}
  init_fn = train_state.make_init_fn(objective, tx, spec, config.seed)
  return train_state.abstract_state_and_shardings(init_fn, mesh)[0]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config, workdir, summary = _run(tmp_path, "corrupt")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["10", "20"]
  # corrupt every data file of step 20's state, and leave a half-written step 30 behind
  for root, _, files in os.walk(os.path.join(ckpt_dir, "20", "state")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
  os.makedirs(os.path.join(ckpt_dir, "30.orbax-checkpoint-tmp-123", "state"))
  mesh = parallel.make_mesh({"data": -1})
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  with caplog.at_level(logging.WARNING):
    state, step = checkpointer.restore_latest(_abstract_state(config, mesh))
  checkpointer.close()
  assert step == 10 and int(state["step"]) == 10
  assert any("checkpoint 20" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
  # and the loop resumes from 10 and finishes
  summary = train.train(support.toy_config(total_steps=12), workdir, support.toy_input_builder())
  assert summary["final_step"] == 12


def test_restore_eight_device_checkpoint_onto_four_devices(tmp_path):
  config, workdir, summary = _run(tmp_path, "mesh", total_steps=10, **{"mesh.data": 4, "mesh.fsdp": 2})
  saved = jax.device_get(summary["state"]["params"])
  mesh4 = parallel.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  state, step = checkpointer.restore_latest(_abstract_state(config, mesh4))
  checkpointer.close()
  assert step == 10
  for leaf in jax.tree.leaves(state["params"]):
    assert leaf.sharding.mesh.devices.size == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), saved)
  # the loop itself continues on the 4-device mesh
  more = train.train(support.toy_config(total_steps=12, **{"mesh.data": 2, "mesh.fsdp": 2}), workdir,
                     support.toy_input_builder(), devices=jax.devices()[:4])
  assert more["final_step"] == 12


def test_disk_full_on_save_is_reported(tmp_path, monkeypatch):
  import errno
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(checkpointer.manager, "save", full)
  with pytest.raises(checkpoint_lib.CheckpointSaveError, match="disk is full"):
    checkpointer.save(1, {"x": np.zeros(3)})
  checkpointer.close()


def test_reading_a_step_without_orbax_metadata_warnings(tmp_path, caplog):
  """The manager writes `_CHECKPOINT_METADATA` per step, not per item, so orbax's item-level readers
  warn that `<step>/state/_CHECKPOINT_METADATA` is missing; evaluation and export must not show that."""
  import ml_collections
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  params = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}
  checkpointer.save(3, {"params": params}, config=ml_collections.ConfigDict({"seed": 0}), force=True)
  checkpointer.close()
  absl_filters = list(logging.getLogger("absl").filters)
  with caplog.at_level(logging.WARNING):
    _, state = checkpoint_lib.load_state(str(tmp_path))
  np.testing.assert_array_equal(state["params"]["w"], params["w"])
  assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
  assert logging.getLogger("absl").filters == absl_filters     # the filter is gone again

  # Without the filter orbax does warn (else this test would prove nothing) ...
  import orbax.checkpoint as ocp
  state_dir = os.path.join(str(tmp_path), "checkpoints", "3", "state")
  caplog.clear()
  with caplog.at_level(logging.WARNING), ocp.StandardCheckpointer() as ckptr:
    ckptr.metadata(state_dir)
  assert [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
  # ... and with it, a step directory that really lacks its metadata is still reported.
  os.remove(os.path.join(str(tmp_path), "checkpoints", "3", "_CHECKPOINT_METADATA"))
  caplog.clear()
  with caplog.at_level(logging.WARNING), checkpoint_lib.state_item_checkpointer() as ckptr:
    ckptr.metadata(state_dir)
  assert [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]


@pytest.mark.parametrize("user_setting", [None, "1"])
def test_tensorboard_writer_without_tensorflow_onednn_notice(tmp_path, user_setting):
  """Importing TensorFlow (for clu's event writers) logs that "you may see slightly different numerical
  results" while its oneDNN rewrites are on; fmjax turns them off unless the user chose otherwise."""
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if user_setting is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = user_setting
  code = ("import sys; from fmjax import metrics_logging as m; log = m.MetricsLogger(sys.argv[1]); "
          "log.scalars(1, {'loss': 0.5}); log.close()")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  notice = "oneDNN custom operations are on" in out.stderr
  assert notice == (user_setting == "1"), out.stderr   # the user's own setting is kept
