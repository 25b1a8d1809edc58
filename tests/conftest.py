"""Test-wide setup: eight fake CPU devices so multi-device code runs here like on a pod slice."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402  (after the environment above, which jax reads on import)

from fmjax.kernels import cpu as cpu_kernels  # noqa: E402

requires_cpu_kernels = pytest.mark.skipif(not (cpu_kernels.host_has_avx512() and cpu_kernels.find_compiler()),
                                          reason="the CPU kernels need an AVX-512 CPU and a C++ compiler")


@pytest.fixture
def kernels_on():
  """The suite's 8 fake devices keep the CPU kernels off by default; tests that take this switch them on."""
  with cpu_kernels.kernels_enabled(True):
    assert cpu_kernels.kernels_available(), "the CPU kernels did not compile on this host"
    yield
