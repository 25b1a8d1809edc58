"""Hand-written CPU kernels (XLA FFI custom calls), compiled on first use for the host CPU.

The C++ sources sit next to this file. The first process that needs a kernel compiles it with the
system C++ compiler (`$CXX`, else `g++`/`c++`/`clang++`) and `-march=native` into a cache directory
(`$FMJAX_KERNEL_CACHE`, else ~/.cache/fmjax/kernels) keyed by the source, the compiler, jaxlib's
version and the CPU, then registers it with XLA. Without a compiler or AVX-512, or with
`FMJAX_CPU_KERNELS=0`, `kernels_available()` is False and callers use their XLA formulation: the
kernels (the spectral adapter's layers and bn_1's statistics, short-sequence attention) are a CPU
speed-up only (benchmarks/adapter.py, benchmarks/batch_statistics.py, benchmarks/attention.py), never
needed for correctness, and TPU and GPU programs never call them.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

SOURCE_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = sorted(SOURCE_DIR.glob("*.cc"))   # one library: every kernel beside this file
# FFI target name -> exported handler symbol in the compiled library.
KERNEL_TARGETS = {"fmjax_adapter_layers12": "FmjaxAdapterLayers12",
                  "fmjax_adapter_layers12_backward": "FmjaxAdapterLayers12Backward",
                  "fmjax_adapter_layer3": "FmjaxAdapterLayer3",
                  "fmjax_adapter_layer3_backward": "FmjaxAdapterLayer3Backward",
                  "fmjax_attention": "FmjaxAttention",
                  "fmjax_attention_backward": "FmjaxAttentionBackward",
                  "fmjax_column_moments": "FmjaxColumnMoments",
                  "fmjax_layer_norm": "FmjaxLayerNorm",
                  "fmjax_layer_norm_backward": "FmjaxLayerNormBackward"}
ENV_SWITCH = "FMJAX_CPU_KERNELS"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
  """$FMJAX_KERNEL_CACHE, else ~/.cache/fmjax/kernels, else (not writable) a per-user temp folder."""
  configured = os.environ.get("FMJAX_KERNEL_CACHE")
  if configured:
    return Path(configured)
  home = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "fmjax" / "kernels"
  try:
    home.mkdir(parents=True, exist_ok=True)
    if os.access(home, os.W_OK):
      return home
  except OSError:
    pass
  return Path(tempfile.gettempdir()) / f"fmjax-kernels-{os.getuid()}"


def find_compiler() -> str | None:
  for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  return None


def host_has_avx512() -> bool:
  """The kernels' register tiles are sized for AVX-512's 32 vector registers; other CPUs (AVX2, ARM)
  keep XLA's formulation, which is faster there than these tiles would be."""
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and " avx512f" in line for line in f)
  except OSError:
    return False


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU model and its flags (a cache shared between machines
  must not hand one CPU's instructions to another)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f.read().splitlines() if l.startswith(("model name", "flags", "cpu family", "model\t"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def compile_library(sources: list[Path], name: str, compiler: str, out_dir: Path) -> Path:
  """Compiles `sources` (with the headers beside them) into the shared library `name` in out_dir,
  cached by content; returns its path."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  texts = [p.read_text() for p in sorted({*sources, *(h for s in sources for h in s.parent.glob("*.h"))})]
  key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  target = out_dir / f"{name}-{key}.so"
  if target.exists():
    return target
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"fmjax: compiling the CPU kernel library {target} (once per CPU and source version)",
        file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:   # concurrent builders each rename a whole file
    built = Path(tmp) / target.name
    result = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(built)], capture_output=True,
                            text=True)
    if result.returncode:
      raise RuntimeError(f"compiling {name} ({', '.join(p.name for p in sources)}) failed:\n"
                         f"{result.stderr[-3000:]}")
    os.replace(built, target)
  return target


@functools.cache
def _load_kernels() -> bool:
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return False
  if platform.machine() not in ("x86_64", "AMD64") or not host_has_avx512():
    log.info("fmjax: no AVX-512 on this CPU; the models use their XLA formulations")
    return False
  compiler = find_compiler()
  if compiler is None:
    log.warning("fmjax: no C++ compiler found; the models use their XLA formulations on CPU")
    return False
  try:
    library = ctypes.CDLL(str(compile_library(KERNEL_SOURCES, "kernels", compiler, cache_dir())))
  except (OSError, RuntimeError) as error:
    log.warning("fmjax: the CPU kernels are not available (%s); using the XLA formulations", error)
    return False
  for name, symbol in KERNEL_TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


_override: list[bool] = []


@contextlib.contextmanager
def kernels_enabled(enabled: bool):
  """Within this context (at trace time), use the kernels wherever they compile (enabled=True, whatever
  the device count: for tests and benchmarks on one device of a multi-device host; the custom calls
  are not partitioned over a mesh) or never (False)."""
  _override.append(enabled)
  try:
    yield
  finally:
    _override.pop()


def kernels_available() -> bool:
  """Whether traced programs should call the CPU kernels: by default on a CPU backend with one
  device (the custom calls do not partition: on a mesh the XLA formulation shards like any matmul)
  and a library that compiled and registered; `kernels_enabled` overrides the device rule."""
  if jax.default_backend() != "cpu":
    return False
  if _override:
    return _override[-1] and _load_kernels()
  return jax.device_count() == 1 and _load_kernels()
