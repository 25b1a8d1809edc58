"""The SpectralEarth spectral adapter: three 1-D convolutions along the band axis, each followed by
BatchNorm and ReLU, then a mean over the remaining spectral positions.

The official module is a Conv3d stack with (k, 1, 1) kernels on [B, 1, C, H, W]. Such kernels
never mix pixels, so the same maths is a 1-D convolution over the band axis applied to every pixel.
We write it as "unfold + matmul": the k-wide windows of the band axis laid out along a window
axis, then one matmul with the [k * c_in, c_out] kernel. XLA CPU runs this ~4x faster than its
Conv3d lowering (REFERENCE.md) and it shards like any dense layer. Layers 1 and 2 go further
(`SpectralAdapter._first_two_layers`): layer 1's BatchNorm is folded into its weights from the
covariance of its 7 input taps, its bias rides along as an eighth tap that is constant 1, and
layer 1 is evaluated straight into layer 2's windows, so its 1280-wide output is never
normalised, masked, unfolded or folded back in a separate pass. On a single AVX-512 CPU device, layers
1-3 run as hand-written kernels instead (`layers12_kernel` and `layer3_kernel`, fmjax/kernels/: the
same maths, with layer 1's output and layer 3's windows kept in cache, forward and backward), and
bn_1's batch statistics come from the bands' centred moments (`window_moments`, a kernel too) instead
of unfolded and centred copies of layer 1's windows; elsewhere, and on TPU and GPU, as the XLA ops
below.

Layer geometry (official): kernels 7/7/5, strides 5/5/3, padding 1, channels 1->32->64->128;
202 bands -> 40 -> 8 -> 2 -> mean -> 128 features per pixel. 56,192 parameters.
Submodule names mirror the torch nn.Sequential indices: conv_0, bn_1, conv_3, bn_4, conv_6, bn_7.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from fmjax.kernels import cpu as cpu_kernels
from fmjax.models.layers import BatchNorm, einsum, partitioned

Dtype = Any

# (kernel, stride, padding, out_channels) of the official adapter.
ADAPTER_LAYERS: tuple[tuple[int, int, int, int], ...] = ((7, 5, 1, 32), (7, 5, 1, 64), (5, 3, 1, 128))
MIN_BANDS = 75   # the smallest band count for which every layer still has >= 1 output position


def conv_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
  return (length + 2 * padding - kernel) // stride + 1


def spectral_lengths(num_bands: int, layers=ADAPTER_LAYERS) -> list[int]:
  """Band-axis lengths through the adapter, e.g. 202 -> [202, 40, 8, 2]."""
  lengths = [num_bands]
  for kernel, stride, padding, _ in layers:
    lengths.append(conv_out_length(lengths[-1], kernel, stride, padding))
  return lengths


def unfold_bands(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """[..., L, c] -> [..., L_out, kernel, c]: the zero-padded windows of a strided 1-D conv.

  Built from `kernel` strided slices rather than a gather: XLA CPU fuses the previous layer's
  BatchNorm and ReLU into either, and computes the gather's indices element by element (layer 3's
  windows at [16, 32, 32, 8, 64], forward: 10-11 ms as a jnp.take, 4-8 ms as slices).
  """
  length = x.shape[-2]
  out_len = conv_out_length(length, kernel, stride, padding)
  pad = [(0, 0)] * (x.ndim - 2) + [(padding, padding), (0, 0)]
  xp = jnp.pad(x, pad)
  taps = [jax.lax.slice_in_dim(xp, j, j + stride * (out_len - 1) + 1, stride, axis=x.ndim - 2)
          for j in range(kernel)]
  return jnp.stack(taps, axis=-2)


def _weight_gradient(rows: jax.Array, grad_rows: jax.Array) -> jax.Array:
  """[K, N] = rows[M, K]^T @ grad_rows[M, N] over millions of rows M, transposing the smaller side
  (XLA CPU would transpose whichever its layout pass picks, often the larger one). Accumulates in
  float32 even for bf16 activations."""
  if rows.shape[1] <= grad_rows.shape[1]:
    return jnp.matmul(rows.T, grad_rows, preferred_element_type=jnp.float32)
  return jnp.matmul(grad_rows.T, rows, preferred_element_type=jnp.float32).T


@jax.custom_vjp
def pixel_matmul(x: jax.Array, weights: jax.Array) -> jax.Array:
  """[..., K] x [K, N] -> [..., N] for a small weight applied to every pixel (and position).

  The backward pass is written by hand because autodiff's weight gradient contracts over every
  pixel and spectral position with both operands in their forward layout, and XLA CPU then
  transposes the largest activation (e.g. the [B*H*W*40, 32] gradient of layer 1) before the
  matmul: 0.46 s of a 2.2 s adapter step at batch 4 x 128 px. Here the smaller side of the
  contraction is the one transposed (`python -m benchmarks.adapter` measures the difference).
  """
  return einsum("...k,kn->...n", x, weights)


def _pixel_matmul_fwd(x, weights):
  return pixel_matmul(x, weights), (x, weights)


def _pixel_matmul_bwd(residuals, grad_out):
  x, weights = residuals
  depth, width = weights.shape
  grad_w = _weight_gradient(x.reshape(-1, depth), grad_out.reshape(-1, width).astype(x.dtype))
  grad_x = einsum("...n,kn->...k", grad_out, weights).astype(x.dtype)
  return grad_x, grad_w.astype(weights.dtype)


pixel_matmul.defvjp(_pixel_matmul_fwd, _pixel_matmul_bwd)


class BandConvWeights(nn.Module):
  """The kernel [kernel, c_in, features] and bias of one band-axis convolution (torch's init)."""
  features: int
  kernel: int
  in_features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    # torch's Conv3d default init is kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weights
    # and bias alike; fan_in = c_in * kernel.
    bound = (self.in_features * self.kernel) ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    w = self.param("kernel", partitioned(uniform, ("conv_kernel", "conv_in", "conv_out")),
                   (self.kernel, self.in_features, self.features), self.param_dtype)
    b = self.param("bias", partitioned(uniform, ("conv_out",)), (self.features,), self.param_dtype)
    return w, b


class FoldedBatchNorm(BatchNorm):
  """The first BatchNorm of the adapter, folded into the convolution before it.

  Same variables and semantics as `BatchNorm` (torch train/eval statistics, momentum, unbiased
  running variance), but it is handed the *statistics* of the convolution's output rather than the
  output itself, and returns the per-channel (multiplier, offset) that BN applies, so the caller can
  fold them into the convolution's weights and bias.
  """

  @nn.compact
  def __call__(self, batch_mean, batch_var, count: int, *, train: bool):
    scale, bias, running_mean, running_var = self.declare(batch_mean.shape[-1])
    if train:
      mean, var = batch_mean, batch_var
      if not self.is_initializing():
        self.update_running(running_mean, running_var, mean, var, count)
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    return multiplier, bias.astype(jnp.float32) - mean * multiplier


def first_layer_windows(num_bands: int, first, second) -> tuple[np.ndarray, np.ndarray, int]:
  """Band indices [L2, k2, k1] of layer 1's input taps at every position layer 2's windows read,
  into the band axis zero-padded on the left by the returned `pad_left`, and the [L2, k2] mask of
  window positions that are layer 2's zero padding rather than a layer-1 output.

  Layer 1 is evaluated directly at layer 2's window positions (1.4x its outputs, overlapping
  windows recompute 2 of every 7), so no unfolded copy of its 1280-wide output is ever made:
  its result is already the [pixels * L2, k2 * 32] matrix layer 2 multiplies.
  """
  k1, s1, p1, _ = first
  k2, s2, p2, _ = second
  n1 = conv_out_length(num_bands, k1, s1, p1)
  n2 = conv_out_length(n1, k2, s2, p2)
  o1 = s2 * np.arange(n2)[:, None] - p2 + np.arange(k2)[None, :]               # [n2, k2]
  valid = (o1 >= 0) & (o1 < n1)
  bands = s1 * o1[..., None] - p1 + np.arange(k1)                                 # [n2, k2, k1]
  pad_left = int(max(0, -bands.min()))
  return bands + pad_left, valid, pad_left


class SpectralAdapter(nn.Module):
  """[B, H, W, C] (channels last, any C >= 75) -> [B, H, W, 128].

  BatchNorm statistics live in the 'batch_stats' collection; apply with
  `mutable=['batch_stats']` when train=True.

  Layers 1 and 2 are computed together (the adapter's memory traffic is most of its cost on CPU):
  layer 1 has a single input channel, so its BatchNorm statistics follow exactly from the 7x7
  covariance of its input windows (mean = E[u] w + b, var = w^T Cov(u) w per channel) and BN folds
  into its weights; and it is evaluated at layer 2's window positions (`first_layer_windows`).
  The maths is the official Conv3d/BN3d/ReLU stack's (tests compare against torch).
  """
  layers: Sequence[tuple[int, int, int, int]] = ADAPTER_LAYERS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def out_channels(self) -> int:
    return self.layers[-1][3]

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4:
      raise ValueError(f"SpectralAdapter expects [B, H, W, C] channels-last input, got shape {x.shape}")
    lengths = spectral_lengths(x.shape[-1], self.layers)
    if min(lengths) < 1:
      raise ValueError(f"SpectralAdapter needs at least {MIN_BANDS} bands, got {x.shape[-1]} "
                       f"(band-axis lengths would be {lengths})")
    if len(self.layers) < 2:
      raise ValueError(f"SpectralAdapter needs at least two layers, got {list(self.layers)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    weights = []
    in_features = 1
    for i, (kernel, _, _, features) in enumerate(self.layers):
      weights.append(BandConvWeights(features, kernel, in_features, param_dtype=self.param_dtype,
                                     name=f"conv_{3 * i}")())
      in_features = features
    h = self._first_two_layers(x, weights[0], weights[1], train=train)
    for i in range(2, len(self.layers)):
      kernel, stride, padding, _ = self.layers[i]
      w, b = weights[i]
      before = f"bn_{3 * i - 2}"   # the BatchNorm after the previous layer (Sequential index 4 for layer 3)
      if i == 2 and use_layer3_kernel(self.layers[2], h, self.dtype):
        h = self._third_layer_kernel(h, w, b, name=before, train=train)
        continue
      h = nn.relu(BatchNorm(**kw, name=before)(h, train=train))
      windows = unfold_bands(h, kernel, stride, padding)   # saved by pixel_matmul for its backward
      windows = windows.reshape(windows.shape[:-2] + (kernel * windows.shape[-1],))
      h = pixel_matmul(windows, w.reshape(-1, w.shape[-1]).astype(self.dtype)) + b.astype(self.dtype)
    h = nn.relu(BatchNorm(**kw, name=f"bn_{3 * len(self.layers) - 2}")(h, train=train))
    h = jnp.mean(h.astype(jnp.float32), axis=-2).astype(self.dtype)  # mean over remaining positions
    return nn.with_logical_constraint(h, ("act_batch", "act_height", "act_width", "act_channels"))

  def _third_layer_kernel(self, h2, w, b, *, name: str, train: bool):
    """bn_4 -> ReLU -> conv_6 (before bn_7) as the CPU kernel: [B, H, W, L2, 64] -> [B, H, W, L3, 128].
    bn_4's batch statistics come from all of h2 first; the kernel applies them as a multiplier and offset."""
    flat = h2.reshape((-1,) + h2.shape[-2:])
    count = flat.shape[0] * flat.shape[1]
    if train:
      batch_mean = jnp.mean(flat, axis=(0, 1))
      batch_var = jnp.mean(jnp.square(flat - batch_mean), axis=(0, 1))
    else:
      batch_mean = batch_var = jnp.zeros(flat.shape[-1:], jnp.float32)   # unused: eval uses running stats
    multiplier, offset = FoldedBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
        batch_mean, batch_var, count, train=train)
    h3 = layer3_kernel(flat, multiplier, offset, w.reshape(-1, w.shape[-1]).astype(jnp.float32),
                       b.astype(jnp.float32))
    return h3.reshape(h2.shape[:-2] + h3.shape[-2:])

  def _first_two_layers(self, x, first_weights, second_weights, *, train: bool):
    """conv_0 -> bn_1 -> ReLU -> conv_3 (before bn_4): [B, H, W, C] -> [B, H, W, L2, 64]."""
    (k1, s1, p1, c1), (k2, _, _, c2) = self.layers[0], self.layers[1]
    w1, b1 = first_weights
    w1 = w1[:, 0, :].astype(jnp.float32)                                          # [k1, c1]
    num_bands = x.shape[-1]
    geometry = layer1_tap_geometry(num_bands, self.layers[0], self.layers[1])

    # bn_1's batch statistics of conv_0's output, from the moments of its input windows.
    count = int(np.prod(x.shape[:3])) * conv_out_length(num_bands, k1, s1, p1)
    if train:
      if use_moments_kernel(x):
        tap_mean, tap_cov = window_moments(x.reshape(-1, num_bands), k1, s1, p1)
      else:
        tap_mean, tap_cov = _window_moments_xla(x.astype(jnp.float32), k1, s1, p1)
      batch_mean = tap_mean @ w1 + b1.astype(jnp.float32)
      batch_var = jnp.einsum("kc,kj,jc->c", w1, tap_cov, w1)
    else:
      batch_mean = batch_var = jnp.zeros((c1,), jnp.float32)   # unused: eval uses running stats
    multiplier, offset = FoldedBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn_1")(
        batch_mean, batch_var, count, train=train)
    folded_w = w1 * multiplier
    folded_b = b1.astype(jnp.float32) * multiplier + offset
    folded = jnp.concatenate([folded_w, folded_b[None]], axis=0).astype(self.dtype)   # [k1 + 1, c1]
    w2, b2 = second_weights
    w2 = w2.reshape(k2 * c1, c2).astype(self.dtype)
    b2 = b2.astype(self.dtype)
    positions = geometry.tap_index.shape[0]
    if use_layers12_kernel(self.layers, x.dtype, self.dtype, geometry):
      h2 = layers12_kernel(x.reshape(-1, num_bands), folded, w2, b2, geometry)
      return h2.reshape(x.shape[:3] + (positions, c2))
    taps = layer1_taps(x.astype(self.dtype), geometry)                            # [B, H, W, L2, k2, k1 + 1]
    h1 = nn.relu(pixel_matmul(taps, folded))                                     # [B, H, W, L2, k2, c1]
    h1 = h1.reshape(x.shape[:3] + (positions, k2 * c1))
    return pixel_matmul(h1, w2) + b2


