"""benchmarks/batch_statistics.py runs end to end on a tiny input and times both formulations."""
from benchmarks import batch_statistics
from tests.conftest import requires_cpu_kernels


@requires_cpu_kernels
def test_batch_statistics_benchmark_times_kernel_and_xla(capsys):
  medians = batch_statistics.main(["--batch", "1", "--size", "4", "--rounds", "2"])
  assert set(medians) == {"kernel", "XLA"}
  assert all(ms > 0 for ms in medians.values())
  assert "XLA / kernel" in capsys.readouterr().out
