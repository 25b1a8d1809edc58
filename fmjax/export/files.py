"""Reading and writing state_dict files: torch pickles (`.pt`) and safetensors, the latter streamed.

The safetensors writer never holds more than one tensor: the header (names, dtypes, shapes, byte
offsets) is known from the key table before any value is computed, so each tensor is converted and
written in turn. That is what lets ViT-g (1.1B parameters, 4.5 GB) export on a host whose memory
holds the model once. torch.save needs a whole dict, so `.pt` export peaks at one model copy.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import numpy as np

FORMATS = ("torch", "safetensors")

# numpy dtype name -> safetensors dtype tag
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def format_from_path(path: str, fmt: str | None = None) -> str:
  if fmt:
    if fmt not in FORMATS:
      raise ValueError(f"format {fmt!r} is not known; valid: {', '.join(FORMATS)}")
    return fmt
  return "safetensors" if path.endswith(".safetensors") else "torch"


def write_safetensors_streaming(path: str, specs: list[tuple[str, tuple[int, ...], str]],
                                produce: Callable[[int], np.ndarray], metadata: Mapping[str, str] | None = None,
                                progress: Callable[[Iterable], Iterable] = lambda x: x) -> int:
  """Writes a safetensors file tensor by tensor. specs: [(name, shape, numpy dtype name)] in file
  order; produce(i) returns tensor i as a numpy array of exactly that shape and dtype. Returns bytes."""
  header: dict = {}
  offset = 0
  for name, shape, dtype in specs:
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name}: dtype {dtype} cannot be written to safetensors; valid: {sorted(_SAFETENSORS_DTYPES)}")
    tag = _SAFETENSORS_DTYPES[dtype]
    size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[tag]
    header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
  header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte alignment of the data section
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for i in progress(range(len(specs))):
      name, shape, dtype = specs[i]
      value = produce(i)
      if tuple(value.shape) != tuple(shape) or str(value.dtype) != dtype:
        raise ValueError(f"tensor {name}: produced {value.dtype}{tuple(value.shape)}, header says {dtype}{tuple(shape)}")
      f.write(np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C").tobytes())
  os.replace(tmp, path)  # never leave a truncated file under the final name
  return 8 + len(header_bytes) + offset


def write_torch(path: str, specs: list[tuple[str, tuple[int, ...], str]], produce: Callable[[int], np.ndarray],
                progress: Callable[[Iterable], Iterable] = lambda x: x) -> int:
  """torch.save of an ordered state_dict (tensors made one by one, zero-copy from numpy)."""
  import collections
  import torch
  state_dict = collections.OrderedDict()
  for i in progress(range(len(specs))):
    value = np.asarray(produce(i), order="C")   # (ascontiguousarray would turn 0-d counters into 1-d)
    if not value.flags.writeable:  # views of jax buffers are read-only; torch wants to own writable memory
      value = value.copy()
    state_dict[specs[i][0]] = torch.from_numpy(value)
  tmp = path + ".partial"
  torch.save(state_dict, tmp)
  os.replace(tmp, path)
  return os.path.getsize(path)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: numpy array} from a `.pt`/`.pth` torch file (a state_dict, or a dict holding one under
  'state_dict' / 'model') or a `.safetensors` file. Loads weights only (no pickled code)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"state_dict file {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  import torch
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    out[key] = value.detach().cpu().numpy()
  return out