def _window_moments_xla(x, kernel: int, stride: int, padding: int):
  """The mean [k] and covariance [k, k] of the k-wide windows of x's last axis, over every window of
  every pixel (zero padding included): from the unfolded windows, centred."""
  windows = unfold_bands(x[..., None], kernel, stride, padding)[..., 0]        # [..., L1, k]
  tap_mean = jnp.mean(windows, axis=tuple(range(windows.ndim - 1)))
  centred = (windows - tap_mean).reshape(-1, kernel)
  count = centred.shape[0]
  return tap_mean, jnp.matmul(centred.T, centred) / float(count)   # a Python int > 2^31 would not fit int32


def use_moments_kernel(x) -> bool:
  """The CPU kernel for bn_1's statistics (fmjax/kernels/column_moments.cc) where it applies: float32
  input and `cpu_kernels.kernels_available()`."""
  return jnp.dtype(x.dtype) == jnp.float32 and cpu_kernels.kernels_available()


def column_moments(x2d, lags: int):
  """[rows, C] float32 -> (mean [C], lag covariances [C, lags]): mean_j and
  sum_r (x_rj - mean_j)(x_r(j+d) - mean_(j+d)) / rows (0 past the last column), by the CPU kernel."""
  columns = x2d.shape[1]
  return jax.ffi.ffi_call("fmjax_column_moments",
                          (jax.ShapeDtypeStruct((columns,), jnp.float32),
                           jax.ShapeDtypeStruct((columns, lags), jnp.float32)),
                          vmap_method="sequential")(x2d, lags=np.int64(lags))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def window_moments(x2d, kernel: int, stride: int, padding: int):
  """`_window_moments_xla` of [pixels, C] from the bands' means and lag covariances (`column_moments`):
  with m_j a band's mean, mu_a tap a's mean over positions and delta = m_j(pos, a) - mu_a,
  Cov(a, b) = mean over positions of [LagCov(j_a, j_b - j_a) + delta_a delta_b] (the cross terms vanish:
  every band is centred on its own mean), without unfolding the windows."""
  band_mean, lag_cov = column_moments(x2d, kernel)
  num_bands = x2d.shape[1]
  positions = conv_out_length(num_bands, kernel, stride, padding)
  band = stride * np.arange(positions)[:, None] - padding + np.arange(kernel)[None, :]   # [L1, k]
  valid = (band >= 0) & (band < num_bands)
  safe = np.where(valid, band, 0)
  means = jnp.where(valid, band_mean[safe], 0.0)                                 # [L1, k] (padding: 0)
  tap_mean = jnp.mean(means, axis=0)
  delta = means - tap_mean
  low = np.minimum(band[:, :, None], band[:, None, :])                           # [L1, k, k]
  lag = np.abs(band[:, :, None] - band[:, None, :])
  pair_valid = valid[:, :, None] & valid[:, None, :]
  within = jnp.where(pair_valid, lag_cov[np.where(pair_valid, low, 0), lag], 0.0)
  tap_cov = jnp.mean(within + delta[:, :, None] * delta[:, None, :], axis=0)
  return tap_mean, tap_cov


