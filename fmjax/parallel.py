"""Meshes, logical-axis rules and multi-host start-up: the one place that maps names to devices.

Parameters and activations are annotated with *logical* axis names (Flax
`nn.with_logical_partitioning` / `nn.with_logical_constraint`). `LOGICAL_RULES` maps them to the
mesh axes `data`, `fsdp`, `tensor`. The same model code therefore runs on one CPU device, eight
fake devices, a TPU pod or a GPU cluster: only the mesh shape in the config changes.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or None: replicated). Parameter names first, then activations
# (prefixed `act_`), which must never be sharded over `fsdp` along a feature dimension.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),        # model width D: FSDP shards weights along it
    ("mlp", "tensor"),        # MLP hidden width
    ("heads", "tensor"),      # attention heads (q/k/v/out projections)
    ("kv", None),             # per-head width
    ("qkv", None),            # the fused q/k/v selector axis (size 3)
    ("conv_in", None),
    ("conv_out", "fsdp"),     # conv output channels (ResNets, adapter, patch embedding)
    ("conv_kernel", None),
    ("conv_height", None),       # spatial kernel axes of 2-D convolutions
    ("conv_width", None),
    ("bands", None),          # spectral axis of the input
    ("norm", None),           # norm scales and biases
    ("layers", None),         # leading axis of scanned blocks
    ("classes", None),
    ("proj", None),           # small projection heads (DINO / MoCo outputs)
    ("proj_in", None),        # their input axis, where it is a projection width too
    ("queue", None),          # MoCo memory-bank length
    ("tokens", None),         # cls / position-embedding rows
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_spatial", None),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
)


def logical_rules() -> tuple[tuple[str, Any], ...]:
  return LOGICAL_RULES


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor). One axis may be -1: it takes the remaining devices.

  Axis types are Auto: with jax 0.10 `jax.make_mesh` defaults to Explicit axes, under which FSDP
  parameter layouts raise ShardingTypeError.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are not known; valid axes: {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh {shape}: {len(devices)} devices do not divide by the fixed axes' product {fixed}")
    sizes[free[0]] = len(devices) // fixed
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available "
                     f"(set one axis to -1 to use all of them)")
  dims = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # CPU or odd topologies: plain order is fine there
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a global batch: leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_shardings(tree, mesh: Mesh):
  """Shardings for a pytree of (possibly `nn.LogicallyPartitioned`-boxed) abstract values."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def replicate_indivisible(abstract_state, shardings, mesh):
  """Shardings where every dimension a mesh axis does not divide is replicated instead; and the list
  of leaves changed ('path shape spec').

  Why: the logical rules shard e.g. the spectral adapter's 32- and 64-channel convolutions over
  'fsdp' ('conv_out'), which XLA refuses once fsdp > 32 (IndivisibleError). Small tensors like
  these are cheap to replicate; the train loop logs them and fmjax.plan reports them.
  """
  changed = []

  def fix(path, leaf, sharding):
    if not isinstance(sharding, NamedSharding):
      return sharding
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    new = []
    for dim, axes in zip(leaf.shape, spec):
      names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      size = 1
      for name in names:
        size *= mesh.shape[name]
      new.append(axes if dim % size == 0 else None)
    if new != spec:
      changed.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {sharding.spec}")
      return NamedSharding(mesh, P(*new))
    return sharding

  fixed = jax.tree_util.tree_map_with_path(fix, abstract_state, shardings)
  return fixed, changed


def with_rules():
  """Context that makes `nn.with_logical_constraint` resolve against LOGICAL_RULES."""
  return nn.logical_axis_rules(LOGICAL_RULES)


def _env_says_multihost() -> str | None:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return "tpu"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  return None


_initialized = False


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                           local_device_ids: Sequence[int] | None = None) -> str:
  """Starts jax.distributed when asked for (explicit flags) or when the environment says so.

  Returns how it started: 'explicit', 'slurm', 'tpu', 'env' or 'single' (nothing to do).
  """
  global _initialized
  if _initialized:
    return "already"
  if coordinator:
    if num_processes <= 0 or process_id < 0:
      raise ValueError("distributed.coordinator is set, so distributed.num_processes and "
                       f"distributed.process_id must be too (got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    how = "explicit"
  else:
    how = _env_says_multihost()
    if how is None:
      return "single"
    # jax's cluster auto-detection reads the SLURM / TPU / JAX_* environment itself.
    jax.distributed.initialize()
  _initialized = True
  logging.info("jax.distributed started (%s): process %d of %d, %d local / %d global devices",
               how, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return how
