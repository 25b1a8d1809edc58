"""Caching host allocator re-exec (fmjax/host_memory.py)."""
import os
import subprocess
import sys

import pytest

from fmjax import host_memory

LIB = "/opt/lib/libmimalloc.so.3"


def test_mimalloc_is_preloaded_once_without_purging_and_without_large_pages():
  env = host_memory.allocator_environment({}, LIB, thp=True)
  assert env == {"LD_PRELOAD": LIB, "MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "0",
                 "FMJAX_HOST_ALLOCATOR": "mimalloc"}
  # an existing preload is kept and user settings win
  env = host_memory.allocator_environment({"LD_PRELOAD": "libx.so", "MIMALLOC_PURGE_DELAY": "5",
                                           "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}, LIB, thp=False)
  assert env["LD_PRELOAD"] == f"{LIB}:libx.so" and env["MIMALLOC_PURGE_DELAY"] == "5"
  assert env["MIMALLOC_ALLOW_LARGE_OS_PAGES"] == "1"
  # once re-executed (marker set), or opted out: nothing changes
  assert host_memory.allocator_environment({"FMJAX_HOST_ALLOCATOR": "mimalloc"}, LIB, thp=True) is None
  assert host_memory.allocator_environment({"FMJAX_SYSTEM_MALLOC": "1"}, LIB, thp=True) is None


def test_glibc_huge_pages_are_the_fallback_without_mimalloc():
  assert host_memory.allocator_environment({}, None, thp=True) == {
      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "FMJAX_HOST_ALLOCATOR": "glibc-thp"}
  env = host_memory.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, None, thp=True)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert host_memory.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None, thp=True) is None
  assert host_memory.allocator_environment({}, None, thp=False) is None
  assert host_memory.allocator_environment({"FMJAX_SYSTEM_MALLOC": "0"}, None, thp=True) is not None


def test_huge_pages_available_reads_the_kernel_setting(tmp_path):
  setting = tmp_path / "enabled"
  for text, expected in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                         ("always madvise [never]\n", False)):
    setting.write_text(text)
    assert host_memory.huge_pages_available(str(setting)) is expected
  assert host_memory.huge_pages_available(str(tmp_path / "missing")) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux/glibc only")
def test_reexec_keeps_arguments_and_really_loads_mimalloc(tmp_path):
  """The installed wheel is found, and the re-executed process has libmimalloc mapped."""
  lib = host_memory.mimalloc_library()
  assert lib is not None, "cmeel-mimalloc is a dependency: it must be installed"
  script = tmp_path / "prog.py"
  script.write_text("import os, sys\n"
                    "from fmjax import host_memory\n"
                    "host_memory.reexec_with_host_allocator()\n"
                    "mapped = 'libmimalloc' in open('/proc/self/maps').read()\n"
                    "print(os.environ.get('FMJAX_HOST_ALLOCATOR', ''), mapped, '|', ' '.join(sys.argv[1:]))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FMJAX_SYSTEM_MALLOC", "FMJAX_HOST_ALLOCATOR")}
  out = subprocess.run([sys.executable, str(script), "--a=1", "b c"], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "mimalloc True | --a=1 b c"
  assert "re-running with LD_PRELOAD=" in out.stderr
  # opted out: the program runs as it was started
  out = subprocess.run([sys.executable, str(script)], env=dict(env, FMJAX_SYSTEM_MALLOC="1"), capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False |"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux/glibc only")
def test_freed_memory_stays_resident_for_reuse_unless_the_user_sets_a_purge_delay(tmp_path):
  """The re-executed process keeps a freed 64 MB block mapped, for later steps to reuse without page
  faults (mimalloc's own default, a 10 ms purge delay, returns it at once); a user's
  MIMALLOC_PURGE_DELAY still wins."""
  script = tmp_path / "free_and_wait.py"
  script.write_text(
      "import ctypes, time\n"
      "from fmjax import host_memory\n"
      "host_memory.reexec_with_host_allocator()\n"
      "libc = ctypes.CDLL(None)\n"
      "libc.malloc.restype = ctypes.c_void_p\n"
      "libc.free.argtypes = [ctypes.c_void_p]\n"
      "def rss():\n"
      "  return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) // 1024\n"
      "block = libc.malloc(64 << 20)\n"
      "ctypes.memset(block, 1, 64 << 20)\n"
      "touched = rss()\n"
      "libc.free(block)\n"
      "for _ in range(20):   # mimalloc purges lazily, on later calls\n"
      "  time.sleep(0.02)\n"
      "  libc.free(libc.malloc(1 << 20))\n"
      "print(touched - rss())\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "FMJAX_SYSTEM_MALLOC", "FMJAX_HOST_ALLOCATOR", "MIMALLOC_PURGE_DELAY")}
  def released_mb(**extra):
    out = subprocess.run([sys.executable, str(script)], env=dict(env, **extra), capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())
  assert released_mb() < 8
  assert released_mb(MIMALLOC_PURGE_DELAY="10") > 56