def _window_moments_fwd(x2d, kernel, stride, padding):
  return window_moments(x2d, kernel, stride, padding), x2d


def _window_moments_bwd(kernel, stride, padding, x2d, grads):
  """Through the XLA formulation: XLA removes it as dead code when the input is data (training)."""
  _, vjp = jax.vjp(lambda x: _window_moments_xla(x, kernel, stride, padding), x2d)
  return vjp(grads)


window_moments.defvjp(_window_moments_fwd, _window_moments_bwd)


@dataclasses.dataclass(frozen=True, eq=False)
class TapGeometry:
  """Where layer 1's taps come from: tap_index [L2, k2, k1 + 1] into the band axis padded with
  `pad_left` zeros on the left and zeros up to `padded`, then a constant-1 column (index `padded`:
  each window's bias tap) and a 0 column (`padded + 1`: every tap of a window that is layer 2's zero
  padding, so its ReLU output is exactly 0). Hashable: a static argument of the kernel's custom VJP."""
  tap_index: np.ndarray
  pad_left: int
  padded: int

  def _key(self):
    return self.tap_index.tobytes(), self.tap_index.shape, self.pad_left, self.padded

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, TapGeometry) and self._key() == other._key()


def layer1_tap_geometry(num_bands: int, first, second) -> TapGeometry:
  band_index, valid, pad_left = first_layer_windows(num_bands, first, second)
  pad_right = int(max(0, band_index.max() + 1 - (num_bands + pad_left)))
  padded = num_bands + pad_left + pad_right
  tap_index = np.concatenate([band_index, np.full(band_index.shape[:2] + (1,), padded)], axis=-1)
  tap_index = np.where(valid[..., None], tap_index, padded + 1).astype(np.int32)
  return TapGeometry(tap_index, pad_left, padded)


