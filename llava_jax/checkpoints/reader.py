"""Read checkpoint tensors one at a time from a directory or file: safetensors (single or sharded with an index
json) or, only when explicitly allowed, legacy pickle `.bin` files.

safetensors files are parsed directly (8-byte header length, JSON header, raw little-endian data) so every
dtype, bfloat16 included, comes back as a numpy array (bfloat16 / float8 via `ml_dtypes`) and only the one
tensor asked for is read from disk. (`safetensors.safe_open(framework='numpy')` raises on bfloat16 and
framework='flax' would place each tensor on a device before we know its sharding.)

Pickle files go through `torch.load(weights_only=True, map_location='cpu', mmap=True)`; torch is imported
only there. One pickle shard is held at a time (memory-mapped when the file is in torch's zip format).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointFormatError(ValueError):
  """A checkpoint file or directory that cannot be read as asked (missing, pickle not allowed, corrupt)."""


def read_safetensors_header(path: str) -> Tuple[dict, int]:
  """(header dict without '__metadata__', byte offset where the data section starts)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > 100_000_000:
      raise CheckpointFormatError(f"{path}: safetensors header of {n} bytes; the file is not safetensors")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


class _SafetensorsFile:
  def __init__(self, path: str):
    self.path = path
    self.header, self.data_start = read_safetensors_header(path)

  def keys(self) -> List[str]:
    return list(self.header)

  def shape(self, key: str) -> Tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointFormatError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    buf = bytearray(end - begin)
    with open(self.path, "rb") as f:
      f.seek(self.data_start + begin)
      if f.readinto(buf) != len(buf):
        raise CheckpointFormatError(f"{self.path}: truncated data for tensor {key!r}")
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # only reached for pickle checkpoints, which already imported torch
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


class _PickleFile:
  """A torch pickle state dict, loaded lazily (one file at a time, see TensorReader)."""

  def __init__(self, path: str):
    self.path = path
    self._state: Optional[dict] = None

  def load(self) -> dict:
    if self._state is None:
      import torch  # lazily: the runtime never needs torch except for this legacy format
      try:
        state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # pre-zip (torch < 1.6) files cannot be memory-mapped
        state = torch.load(self.path, map_location="cpu", weights_only=True)
      if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
      if not isinstance(state, dict):
        raise CheckpointFormatError(f"{self.path}: expected a state dict, found {type(state).__name__}")
      self._state = state
    return self._state

  def release(self) -> None:
    self._state = None

  def keys(self) -> List[str]:
    return list(self.load())

  def shape(self, key: str) -> Tuple[int, ...]:
    return tuple(self.load()[key].shape)

  def get(self, key: str) -> np.ndarray:
    return _torch_to_numpy(self.load()[key])


def _find_files(path: str, allow_pickle: bool) -> Tuple[List[str], Optional[Dict[str, str]], bool]:
  """(files, weight_map or None, is_pickle) for a checkpoint directory or a single file."""
  if os.path.isfile(path):
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
      return [path], None, False
    if name.endswith(".json"):
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
      root = os.path.dirname(path)
      is_pickle = not name.startswith("model.safetensors")
      weight_map = {k: os.path.join(root, v) for k, v in weight_map.items()}
      return sorted(set(weight_map.values())), weight_map, is_pickle
    if name.endswith(PICKLE_SUFFIXES):
      return [path], None, True
    raise CheckpointFormatError(f"{path}: not a .safetensors, .bin or index .json checkpoint file")
  if not os.path.isdir(path):
    raise CheckpointFormatError(f"checkpoint path {path!r} does not exist")
  listing = sorted(os.listdir(path))
  if SAFE_INDEX in listing:
    return _find_files(os.path.join(path, SAFE_INDEX), allow_pickle)
  if SAFE_SINGLE in listing:
    return [os.path.join(path, SAFE_SINGLE)], None, False
  safe = [os.path.join(path, n) for n in listing if n.endswith(".safetensors")]
  if safe:
    return safe, None, False
  if PICKLE_INDEX in listing:
    return _find_files(os.path.join(path, PICKLE_INDEX), allow_pickle)
  if PICKLE_SINGLE in listing:
    return [os.path.join(path, PICKLE_SINGLE)], None, True
  pickles = [os.path.join(path, n) for n in listing if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    return pickles, None, True
  raise CheckpointFormatError(f"{path}: no weights found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors, "
                              f"{PICKLE_INDEX}, {PICKLE_SINGLE}, *.bin)")


def has_weights(path: str) -> bool:
  """True when `path` is a weights file or a directory holding one (safetensors or pickle)."""
  try:
    _find_files(path, allow_pickle=True)
    return True
  except CheckpointFormatError:
    return False


class TensorReader:
  """Random access to the tensors of one checkpoint, one tensor at a time.

  `keys()` lists every tensor name (from the index or the file headers), `shape(key)` reads no data,
  `get(key)` returns the tensor as a numpy array in the checkpoint's layout and dtype.
  """

  def __init__(self, path: str, *, allow_pickle: bool = False):
    self.path = path
    files, weight_map, self.is_pickle = _find_files(path, allow_pickle)
    if self.is_pickle and not allow_pickle:
      raise CheckpointFormatError(
          f"{path} holds only pickle weights ({', '.join(os.path.basename(f) for f in files[:3])}); pickle can "
          f"execute code, so it is read only with allow_pickle=True (via torch.load(weights_only=True)). "
          f"Prefer converting the checkpoint to safetensors.")
    for f in files:
      if not os.path.isfile(f):
        raise CheckpointFormatError(f"{path}: the index names {f}, which does not exist")
    opener = _PickleFile if self.is_pickle else _SafetensorsFile
    self._files = {f: opener(f) for f in files}
    self._where: Dict[str, str] = {}
    if weight_map is not None and not self.is_pickle:
      self._where = dict(weight_map)
    else:
      for f, handle in self._files.items():
        for k in handle.keys():
          if k in self._where and weight_map is None:
            raise CheckpointFormatError(f"{path}: tensor {k!r} appears in both {self._where[k]} and {f}")
          self._where.setdefault(k, f)
        if self.is_pickle:
          handle.release()
      if weight_map is not None:  # pickle index: trust the index for placement
        self._where.update(weight_map)
    self._loaded: Optional[str] = None

  def keys(self) -> List[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def file_of(self, key: str) -> str:
    return self._where[key]

  def file_index(self, key: str) -> int:
    """Position of the key's file among this checkpoint's files (to visit tensors shard by shard)."""
    return sorted(self._files).index(self._where[key]) if key in self._where else 0

  def _handle(self, key: str):
    f = self._where[key]
    if self.is_pickle and self._loaded not in (None, f):
      self._files[self._loaded].release()  # hold one pickle shard at a time
    self._loaded = f
    return self._files[f]

  def shape(self, key: str) -> Tuple[int, ...]:
    return self._handle(key).shape(key)

  def get(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise KeyError(key)
    return self._handle(key).get(key)

  def close(self) -> None:
    for h in self._files.values():
      if isinstance(h, _PickleFile):
        h.release()
