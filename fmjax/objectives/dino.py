"""DINO: self-distillation with a momentum (EMA) teacher, centring and sharpening.

Faithful to the official code (facebookresearch/dino, main_dino.py) where it matters numerically:
  * teacher = EMA of the student's raw parameters (weight-norm direction `v` and gain `g` included),
    cosine momentum 0.996 -> 1 over training, applied after every optimiser step (`after_update`);
    the teacher's BatchNorm statistics are its own (official: buffers are not averaged);
  * teacher sees only the global views, gets no gradient (its variables live in objective_state);
  * teacher probabilities softmax((t - centre) / T_t) with T_t warmed up linearly per epoch;
    student log-softmax(s / T_s), T_s = 0.1;
  * loss = mean over the batch of cross-entropy, summed over every (teacher global view, student view)
    pair with different views and divided by the number of pairs;
  * the centre is updated *after* the loss from the global-batch mean of the raw teacher outputs
    (under jit the batch is global, so the mean already is the all-reduced one), momentum 0.9;
  * optimiser extras (`wrap_optimizer`): per-tensor gradient clipping (not global-norm), the last layer
    frozen during the first epoch(s) (no update, no weight decay), g frozen when `norm_last_layer`.

View order follows the official code: crops are stacked view-major ([view0 batch; view1 batch; ...]),
so BatchNorm statistics of the student are over all global crops together, and locals separately.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from fmjax.models.ssl_heads import DINOHead, SSLNetwork, l2_normalize
from fmjax.objectives.base import LossOutput, ViewSpec

PyTree = Any
EVAL_ENCODERS = ("teacher", "student")


def cosine_momentum(step: jax.Array, total_steps: int, base: float, final: float = 1.0) -> jax.Array:
  """Official `cosine_scheduler(base, final, epochs, niter)` at iteration `step` (no warm-up)."""
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * progress))


def teacher_temperature(step: jax.Array, *, warmup_temp: float, temp: float, warmup_epochs: int,
                        steps_per_epoch: int) -> jax.Array:
  """Official schedule: np.linspace(warmup_temp, temp, warmup_epochs) per epoch, then `temp`."""
  if warmup_epochs <= 0:
    return jnp.asarray(temp, jnp.float32)
  epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
  frac = epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1)   # linspace(a, b, 1) == [a]
  warm = warmup_temp + (temp - warmup_temp) * frac
  return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def ema(target: PyTree, online: PyTree, momentum: jax.Array) -> PyTree:
  """target <- m * target + (1 - m) * online, leaf by leaf (official `param_k.mul_(m).add_((1-m)*param_q)`)."""
  return jax.tree.map(lambda t, o: (t * momentum + (1.0 - momentum) * o).astype(t.dtype), target, online)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Official DINO `clip_gradients`: each tensor scaled by min(1, max_norm / (||g|| + 1e-6))."""
  def update(updates, state, params=None):
    del params
    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return (g * jnp.minimum(1.0, max_norm / (norm + 1e-6))).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def zero_frozen(is_frozen) -> optax.GradientTransformation:
  """Zeroes the updates of leaves for which `is_frozen(path, count)` is true (count: optimiser steps so far).

  Used on both sides of the optimiser: before it, the frozen leaves' Adam moments stay at zero (like a
  PyTorch parameter whose .grad is None); after it, their weight-decay term is removed too.
  """
  def init(params):
    del params
    return {"count": jnp.zeros([], jnp.int32)}

  def update(updates, state, params=None):
    del params
    count = state["count"]
    new = jax.tree_util.tree_map_with_path(
        lambda path, u: jnp.where(is_frozen(path, count), jnp.zeros_like(u), u), updates)
    return new, {"count": count + 1}
  return optax.GradientTransformation(init, update)


def scheduled_weight_decay(learning_rate, weight_decay, constant_decay: float, mask) -> optax.GradientTransformation:
  """Turns AdamW's constant decoupled decay `constant_decay` into the schedule `weight_decay(step)`.

  Placed after the optimiser: adds -lr(t) * (wd(t) - constant_decay) * p where `mask(params)` is true, so
  the total decay is -lr(t) * wd(t) * p exactly as the official DINO (which sets wd per iteration).
  """
  def init(params):
    del params
    return {"count": jnp.zeros([], jnp.int32)}

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("scheduled_weight_decay needs the parameters (tx.update(grads, state, params))")
    count = state["count"]
    extra = learning_rate(count) * (weight_decay(count) - constant_decay)
    new = jax.tree.map(lambda u, p, m: u - extra * p if m else u, updates, params, mask(params))
    return new, {"count": count + 1}
  return optax.GradientTransformation(init, update)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


