"""Building blocks shared by the backbones and heads: sin-cos tables, torch-style BatchNorm,
pre-norm transformer blocks (timm layout), and helpers that attach logical axis names to params.

Every parameter is created through `nn.with_logical_partitioning` with names from
`fmjax.parallel.LOGICAL_RULES`, so one rules table decides how the model is laid out on a mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
init = jax.nn.initializers

LN_EPS = 1e-6          # timm / MAE LayerNorm eps
BN_EPS = 1e-5          # torch BatchNorm default
BN_MOMENTUM = 0.1      # torch convention: new = (1 - m) * old + m * batch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Dtype:
  """Accepts a jnp dtype or one of the names in DTYPES (configs carry strings)."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not known; valid choices: {sorted(DTYPES)}")
    return DTYPES[dtype]
  return dtype


# ---------------------------------------------------------------------------------------------
# Remat policies: names usable in configs.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation at all (handled by callers: the module is not wrapped)
    "full": None,  # jax.checkpoint without a policy: save nothing, recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(module_cls, policy_name: str, *, static_argnums=(), prevent_cse: bool = True):
  """Wraps a module class in nn.remat according to a policy name ('none' returns it unchanged)."""
  if policy_name not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy_name!r} is not known; valid choices: {sorted(REMAT_POLICIES)}")
  if policy_name == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy_name], static_argnums=static_argnums,
                  prevent_cse=prevent_cse)


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings (MAE recipe), computed in float64.

def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """[M, embed_dim]: sin of the first half, cos of the second; omega_k = 1 / 10000^(k / (D/2))."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """[(1 +) grid_size**2, embed_dim] float64, MAE's `get_2d_sincos_pos_embed`.

  Row-major token order (row i, column j -> i * grid + j). The first D/2 dims encode the column
  (w) index, the second D/2 the row (h) index; with `cls_token` a leading zero row is added.
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                           indexing="ij")
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb


# ---------------------------------------------------------------------------------------------
# Parameter helpers.

def partitioned(initializer, names: Sequence[str | None]):
  return nn.with_logical_partitioning(initializer, tuple(names))


def flatten_for_matmul(x) -> bool:
  """Whether a [..., K] @ [K, N] product should run on x reshaped to [rows, K].

  On XLA CPU, yes: with more than one leading axis the kernel gradient contracts several axes, and
  XLA CPU canonicalises that by first writing the output gradient transposed ([N, rows]), a strided
  copy the matmul library then reads back (fwd+bwd of a ViT MLP on [4, 1025, 512]: 441 vs 339 ms;
  the ResNet-50 trunk's convolutions: docs/speed.md). GPU and TPU contract several axes natively,
  and there a reshape of an unaligned token axis can cost a relayout, so they keep the N-D form.
  """
  return x.ndim > 2 and jax.default_backend() == "cpu"


def matmul(x, kernel):
  """x [..., K] @ kernel [K, N], as one 2-D product where `flatten_for_matmul` says so."""
  if not flatten_for_matmul(x):
    return x @ kernel
  return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Dense):
  """nn.Dense (same parameters), run as a 2-D product where `flatten_for_matmul` says so."""

  def __call__(self, inputs):
    if not flatten_for_matmul(inputs):
      return super().__call__(inputs)
    rows = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return rows.reshape(*inputs.shape[:-1], self.features)


def dense(features: int, in_name: str | None, out_name: str | None, *, name: str, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=init.xavier_uniform()) -> Dense:
  """Dense with xavier-uniform kernel (MAE/timm-MAE init), zero bias and logical axis names."""
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
               kernel_init=partitioned(kernel_init, (in_name, out_name)),
               bias_init=partitioned(init.zeros, (out_name,)))


def layer_norm(name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm (eps 1e-6, scale 1, bias 0); statistics in float32 regardless of compute dtype."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(init.ones, ("norm",)),
                      bias_init=partitioned(init.zeros, ("norm",)))


def he_normal_conv():
  """torch's kaiming_normal_(mode='fan_out', nonlinearity='relu') as used by torchvision ResNets."""
  return init.variance_scaling(2.0, "fan_out", "normal")


