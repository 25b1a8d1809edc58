"""Transformer pieces with timm's parameter layout (fused qkv, fc1/fc2, norm1/norm2): attention
(XLA's formulation and cuDNN's fused kernel), the MLP, the pre-norm block and the stack of blocks,
unrolled or scanned.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fmjax.kernels import cpu as cpu_kernels
from fmjax.models.layers import dense, einsum, gelu, layer_norm, maybe_remat

Dtype = Any


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
  logits = einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  shifted = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = einsum("bhqk,bhkd->bhqd", shifted.astype(dtype), v)
  return (out.astype(jnp.float32) / jnp.sum(shifted, axis=-1, keepdims=True)).astype(dtype)


# fmjax/kernels/attention.cc's limits: sequence length and head width.
KERNEL_MAX_LENGTH, KERNEL_MAX_HEAD_DIM = 256, 128


def use_attention_kernel(length: int, queries: int, head_dim: int, dtype: Dtype) -> bool:
  """The CPU attention kernel (fmjax/kernels/attention.cc) where it applies: float32, every token a
  query, L <= 256, head_dim a multiple of 16 up to 128, and `cpu_kernels.kernels_available()` (one
  CPU device with AVX-512, a compiler on the host, not switched off)."""
  return (queries == length and length <= KERNEL_MAX_LENGTH and head_dim % 16 == 0
          and head_dim <= KERNEL_MAX_HEAD_DIM and jnp.dtype(dtype) == jnp.float32
          and cpu_kernels.kernels_available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def attention_kernel(qkv, bias, scale: float):
  """softmax(scale q k^T) v with q | k | v = qkv + bias, for qkv [B, L, 3, heads, d] (the projection
  before its bias) and bias [3, heads, d] -> [B, L, heads, d], in one CPU kernel: the same maths as
  `softmax_attention` on the transposed q, k, v."""
  return _attention_kernel_call(qkv, bias, scale)[0]


def _attention_kernel_call(qkv, bias, scale):
  batch, length, _, heads, head_dim = qkv.shape
  shapes = (jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, length, 2), jnp.float32))
  return jax.ffi.ffi_call("fmjax_attention", shapes, vmap_method="sequential")(qkv, bias, scale=np.float32(scale))


def _attention_kernel_fwd(qkv, bias, scale):
  # The output and each query's softmax statistics are saved; the backward kernel forms the weights again.
  out, stats = _attention_kernel_call(qkv, bias, scale)
  return out, (qkv, bias, out, stats)


def _attention_kernel_bwd(scale, residuals, grad_out):
  qkv, bias, out, stats = residuals
  grad = jax.ffi.ffi_call("fmjax_attention_backward", jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                          vmap_method="sequential")(qkv, bias, out, stats, grad_out, scale=np.float32(scale))
  return grad, jnp.sum(grad, axis=(0, 1))


attention_kernel.defvjp(_attention_kernel_fwd, _attention_kernel_bwd)


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

  `attention` picks the kernel: 'xla' is `softmax_attention` (any backend and dtype), or on one
  AVX-512 CPU device `attention_kernel` where `use_attention_kernel` says so; 'cudnn' is cuDNN's
  fused flash attention through jax.nn.dot_product_attention (GPU, bf16/fp16), which never
  materialises the [L, L] weights; 'auto' takes cuDNN where `cudnn_attention_supported`. The
  parameters are the same for all of them, so checkpoints move freely between them.
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
    kernel = implementation == "xla" and use_attention_kernel(length, queries, head_dim, self.dtype)
    # The fused output axis is laid out (3, heads, head_dim): 'heads' shards it over `tensor`.
    qkv = dense(3 * width, "embed", "heads", name="qkv", dtype=self.dtype, param_dtype=self.param_dtype,
                bias_apart=kernel)(x)
    if kernel:   # the kernel adds the bias as it reads q, k and v
      qkv, bias = qkv
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    qkv = nn.with_logical_constraint(qkv, ("act_batch", "act_length", None, "act_heads", "act_kv"))
    if implementation == "cudnn":
      out = fused_attention(qkv, "cudnn")[:, :queries]
    elif kernel:
      out = attention_kernel(qkv, bias.reshape(3, self.num_heads, head_dim), head_dim ** -0.5)
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