class DINO:
  """The DINO objective behind the protocol of fmjax/objectives/base.py."""
  name = "dino"

  def __init__(self, backbone: nn.Module, *, total_steps: int, steps_per_epoch: int = 1,
               out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
               norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.04,
               warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
               center_momentum: float = 0.9, momentum_teacher: float = 0.996, local_views: int = 0,
               freeze_last_layer_epochs: int = 1, clip_grad: float = 3.0, eval_encoder: str = "teacher",
               head_dtype: Any = jnp.float32):
    if total_steps <= 0 or steps_per_epoch <= 0:
      raise ValueError(f"DINO needs total_steps > 0 and steps_per_epoch > 0 (cosine momentum and epoch "
                       f"schedules), got total_steps={total_steps}, steps_per_epoch={steps_per_epoch}")
    if eval_encoder not in EVAL_ENCODERS:
      raise ValueError(f"objective.eval_encoder={eval_encoder!r} is not valid; choose one of {EVAL_ENCODERS}")
    self.network = SSLNetwork(backbone, DINOHead(out_dim, hidden_dim, bottleneck_dim, norm_last_layer,
                                                 dtype=head_dtype))
    self.views = ViewSpec(global_views=2, local_views=local_views)
    self.total_steps, self.steps_per_epoch = int(total_steps), int(steps_per_epoch)
    self.out_dim, self.norm_last_layer = out_dim, norm_last_layer
    self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
    self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
    self.center_momentum, self.momentum_teacher = center_momentum, momentum_teacher
    self.freeze_last_layer_steps = int(freeze_last_layer_epochs) * self.steps_per_epoch
    self.clip_grad, self.eval_encoder = clip_grad, eval_encoder
    self.weight_decay_transform: optax.GradientTransformation | None = None   # set by `build` (wd schedule)

  # -- protocol -------------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[PyTree, PyTree]:
    images = batch["image"]
    if images.ndim != 5 or images.shape[1] < 2:
      raise ValueError(f"DINO needs batch['image'] of shape [B, V>=2, H, W, C], got {images.shape}")
    variables = self.network.init(rng, images[:, 0], train=False)
    center = nn.with_logical_partitioning(nn.initializers.zeros, ("proj",))(None, (self.out_dim,), jnp.float32)
    # The teacher starts as an exact copy of the student (official: load_state_dict(student.state_dict())).
    teacher = jax.tree.map(lambda x: x, variables)
    return variables, {"teacher": teacher, "center": center}

  def loss(self, variables: PyTree, objective_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array) -> LossOutput:
    del rng  # no stochastic layers in the student or the teacher
    images = batch["image"]
    num_global = images.shape[1]
    global_crops = _view_major(images)
    collections = [k for k in variables if k != "params"]

    student_global, model_state = self._apply(variables, global_crops, collections)
    student = [student_global]
    local = batch.get("local")
    if local is not None and local.shape[1] > 0:
      student_local, model_state = self._apply({**variables, **model_state}, _view_major(local), collections)
      student.append(student_local)
    student_logits = jnp.concatenate([s["projection"] for s in student], axis=0)

    teacher_vars = jax.lax.stop_gradient(objective_state["teacher"])
    teacher_out, teacher_state = self._apply(teacher_vars, global_crops, collections)
    teacher_logits = jax.lax.stop_gradient(teacher_out["projection"])

    batch_size = images.shape[0]
    center = objective_state["center"]
    temp = teacher_temperature(step, warmup_temp=self.warmup_teacher_temp, temp=self.teacher_temp,
                               warmup_epochs=self.warmup_teacher_temp_epochs, steps_per_epoch=self.steps_per_epoch)
    loss, metrics = dino_loss(student_logits, teacher_logits, center, num_global=num_global,
                              batch_size=batch_size, student_temp=self.student_temp, teacher_temp=temp)
    # Centre after the loss, from the mean over every teacher output of the global batch.
    new_center = center * self.center_momentum + jnp.mean(teacher_logits, axis=0) * (1 - self.center_momentum)

    metrics = dict(metrics)
    metrics["teacher_temp"] = temp
    metrics["teacher_momentum"] = cosine_momentum(step, self.total_steps, self.momentum_teacher)
    metrics["embedding_std"] = normalized_std(student_global["embedding"])
    metrics["teacher_embedding_std"] = normalized_std(teacher_out["embedding"])
    metrics["center_norm"] = jnp.linalg.norm(new_center)
    new_teacher = {**objective_state["teacher"], **teacher_state}
    return LossOutput(loss=loss, metrics=metrics, model_state=model_state,
                      objective_state={**objective_state, "teacher": new_teacher, "center": new_center})

  def after_update(self, variables: PyTree, objective_state: PyTree, step: jax.Array) -> PyTree:
    """EMA of the teacher's parameters with the momentum of the step just taken (`step`, 0-based)."""
    m = cosine_momentum(step, self.total_steps, self.momentum_teacher)
    teacher = objective_state["teacher"]
    new_params = ema(teacher["params"], jax.lax.stop_gradient(variables["params"]), m)
    return {**objective_state, "teacher": {**teacher, "params": new_params}}

  def backbone_variables(self, variables: PyTree, objective_state: PyTree) -> PyTree:
    """The teacher's backbone by default (official DINO evaluates the teacher); `eval_encoder='student'`."""
    source = objective_state["teacher"] if self.eval_encoder == "teacher" else variables
    return {col: tree["backbone"] for col, tree in source.items() if "backbone" in tree}

  # -- optional protocol hook --------------------------------------------------------------------------------
  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Per-tensor clipping before the optimiser; the last layer frozen for the first epoch(s); g frozen."""
    freeze_steps, freeze_g = self.freeze_last_layer_steps, self.norm_last_layer

    def is_frozen(path, count):
      names = _path_names(path)
      if "last_layer" not in names:
        return False
      if freeze_g and names[-1] == "g":
        return True
      return count < freeze_steps

    parts = [zero_frozen(is_frozen)]
    if self.clip_grad and self.clip_grad > 0:
      parts.append(clip_per_tensor(self.clip_grad))
    after = [self.weight_decay_transform] if self.weight_decay_transform is not None else []
    return optax.chain(*parts, tx, *after, zero_frozen(is_frozen))

  # -- helpers ----------------------------------------------------------------------------------------------
  def _apply(self, variables, images, collections):
    if collections:
      out, state = self.network.apply(variables, images, train=True, mutable=collections)
      return out, dict(state)
    return self.network.apply(variables, images, train=True), {}


def _view_major(views: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [V*B, H, W, C], view 0's batch first (the official crop order)."""
  b, v = views.shape[:2]
  return jnp.swapaxes(views, 0, 1).reshape((v * b,) + views.shape[2:])