def layer1_taps(x: jax.Array, geometry: TapGeometry) -> jax.Array:
  """[..., C] -> [..., L2, k2, k1 + 1]: layer 1's input taps at every window position of layer 2."""
  column = lambda value, width: jnp.full(x.shape[:-1] + (width,), value, x.dtype)
  pad_right = geometry.padded - geometry.pad_left - x.shape[-1]
  xp = jnp.concatenate([column(0, geometry.pad_left), x, column(0, pad_right), column(1, 1), column(0, 1)],
                       axis=-1)
  taps = jnp.take(xp, jnp.asarray(geometry.tap_index.reshape(-1)), axis=-1)
  return taps.reshape(x.shape[:-1] + geometry.tap_index.shape)


# The kernels' compiled-in layer shapes (fmjax/kernels/adapter_layers12.cc, adapter_layer3.cc) and
# buffer limits.
KERNEL_LAYERS = ADAPTER_LAYERS[:2]
KERNEL_LAYER3 = ADAPTER_LAYERS[2]
KERNEL_MAX_POSITIONS, KERNEL_MAX_PADDED = 64, 1024


def use_layers12_kernel(layers, input_dtype, dtype, geometry: TapGeometry) -> bool:
  """The CPU kernels for layers 1-2 (fmjax/kernels/adapter_layers12.cc) where they apply: float32, the
  official kernels/strides/channels of layers 1-2, and `cpu_kernels.kernels_available()` (one CPU
  device with AVX-512, a compiler on the host, not switched off)."""
  return (tuple(layers[:2]) == KERNEL_LAYERS and jnp.dtype(dtype) == jnp.float32
          and jnp.dtype(input_dtype) == jnp.float32 and geometry.tap_index.shape[0] <= KERNEL_MAX_POSITIONS
          and geometry.padded + 2 <= KERNEL_MAX_PADDED and cpu_kernels.kernels_available())


