"""A caching host allocator for every fmjax program, switched on by re-executing the process.

Why: XLA CPU (and NumPy, and torch) allocate every large buffer fresh, and glibc serves anything
above 32 MB with its own mmap and unmaps it on free. So each training step first-touches its
activations page by page, and the kernel zeroes every page again: on the 2-core development VM the
MAE SpecViT-S/4 step (128 px, batch 4) spent 1.6-3.6 s of system time per step that way.

What we do, in order of preference:
* **mimalloc** (the `cmeel-mimalloc` wheel, a dependency) preloaded with purging off
  (`MIMALLOC_PURGE_DELAY=-1`): freed memory is kept and reused by later steps instead of being
  returned to the kernel and faulted in again, as a caching device allocator does. Measured on the
  VM: system time 0.3-0.4 s per step, resident memory flat over steps, step 3.5 -> 2.8 s
  (docs/engine.md). Until 2026-12-07 freed memory went back after 60 s unused; in runs of 40-100
  steps that re-faulted purged pages on 9-25 steps per process, against 0-2 with purging off
  (docs/speed.md item 20). The cost is that a one-off peak (a restore, an evaluation) stays
  resident for later steps to reuse; `MIMALLOC_PURGE_DELAY=60000` in the environment returns it
  after a minute instead. Its large (2 MB) OS pages are left off: on a 2026-12-04 Zen 2
  VM they made steps 4-23% slower for fmjax and torch alike, and some processes ran 30% slower
  throughout (docs/speed.md); `MIMALLOC_ALLOW_LARGE_OS_PAGES=1` in the environment still asks for them.
  Separately from that option, mimalloc 3 marks its 1 GiB arenas for transparent
  huge pages (madvise MADV_HUGEPAGE, its `allow_thp` option), so with THP in madvise mode most of a
  step's memory is in 2 MB pages anyway. That is left as mimalloc has it: `MIMALLOC_ALLOW_THP=0` did
  not change the MoCo ViT-S/4 step (Zen 4 VM) and made the MAE 128 px step ~7% slower (Xeon VM). Its
  cost is the first touch of each 2 MB page, which on that Xeon VM took ~20 ms (its kernel reports
  free memory to the host, which must back each new page again: docs/speed.md item 20; 18-38 s of system
  time per process against 2-7 s without; `make demo` 153 s against 125 s); users on such VMs can
  turn it off (docs/speed.md, fourteenth session).
* otherwise glibc's `glibc.malloc.hugetlb=1` tunable (transparent huge pages for its mmaps: 512x
  fewer faults, but still fresh pages every step).

The choice has to be made before the process starts (LD_PRELOAD, GLIBC_TUNABLES), hence the
re-exec. It is skipped on non-glibc systems, when `FMJAX_HOST_ALLOCATOR` says it was already done,
and with `FMJAX_SYSTEM_MALLOC=1`. (Tried and rejected: glibc with mmap disabled and one arena
reuses memory too, but fragmentation grew the heap from 5 to 11 GB within six steps.)
"""
from __future__ import annotations

import os
import platform
import sys

OPT_OUT = "FMJAX_SYSTEM_MALLOC"
MARKER = "FMJAX_HOST_ALLOCATOR"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
GLIBC_THP = "glibc.malloc.hugetlb=1"
# Never: any delay lets a page that sat unused for that long go back to the kernel, and XLA's
# steps pick such pages up again later, each a fresh page fault (docs/speed.md item 20).
MIMALLOC_PURGE_DELAY_MS = "-1"


def huge_pages_available(setting_path: str = THP_SETTING) -> bool:
  """True when the kernel hands out THP on request: its setting is [always] or [madvise]."""
  try:
    with open(setting_path) as f:
      setting = f.read()
  except OSError:
    return False
  return "[always]" in setting or "[madvise]" in setting


def mimalloc_library() -> str | None:
  """Path of libmimalloc.so from the installed cmeel-mimalloc wheel, or None."""
  try:
    from importlib import metadata
    dist = metadata.distribution("cmeel-mimalloc")
  except Exception:  # not installed (or broken metadata): fall back to glibc
    return None
  for name in ("cmeel.prefix/lib/libmimalloc.so.3", "cmeel.prefix/lib/libmimalloc.so"):
    path = str(dist.locate_file(name))
    if os.path.exists(path):
      return path
  return None


def allocator_environment(environ, mimalloc_path: str | None, thp: bool) -> dict[str, str] | None:
  """The variables to re-execute with, or None when nothing needs to change."""
  if environ.get(OPT_OUT, "") not in ("", "0") or MARKER in environ:
    return None
  if mimalloc_path:
    preload = environ.get("LD_PRELOAD", "")
    env = {"LD_PRELOAD": f"{mimalloc_path}:{preload}" if preload else mimalloc_path,
           "MIMALLOC_PURGE_DELAY": environ.get("MIMALLOC_PURGE_DELAY", MIMALLOC_PURGE_DELAY_MS),
           MARKER: "mimalloc"}
    env["MIMALLOC_ALLOW_LARGE_OS_PAGES"] = environ.get("MIMALLOC_ALLOW_LARGE_OS_PAGES", "0")
    return env
  current = environ.get("GLIBC_TUNABLES", "")
  if not thp or "glibc.malloc.hugetlb" in current:
    return None
  return {"GLIBC_TUNABLES": f"{current}:{GLIBC_THP}" if current else GLIBC_THP, MARKER: "glibc-thp"}


def reexec_with_host_allocator() -> None:
  """Call first thing in a program's `__main__` block: replaces the process (same PID, same
  arguments) with one that uses the caching allocator, or returns when that is not possible/needed."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return
  changes = allocator_environment(os.environ, mimalloc_library(), huge_pages_available())
  if changes is None:
    return
  shown = " ".join(f"{k}={v}" for k, v in changes.items() if k != MARKER)
  print(f"fmjax: re-running with {shown} ({OPT_OUT}=1 skips this)", file=sys.stderr, flush=True)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, **changes))