def gelu(x):
  """Exact (erf) GELU as timm/torch compute it: x/2 (1 + erf(x/sqrt 2)), not Flax's tanh default.

  Written out rather than `nn.gelu(approximate=False)`, whose erfc form XLA CPU runs 1.8x slower
  (fwd+bwd of a [4100, 2048] activation: 71 vs 39 ms); the formula is torch's own CPU kernel's.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


# ---------------------------------------------------------------------------------------------
# torch-semantics BatchNorm over the last axis.

def batch_statistics(x):
  """Per-channel mean and biased variance of [..., C] over all other axes, in float32 (two-pass:
  no E[x^2] - E[x]^2 cancellation)."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axes)
  return mean, jnp.mean(jnp.square(xf - mean), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalise_with_batch_statistics(x, mean, var, scale, bias, epsilon: float):
  """Train-mode BN, (x - mean) / sqrt(var + eps) * scale + bias in float32, where `mean` and `var`
  MUST be `batch_statistics(x)`: the gradient treats them as functions of x (its part through
  them is folded into x's gradient; their own cotangents are zero - pass them stop-gradiented).

  Written with the closed-form backward (two reductions and one elementwise pass, like torch's
  batch_norm_backward) because autodiff of the two-pass statistics costs 1.5-1.7x more on CPU
  (fwd+bwd of BN + ReLU on [8, 32, 32, 256]: 7.1 vs 4.4 ms on two cores).
  """
  return _normalise_forward(x, mean, var, scale, bias, epsilon)[0]


def _normalise_forward(x, mean, var, scale, bias, epsilon):
  rstd = jax.lax.rsqrt(var + epsilon)
  multiplier = rstd * scale.astype(jnp.float32)
  y = (x.astype(jnp.float32) - mean) * multiplier + bias.astype(jnp.float32)
  return y, (x, mean, rstd, scale)


def _normalise_backward(epsilon, residuals, dy):
  del epsilon
  x, mean, rstd, scale = residuals
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  dy = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * x_hat, axes)
  dx = (scale.astype(jnp.float32) * rstd) * (dy - dbias / count - x_hat * (dscale / count))
  return (dx.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(rstd), dscale.astype(scale.dtype),
          dbias.astype(scale.dtype))