def normalized_std(embedding: jax.Array) -> jax.Array:
  """Mean over dimensions of the batch std of L2-normalised embeddings; collapse drives it to 0.

  For embeddings spread over the sphere it is about 1/sqrt(D) (each unit vector's squared coordinates
  sum to 1, so per-dimension variance averages 1/D).
  """
  z = l2_normalize(embedding.astype(jnp.float32))
  return jnp.mean(jnp.std(z, axis=0))


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array, *, num_global: int,
              batch_size: int, student_temp: float, teacher_temp: jax.Array) -> tuple[jax.Array, dict]:
  """student_logits [(V+L)*B, K] view-major, teacher_logits [V*B, K]; returns (loss, collapse metrics)."""
  num_crops = student_logits.shape[0] // batch_size
  s = student_logits.astype(jnp.float32).reshape(num_crops, batch_size, -1)
  t = teacher_logits.astype(jnp.float32).reshape(num_global, batch_size, -1)
  log_p_s = jax.nn.log_softmax(s / student_temp, axis=-1)
  log_q = jax.nn.log_softmax((t - center) / teacher_temp, axis=-1)
  q = jnp.exp(log_q)
  # ce[i, v] = mean_b sum_k -q[i, b, k] log p_s[v, b, k]
  ce = -jnp.einsum("ibk,vbk->iv", q, log_p_s) / batch_size
  pair = jnp.arange(num_global)[:, None] != jnp.arange(num_crops)[None, :]
  num_pairs = num_global * num_crops - num_global
  loss = jnp.sum(jnp.where(pair, ce, 0.0)) / num_pairs
  # KL(student || teacher) over the same pairs: sum_k p_s (log p_s - log q).
  p_s = jnp.exp(log_p_s)
  kl = (jnp.einsum("vbk,vbk->v", p_s, log_p_s)[None, :] - jnp.einsum("vbk,ibk->iv", p_s, log_q)) / batch_size
  metrics = {
      "teacher_entropy": -jnp.mean(jnp.sum(q * log_q, axis=-1)),
      "student_entropy": -jnp.mean(jnp.sum(p_s * log_p_s, axis=-1)),
      "kl_student_teacher": jnp.sum(jnp.where(pair, kl, 0.0)) / num_pairs,
  }
  return loss, metrics


# -- construction from a config -----------------------------------------------------------------------------

def build_backbone(config) -> nn.Module:
  """The backbone named by config.model.name; the other config.model keys are build_model overrides.

  Image size and band count come from config.data (crop_size, num_bands), as for MAE. ResNets take no
  ViT-only keys (patch_size, remat, scan, ...): those are dropped for them. ViTs keep their learned
  position embedding (DINO/MoCo do not use MAE's fixed sin-cos table).
  """
  from fmjax.models import VIT_ONLY_OPTIONS, build_model
  name = config.model.name
  overrides = {k: v for k, v in config.model.items() if k != "name" and v is not None}
  if "vit" not in name:
    overrides = {k: v for k, v in overrides.items() if k not in VIT_ONLY_OPTIONS}
  data = config.get("data", {})
  if data.get("crop_size", 0):
    overrides.setdefault("image_size", int(data.crop_size))
  if data.get("num_bands", 0):
    overrides.setdefault("num_bands", int(data.num_bands))
  return build_model(name, **overrides)


