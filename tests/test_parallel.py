"""Mesh construction and the logical-axis rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fmjax import parallel


def test_mesh_fills_the_free_axis():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.data_parallel_size(mesh) == 4


@pytest.mark.parametrize("shape,match", [
    ({"data": 3}, "needs 3 devices but 8"),
    ({"model": 2}, "valid axes"),
    ({"data": -1, "fsdp": -1}, "only one mesh axis"),
    ({"data": -1, "fsdp": 3}, "do not divide"),
])
def test_mesh_errors_name_the_problem(shape, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(shape)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (8, 16))
    return x @ w


def test_params_are_born_sharded_by_the_rules():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = _Dense()
  x = jnp.ones((4, 8))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  shardings = parallel.logical_to_shardings(abstract, mesh)
  params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
  w = params["params"]["w"].value
  assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # Each device holds a quarter of the weight: fsdp=2 along rows, tensor=2 along columns.
  assert {s.data.shape for s in w.addressable_shards} == {(4, 8)}
  batch = jax.device_put(np.ones((4, 8), np.float32), parallel.batch_sharding(mesh, 2))
  assert batch.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_single_process_needs_no_distributed_start(monkeypatch):
  for k in ("SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
            "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  assert parallel.initialize_distributed() == "single"
  with pytest.raises(ValueError, match="num_processes"):
    parallel.initialize_distributed(coordinator="127.0.0.1:1234")
