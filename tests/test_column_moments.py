"""The CPU kernel for the spectral adapter's bn_1 statistics (fmjax/kernels/column_moments.cc) against
float64 numpy, and `window_moments` built on it against numpy and its XLA formulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import spectral_adapter

from tests.conftest import requires_cpu_kernels

pytestmark = requires_cpu_kernels


def _numpy_moments(x, lags):
  x = x.astype(np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  columns = x.shape[1]
  products = np.zeros((columns, lags))
  for d in range(lags):
    products[:columns - d, d] = (centred[:, :columns - d] * centred[:, d:]).mean(axis=0)
  return mean, products


@pytest.mark.parametrize("rows,columns,lags,offset", [
    (1000, 202, 7, 0.0),     # bn_1: EnMAP's bands, lags up to layer 1's kernel
    (333, 75, 7, 1e4),       # rows not a multiple of the chunk; a mean 1e4 times the spread
    (20000, 64, 1, 3.0),     # variances only (lag 0)
    (17, 13, 3, 0.5),        # fewer columns than one vector
])
def test_column_moments_match_float64(kernels_on, rows, columns, lags, offset):
  rng = np.random.default_rng(rows)
  x = (rng.standard_normal((rows, columns)) * rng.uniform(0.5, 2.0, columns) + offset
       + rng.standard_normal(columns)).astype(np.float32)
  mean, products = jax.jit(lambda a: spectral_adapter.column_moments(a, lags))(x)
  ref_mean, ref_products = _numpy_moments(x, lags)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6 * np.abs(ref_mean).max())
  # Centred: the products keep float32 precision even where the mean is 1e4 times the spread.
  np.testing.assert_allclose(products, ref_products, rtol=0, atol=2e-6 * np.abs(ref_products).max())


def _numpy_window_moments(x, kernel, stride, padding):
  padded = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(padding, padding)])
  positions = spectral_adapter.conv_out_length(x.shape[-1], kernel, stride, padding)
  starts = stride * np.arange(positions)
  windows = np.stack([padded[..., s:s + kernel] for s in starts], axis=-2).reshape(-1, kernel)
  return windows.mean(axis=0), np.cov(windows.T, bias=True)


@pytest.mark.parametrize("bands", [202, 150, 75])
def test_window_moments_match_float64_and_the_xla_formulation(kernels_on, bands):
  """bn_1's statistics of layer 1's [7]-tap windows (stride 5, padding 1), zero padding included."""
  rng = np.random.default_rng(bands)
  x = (rng.standard_normal((2, 3, 4, bands)) * 2.0 + 5.0 + np.linspace(0, 3, bands)).astype(np.float32)
  mean, cov = jax.jit(lambda a: spectral_adapter.window_moments(a.reshape(-1, bands), 7, 5, 1))(x)
  ref_mean, ref_cov = _numpy_window_moments(x, 7, 5, 1)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
  np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=2e-6 * np.abs(ref_cov).max())

  def loss(moments, a):
    m, c = moments(a)
    return jnp.sum(jnp.sin(c)) + jnp.sum(m ** 2)
  kernel_grad = jax.grad(lambda a: loss(lambda y: spectral_adapter.window_moments(y.reshape(-1, bands), 7, 5, 1), a))(x)
  xla_grad = jax.grad(lambda a: loss(lambda y: spectral_adapter._window_moments_xla(y, 7, 5, 1), a))(x)
  np.testing.assert_allclose(kernel_grad, xla_grad, rtol=0, atol=1e-5 * np.abs(xla_grad).max())


def test_column_moments_refuse_bad_arguments(kernels_on):
  with pytest.raises(Exception, match="lags must be in"):
    jax.block_until_ready(spectral_adapter.column_moments(jnp.ones((4, 8)), 17))