normalise_with_batch_statistics.defvjp(_normalise_forward, _normalise_backward)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-statistics semantics.

  train=True normalises with the batch mean and *biased* variance and updates the running
  statistics as torch does: running = (1 - momentum) * running + momentum * batch, with the
  *unbiased* variance (n / (n - 1)). Flax's nn.BatchNorm uses the biased one, hence this module.
  Under jit with a batch sharded over devices the reductions are over the global array, so the
  statistics are global (what torch's SyncBatchNorm would give).
  Variables: params {scale, bias}; batch_stats {mean, var}.
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = init.ones

  @nn.compact
  def __call__(self, x, *, train: bool):
    scale, bias, running_mean, running_var = self.declare(x.shape[-1])
    if train:
      mean, var = batch_statistics(jax.lax.stop_gradient(x))
      if not self.is_initializing():
        self.update_running(running_mean, running_var, mean, var, x.size // x.shape[-1])
      y = normalise_with_batch_statistics(x, mean, var, scale, bias, self.epsilon)
    else:
      y = _normalise_forward(x, running_mean.value, running_var.value, scale, bias, self.epsilon)[0]
    return y.astype(self.dtype)

  def declare(self, features: int):
    """params {scale, bias} and batch_stats {mean, var} (call from a compact method)."""
    scale = self.param("scale", partitioned(self.scale_init, ("norm",)), (features,), self.param_dtype)
    bias = self.param("bias", partitioned(init.zeros, ("norm",)), (features,), self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    return scale, bias, running_mean, running_var

  def update_running(self, running_mean, running_var, mean, var, count: int):
    m = self.momentum
    unbiased = var * (count / max(count - 1, 1))
    running_mean.value = (1 - m) * running_mean.value + m * mean
    running_var.value = (1 - m) * running_var.value + m * unbiased


# ---------------------------------------------------------------------------------------------
# Transformer pieces with timm's parameter layout (fused qkv, fc1/fc2, norm1/norm2).

def drop_path(x, rate, *, deterministic: bool, rng_owner: nn.Module):
  """Stochastic depth: drops whole residual branches per sample. `rate` may be traced (scan)."""
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  rng = rng_owner.make_rng("dropout")
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def softmax_attention(q, k, v, dtype: Dtype):
  """softmax(q k^T) v for head-major [B, heads, L, head_dim] inputs, softmax in float32.

  The normalisation is applied to the [L, head_dim] output rather than to the [L, L] weights
  (the max is a constant shift, so it carries no gradient): one pass less over the largest tensor
  forward and backward. With the head-major layout, MAE's 1025-token decoder attention runs
  1.15x faster fwd+bwd on 2 CPU cores than the token-major einsums (`benchmarks/attention.py`).
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  shifted = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", shifted.astype(dtype), v)
  return (out.astype(jnp.float32) / jnp.sum(shifted, axis=-1, keepdims=True)).astype(dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def cudnn_attention_supported(head_dim: int, dtype: Dtype) -> bool:
  """Whether cuDNN's fused (flash) attention can take this shape on the default backend: a GPU,
  bf16/fp16 compute, head_dim a multiple of 8 up to 128 (jax.nn.dot_product_attention's checks)."""
  return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def resolve_attention(implementation: str, head_dim: int, dtype: Dtype) -> str:
  """'xla' | 'cudnn' for a requested 'xla' | 'cudnn' | 'auto' (auto: cuDNN where it is supported)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r} is not known; valid choices: {ATTENTION_IMPLEMENTATIONS}")
  if implementation == "auto":
    return "cudnn" if cudnn_attention_supported(head_dim, dtype) else "xla"
  if implementation == "cudnn" and not cudnn_attention_supported(head_dim, dtype):
    raise ValueError(f"attention='cudnn' needs a GPU backend, bf16/fp16 compute and head_dim a multiple of 8 "
                     f"<= 128 (backend {jax.default_backend()!r}, dtype {jnp.dtype(dtype).name}, head_dim "
                     f"{head_dim}); use 'auto' to fall back to the XLA formulation")
  return implementation


def fused_attention(qkv, implementation: str | None = "cudnn"):
  """softmax(q k^T / sqrt(d)) v through jax.nn.dot_product_attention, for qkv [B, L, 3, heads, d].

  Token-major [B, L, heads, d] is the layout cuDNN's kernel takes, so q, k, v are plain slices (no
  transposes); returns [B, L, heads, d]. An odd L (a cls token + an even patch grid: 103, 1025) is
  padded by one token that the keys mask out (key_value_seq_lengths): jax's cuDNN training path
  refused odd lengths on an H200 ("Unsupported sequence length Q 103, KV 103"; its check treats
  every call as having a bias, which needs even lengths). The padded query row is dropped.
  `implementation` is jax's ('cudnn'; 'xla' lets tests check layout, scale and padding on a CPU).
  """
  batch, length, _, _, head_dim = qkv.shape
  padding = length % 2
  kv_lengths = None
  if padding:
    qkv = jnp.pad(qkv, [(0, 0), (0, padding), (0, 0), (0, 0), (0, 0)])
    kv_lengths = jnp.full((batch,), length, jnp.int32)
  q, k, v = (qkv[:, :, i] for i in range(3))
  out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, key_value_seq_lengths=kv_lengths,
                                     implementation=implementation)
  return out[:, :length]


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (D -> 3D, timm column order q|k|v).

  `attention` picks the kernel: 'xla' is `softmax_attention` (any backend and dtype); 'cudnn' is
  cuDNN's fused flash attention through jax.nn.dot_product_attention (GPU, bf16/fp16), which never
  materialises the [L, L] weights; 'auto' takes cuDNN where `cudnn_attention_supported`. The
  parameters are the same for all three, so checkpoints move freely between them.
  """
  num_heads: int
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, num_queries: int = 0):
    """[B, L, D] -> [B, L, D]; with num_queries > 0, [B, num_queries, D]: only the first num_queries
    tokens query (all L still serve as keys and values), e.g. the cls token of a last block whose
    other outputs nobody reads."""
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    queries = min(num_queries, length) if num_queries > 0 else length
    implementation = resolve_attention(self.attention, head_dim, self.dtype)
    # The fused output axis is laid out (3, heads, head_dim): 'heads' shards it over `tensor`.
    qkv = dense(3 * width, "embed", "heads", name="qkv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    qkv = nn.with_logical_constraint(qkv, ("act_batch", "act_length", None, "act_heads", "act_kv"))
    if implementation == "cudnn":
      out = fused_attention(qkv, "cudnn")[:, :queries]
    else:
      # Head-major q, k, v, each transposed on its own: measured 1.15x faster on XLA CPU than
      # einsums over the token-major layout, which put transpose copies in front of the matmuls.
      q, k, v = (qkv[:, :queries if i == 0 else length, i].transpose(0, 2, 1, 3) for i in range(3))
      q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
      out = softmax_attention(q, k, v, self.dtype).transpose(0, 2, 1, 3)
    out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = out.reshape(batch, queries, width)
    return dense(width, "heads", "embed", name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = dense(self.hidden, "embed", "mlp", name="fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h = nn.with_logical_constraint(gelu(h), ("act_batch", "act_length", "act_mlp"))
    return dense(width, "mlp", "embed", name="fc2", dtype=self.dtype, param_dtype=self.param_dtype)(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)). No LayerScale.

  `train` and `drop_rate` are attributes, not call arguments, so the block can be wrapped in
  nn.remat (which traces every call argument). Under scan a traced per-layer rate is passed in.
  """
  num_heads: int
  mlp_dim: int
  train: bool = False
  drop_rate: float = 0.0
  scan_form: bool = False    # nn.scan body: called (x, rate), returns (x, x or None)
  emit: bool = False         # scan form: also return the output (intermediates)
  stochastic: bool = False   # scan form: apply the scanned per-layer drop-path rate
  attention: str = "xla"     # Attention's implementation: 'xla' | 'cudnn' | 'auto'
  output_tokens: int = 0     # > 0: compute and return only the first output_tokens tokens (Attention's num_queries)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, traced_drop_rate=None):
    if self.scan_form:
      y = self._forward(x, traced_drop_rate if self.stochastic else None)
      return y, (y if self.emit else None)
    return self._forward(x, None)

  def _forward(self, x, traced_drop_rate):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rate = self.drop_rate if traced_drop_rate is None else traced_drop_rate
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    h = Attention(self.num_heads, self.attention, name="attn", **kw)(layer_norm("norm1", **kw)(x),
                                                                     num_queries=self.output_tokens)
    x = x[:, :h.shape[1]] + drop_path(h, rate, deterministic=not self.train, rng_owner=self)
    h = Mlp(self.mlp_dim, name="mlp", **kw)(layer_norm("norm2", **kw)(x))
    x = x + drop_path(h, rate, deterministic=not self.train, rng_owner=self)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class TransformerStack(nn.Module):
  """`depth` Blocks, either unrolled (`blocks_0`, `blocks_1`, ...) or scanned (`blocks` with a
  leading 'layers' axis). Returns (x, {layer index: output}) for the requested intermediates.

  With output_tokens > 0 only the first output_tokens tokens of the last block's output are
  returned. Unrolled, the last block then computes only those (they still attend to every token):
  a cls-pooled ViT-S/4 at 65 tokens skips ~6% of its blocks' FLOPs. A scanned stack runs one body
  for every layer, so it computes all tokens and slices."""
  depth: int
  num_heads: int
  mlp_dim: int
  scan: bool = False
  remat: str = "none"
  drop_path_rate: float = 0.0
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, intermediates: Sequence[int] | None = None, output_tokens: int = 0):
    for i in intermediates or ():
      if not -self.depth <= i < self.depth:
        raise ValueError(f"intermediate layer {i} is out of range for depth {self.depth}")
    wanted = sorted({i % self.depth for i in intermediates}) if intermediates else []
    # Linearly increasing stochastic-depth rates, as timm does.
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    kw = dict(attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
    outs = {}
    if self.scan:
      block = maybe_remat(Block, self.remat, prevent_cse=False)
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=0, length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, ys = stack(self.num_heads, self.mlp_dim, train=train, scan_form=True, emit=bool(wanted),
                    stochastic=self.drop_path_rate > 0, name="blocks", **kw)(x, jnp.asarray(rates, jnp.float32))
      for i in wanted:
        outs[i] = ys[i]
    else:
      block = maybe_remat(Block, self.remat)
      last = self.depth - 1
      for i in range(self.depth):
        shortcut = output_tokens if i == last and last not in wanted else 0
        x = block(self.num_heads, self.mlp_dim, train=train, drop_rate=float(rates[i]), output_tokens=shortcut,
                  name=f"blocks_{i}", **kw)(x)
        if i in wanted:
          outs[i] = x
    if output_tokens > 0:
      x = x[:, :output_tokens]
    return x, {i: outs[i % self.depth] for i in intermediates or ()}


# ---------------------------------------------------------------------------------------------
# Convolutions (ResNets and segmentation heads).

def conv(features: int, kernel: int, *, name: str, stride: int = 1, dilation: int = 1, use_bias: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> "Conv":
  """k x k conv with torch padding (dilation * (k // 2)), He (fan_out) init, logical axis names."""
  return Conv(features, kernel, stride=stride, dilation=dilation, use_bias=use_bias, dtype=dtype,
              param_dtype=param_dtype, name=name)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
  pad = dilation * (kernel // 2)
  return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def use_patch_matmul(height: int, width: int, kernel: int, stride: int, backend: str) -> bool:
  """Whether a k x k conv runs as patches @ kernel ("im2col") rather than XLA's convolution.

  Only on CPU, where XLA's convolution is slow for strided and small-map convolutions (measured,
  fwd+bwd, docs/speed.md: a 3x3 512->512 conv on 2x2 maps 88 ms vs 2.8 ms; stride 2 1.4-17x)
  and faster for stride-1 maps above 16 x 16. TPU/GPU convolutions are left to XLA. Also decides
  the ViT patch embedding (a stride-p p x p convolution).
  """
  if backend != "cpu":
    return False
  return kernel == 1 or stride > 1 or height * width <= 256


def patch_matmul_conv(x, kernel, stride: int, dilation: int):
  """[B, H, W, C] * [k, k, C, O] -> [B, H', W', O] as k*k strided slices concatenated on the channel
  axis, times the [k*k*C, O] kernel (torch padding dilation * (k // 2))."""
  k = kernel.shape[0]
  batch, height, width, channels = x.shape
  pad = dilation * (k // 2)
  out_h, out_w = (conv_output_size(n, k, stride, dilation) for n in (height, width))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
  taps = [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                        (batch, i * dilation + stride * (out_h - 1) + 1, j * dilation + stride * (out_w - 1) + 1,
                         channels), (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return matmul(patches, kernel.reshape(k * k * channels, -1))


class Conv(nn.Module):
  """k x k convolution, NHWC, torch padding; params `kernel` [k, k, C, O] and optional `bias` [O]
  (nn.Conv's names and layout, so checkpoints and export are unaffected by the implementation)."""
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    w = self.param("kernel", partitioned(he_normal_conv(), ("conv_height", "conv_width", "conv_in", "conv_out")),
                   (k, k, x.shape[-1], self.features), self.param_dtype)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if use_patch_matmul(x.shape[1], x.shape[2], k, self.stride, jax.default_backend()):
      y = patch_matmul_conv(x, w, self.stride, self.dilation)
    else:
      pad = self.dilation * (k // 2)
      y = jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                       rhs_dilation=(self.dilation, self.dilation),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", partitioned(init.zeros, ("conv_out",)), (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y


def resize_bilinear(x, height: int, width: int):
  """[B, h, w, C] -> [B, height, width, C]; half-pixel centres = torch align_corners=False.

  Upsampling only matches torch exactly (jax antialiases when downsampling, torch does not).
  """
  out = jax.image.resize(x.astype(jnp.float32), (x.shape[0], height, width, x.shape[-1]), "bilinear")
  return out.astype(x.dtype)
