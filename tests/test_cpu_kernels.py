"""fmjax.kernels.cpu: building, caching and switching the CPU kernels (their numbers are tested against
torch in tests/test_models_adapter.py)."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from fmjax.kernels import cpu as cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_compiler = pytest.mark.skipif(cpu_kernels.find_compiler() is None, reason="no C++ compiler on this host")
needs_kernels = pytest.mark.skipif(not (cpu_kernels.host_has_avx512() and cpu_kernels.find_compiler()),
                                   reason="the adapter kernels need an AVX-512 CPU and a C++ compiler")


@needs_compiler
def test_compile_library_caches_by_source(tmp_path, capsys):
  source = tmp_path / "probe.cc"
  source.write_text('extern "C" int fmjax_probe() { return 7; }\n')
  compiler = cpu_kernels.find_compiler()
  built = cpu_kernels.compile_library([source], "probe", compiler, tmp_path / "cache")
  first_mtime = built.stat().st_mtime_ns
  # The build says so once, naming the library it writes; a cached load is silent.
  assert capsys.readouterr().err == (f"fmjax: compiling the CPU kernel library {built} "
                                     "(once per CPU and source version)\n")
  assert cpu_kernels.compile_library([source], "probe", compiler, tmp_path / "cache") == built
  assert built.stat().st_mtime_ns == first_mtime          # not rebuilt
  assert capsys.readouterr().err == ""
  import ctypes
  assert ctypes.CDLL(str(built)).fmjax_probe() == 7
  source.write_text('extern "C" int fmjax_probe() { return 8; }\n')
  rebuilt = cpu_kernels.compile_library([source], "probe", compiler, tmp_path / "cache")
  assert rebuilt != built and ctypes.CDLL(str(rebuilt)).fmjax_probe() == 8
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([built.name, rebuilt.name])


@needs_compiler
def test_compile_errors_carry_the_compilers_message(tmp_path):
  source = tmp_path / "broken.cc"
  source.write_text("int broken( {\n")
  with pytest.raises(RuntimeError, match=r"compiling broken \(broken.cc\) failed"):
    cpu_kernels.compile_library([source], "broken", cpu_kernels.find_compiler(), tmp_path / "cache")
  assert not list((tmp_path / "cache").glob("*.so"))


def test_switched_off_by_environment(monkeypatch):
  monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
  assert cpu_kernels._load_kernels.__wrapped__() is False


def test_without_a_compiler_the_xla_formulation_runs(monkeypatch, caplog):
  monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
  monkeypatch.setattr(cpu_kernels, "find_compiler", lambda: None)
  monkeypatch.setattr(cpu_kernels, "host_has_avx512", lambda: True)
  monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
  with caplog.at_level(logging.WARNING):
    assert cpu_kernels._load_kernels.__wrapped__() is False
  assert "no C++ compiler" in caplog.text


def test_override_nests_and_restores():
  with cpu_kernels.kernels_enabled(False):
    assert not cpu_kernels.kernels_available()
    with cpu_kernels.kernels_enabled(True):
      assert cpu_kernels.kernels_available() == bool(cpu_kernels.host_has_avx512() and cpu_kernels.find_compiler())
    assert not cpu_kernels.kernels_available()
  assert not cpu_kernels.kernels_available()   # this suite runs on 8 fake devices: off by default


@needs_kernels
@pytest.mark.parametrize("switch", ["1", "0"])
def test_default_on_one_cpu_device(tmp_path, switch):
  """A process with one CPU device (what a laptop run or benchmarks/train_step.py has) traces the
  kernels by default; FMJAX_CPU_KERNELS=0 keeps the XLA formulation."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from fmjax.models.spectral_adapter import SpectralAdapter
      model, x = SpectralAdapter(), jnp.ones((1, 2, 2, 202))
      variables = model.init(jax.random.key(0), x, train=False)
      text = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])).lower(variables, x).as_text()
      print("devices", jax.device_count(), "kernel", "@fmjax_adapter_layers12(" in text)
  """)
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env = {**os.environ, "XLA_FLAGS": flags, cpu_kernels.ENV_SWITCH: switch,
         "FMJAX_KERNEL_CACHE": str(cpu_kernels.cache_dir())}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"devices 1 kernel {switch == '1'}" in out.stdout


@needs_kernels
def test_kernel_gradients_are_bitwise_reproducible():
  """The kernels' reductions (weight gradients, bn_1's moments) run on XLA's thread pool; their sums
  must not depend on which thread claimed which chunk. With per-thread partial sums added as threads
  finished, six calls gave six different results on two cores."""
  import hashlib
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fmjax.models.spectral_adapter import SpectralAdapter
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 202)) * 2 + 0.5
  model = SpectralAdapter()
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)

  def loss(params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out * jnp.cos(out))
  with cpu_kernels.kernels_enabled(True):    # the suite runs on 8 fake devices
    assert cpu_kernels.kernels_available()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "fmjax_" in grad.lower(variables["params"], x).as_text()   # the kernels' custom calls
    digests = set()
    for _ in range(6):
      digest = hashlib.sha256()
      for leaf in jax.tree.leaves(grad(variables["params"], x)):
        digest.update(np.asarray(leaf).tobytes())
      digests.add(digest.hexdigest())
  assert len(digests) == 1
