"""Huge-page malloc re-exec (fmjax/host_memory.py)."""
import os
import subprocess
import sys

from fmjax import host_memory


def test_tunables_added_once_and_respect_opt_out():
  assert host_memory.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
  assert (host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_memory.tunables_with_huge_pages({"FMJAX_NO_HUGEPAGE_MALLOC": "1"}) is None
  assert host_memory.tunables_with_huge_pages({"FMJAX_NO_HUGEPAGE_MALLOC": "0"}) == "glibc.malloc.hugetlb=1"


def test_huge_pages_available_reads_the_kernel_setting(tmp_path):
  setting = tmp_path / "enabled"
  for text, expected in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                         ("always madvise [never]\n", False)):
    setting.write_text(text)
    assert host_memory.huge_pages_available(str(setting)) is expected
  assert host_memory.huge_pages_available(str(tmp_path / "missing")) is False


def test_reexec_keeps_arguments_and_sets_the_tunable(tmp_path):
  script = tmp_path / "prog.py"
  script.write_text("import os, sys\n"
                    "from fmjax import host_memory\n"
                    "host_memory.reexec_with_huge_pages()\n"
                    "print(os.environ.get('GLIBC_TUNABLES', ''), '|', ' '.join(sys.argv[1:]))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FMJAX_NO_HUGEPAGE_MALLOC")}
  out = subprocess.run([sys.executable, str(script), "--a=1", "b c"], env=env, capture_output=True, text=True,
                       check=True)
  tail = "| --a=1 b c"
  if host_memory.huge_pages_available() and sys.platform.startswith("linux"):
    assert out.stdout.strip() == f"glibc.malloc.hugetlb=1 {tail}"
    assert "re-running with GLIBC_TUNABLES" in out.stderr
  else:
    assert out.stdout.strip() == tail