def _dataset_size(config) -> int:
  """config.data.num_examples, else the split size recorded in the dataset directory (0: unknown)."""
  data = config.get("data", None)
  if data is None:
    return 0
  if data.get("num_examples", 0):
    return int(data.num_examples)
  if not data.get("dir", ""):
    return 0
  try:
    from fmjax.data.dataset_dir import read_dataset_info
    return int(read_dataset_info(data.dir)["splits"][data.get("split", "train")]["num_examples"])
  except (OSError, KeyError, ValueError, ImportError):
    return 0


def resolve_steps(config) -> tuple[int, int]:
  """(total optimiser steps, steps per epoch) from config.total_steps / config.epochs and the data size.

  Epoch-based options (teacher-temperature warm-up, frozen last layer) need steps_per_epoch: it is
  config.objective.steps_per_epoch when > 0, else the dataset size // batch_size when the size is known
  (config.data.num_examples or the dataset directory's info), as the input pipeline counts an epoch.
  """
  batch = int(config.batch_size)
  num_examples = _dataset_size(config)
  steps_per_epoch = int(config.objective.get("steps_per_epoch", 0) or 0)
  if steps_per_epoch <= 0 and num_examples:
    steps_per_epoch = max(1, num_examples // batch)
  total = int(config.get("total_steps", 0) or 0)
  if total <= 0:
    epochs = float(config.get("epochs", 0) or 0)
    if epochs and steps_per_epoch > 0:   # as fmjax.train counts: epochs x full batches per epoch
      total = int(math.ceil(epochs * steps_per_epoch))
  if total <= 0:
    raise ValueError(f"objective {config.objective.name!r} schedules its momentum over training: set "
                     f"config.total_steps > 0, or config.epochs with config.data.num_examples or "
                     f"config.objective.steps_per_epoch or a readable config.data.dir (got total_steps={config.get('total_steps')}, "
                     f"epochs={config.get('epochs')})")
  return total, steps_per_epoch


def build(config) -> DINO:
  """The registry factory (fmjax/objectives/__init__.py): reads config.model and config.objective."""
  o = config.objective
  total_steps, steps_per_epoch = resolve_steps(config)
  epoch_options = {k: int(o.get(k, 0)) for k in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs")}
  if steps_per_epoch <= 0:
    if any(epoch_options.values()):
      raise ValueError(f"{epoch_options} are counted in epochs: set config.objective.steps_per_epoch or "
                       f"config.data.num_examples")
    steps_per_epoch = 1
  objective = DINO(
      build_backbone(config), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      out_dim=int(o.get("out_dim", 65536)), hidden_dim=int(o.get("hidden_dim", 2048)),
      bottleneck_dim=int(o.get("bottleneck_dim", 256)), norm_last_layer=bool(o.get("norm_last_layer", True)),
      student_temp=float(o.get("student_temp", 0.1)), teacher_temp=float(o.get("teacher_temp", 0.04)),
      warmup_teacher_temp=float(o.get("warmup_teacher_temp", o.get("teacher_temp", 0.04))),
      warmup_teacher_temp_epochs=epoch_options["warmup_teacher_temp_epochs"],
      center_momentum=float(o.get("center_momentum", 0.9)), momentum_teacher=float(o.get("momentum_teacher", 0.996)),
      local_views=int(o.get("local_views", 0)), freeze_last_layer_epochs=epoch_options["freeze_last_layer_epochs"],
      clip_grad=float(o.get("clip_grad", 3.0)), eval_encoder=str(o.get("eval_encoder", "teacher")))
  wd_end = o.get("weight_decay_end", None)
  if wd_end is not None and wd_end >= 0:
    if config.optimizer.name != "adamw":
      raise ValueError(f"objective.weight_decay_end (a weight-decay schedule) needs optimizer.name='adamw', "
                       f"got {config.optimizer.name!r}")
    from fmjax import optim
    wd0 = float(config.optimizer.get("weight_decay", 0.0))
    lr = optim.build_schedule(config.schedule, total_steps)
    wd = lambda step: cosine_momentum(step, total_steps, wd0, float(wd_end))
    decay_tokens = bool(config.optimizer.get("decay_tokens", False))
    objective.weight_decay_transform = scheduled_weight_decay(
        lr, wd, wd0, lambda params: optim.weight_decay_mask(params, decay_tokens))
  return objective