def use_layer3_kernel(layer, h2, dtype) -> bool:
  """The CPU kernels for bn_4, ReLU and layer 3 (fmjax/kernels/adapter_layer3.cc) where they apply:
  float32, the official layer 3 after 64 channels, and `cpu_kernels.kernels_available()`."""
  return (tuple(layer) == KERNEL_LAYER3 and h2.shape[-1] == 64 and 3 <= h2.shape[-2] <= KERNEL_MAX_POSITIONS
          and jnp.dtype(dtype) == jnp.float32 and h2.dtype == jnp.float32 and cpu_kernels.kernels_available())


def _kernel_attributes(geometry: TapGeometry) -> dict:
  return dict(pad_left=np.int64(geometry.pad_left), padded=np.int64(geometry.padded))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def layers12_kernel(x2d, folded, w2, b2, geometry: TapGeometry):
  """[pixels, C] -> [pixels, L2, 64]: layer 1 (BatchNorm folded, bias as its last tap), ReLU, layer 2
  and its bias, in one CPU kernel; the same maths as the XLA formulation in `_first_two_layers`."""
  out = jax.ShapeDtypeStruct((x2d.shape[0], geometry.tap_index.shape[0], w2.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("fmjax_adapter_layers12", out, vmap_method="sequential")(
      x2d, jnp.asarray(geometry.tap_index.reshape(-1)), folded, w2, b2, **_kernel_attributes(geometry))


def _layers12_kernel_fwd(x2d, folded, w2, b2, geometry):
  # Nothing but the inputs is saved: the backward kernel evaluates layer 1 again, in cache.
  return layers12_kernel(x2d, folded, w2, b2, geometry), (x2d, folded, w2)


def _layers12_kernel_bwd(geometry, residuals, grad_out):
  x2d, folded, w2 = residuals
  grad_folded, grad_w2 = jax.ffi.ffi_call(
      "fmjax_adapter_layers12_backward",
      (jax.ShapeDtypeStruct(folded.shape, jnp.float32), jax.ShapeDtypeStruct(w2.shape, jnp.float32)),
      vmap_method="sequential")(
          x2d, jnp.asarray(geometry.tap_index.reshape(-1)), folded, w2, grad_out, **_kernel_attributes(geometry))
  grad_b2 = jnp.sum(grad_out.reshape(-1, w2.shape[1]), axis=0)
  return _layers12_input_gradient(x2d, folded, w2, grad_out, geometry), grad_folded, grad_w2, grad_b2


def _layers12_input_gradient(x2d, folded, w2, grad_out, geometry: TapGeometry):
  """The gradient for the adapter's input in XLA ops, which XLA removes as dead code when the input is
  data (training): only a program that differentiates by the input itself (saliency) runs it."""
  taps, taps_vjp = jax.vjp(lambda x: layer1_taps(x, geometry), x2d)
  h1 = jnp.matmul(taps, folded)                                                   # [P, L2, k2, c1]
  grad_h1 = jnp.matmul(grad_out, w2.T).reshape(h1.shape) * (h1 > 0)
  return taps_vjp(jnp.matmul(grad_h1, folded.T))[0]


layers12_kernel.defvjp(_layers12_kernel_fwd, _layers12_kernel_bwd)


@jax.custom_vjp
def layer3_kernel(h2, multiplier, offset, w3, b3):
  """[pixels, L2, 64] -> [pixels, L3, 128]: relu(h2 * multiplier + offset) (bn_4 with its statistics
  given, and its ReLU), then layer 3 (kernel 5, stride 3, padding 1) and its bias, in one CPU kernel."""
  positions3 = conv_out_length(h2.shape[1], *KERNEL_LAYER3[:3])
  out = jax.ShapeDtypeStruct((h2.shape[0], positions3, w3.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("fmjax_adapter_layer3", out, vmap_method="sequential")(h2, multiplier, offset, w3, b3)


def _layer3_kernel_fwd(h2, multiplier, offset, w3, b3):
  return layer3_kernel(h2, multiplier, offset, w3, b3), (h2, multiplier, offset, w3)


def _layer3_kernel_bwd(residuals, grad_out):
  h2, multiplier, offset, w3 = residuals
  shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (h2, multiplier, offset, w3)]
  grad_h2, grad_multiplier, grad_offset, grad_w3 = jax.ffi.ffi_call(
      "fmjax_adapter_layer3_backward", shapes, vmap_method="sequential")(h2, multiplier, offset, w3, grad_out)
  grad_b3 = jnp.sum(grad_out.reshape(-1, w3.shape[1]), axis=0)
  return grad_h2, grad_multiplier, grad_offset, grad_w3, grad_b3


layer3_kernel.defvjp(_layer3_kernel_fwd, _layer3_kernel_bwd)
