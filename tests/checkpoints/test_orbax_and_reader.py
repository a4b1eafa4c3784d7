"""orbax params round trip, and the safetensors / pickle tensor reader against the reference libraries."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax.checkpoints.hf import restore_params, save_params
from llava_jax.checkpoints.reader import CheckpointFormatError, TensorReader
from llava_jax.parallel import make_mesh
from tests.fixtures import hf_checkpoints as H


def _tree():
  rng = np.random.RandomState(0)
  return {"a": {"kernel": jnp.asarray(rng.randn(4, 8).astype(np.float32))},
          "b": {"scale": jnp.asarray(rng.randn(3, 8), jnp.bfloat16), "ids": jnp.arange(5, dtype=jnp.int32)}}


def _assert_same(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_orbax_round_trip_is_exact(tmp_path):
  params = _tree()
  path = save_params(str(tmp_path / "p"), params)
  _assert_same(params, restore_params(path))
  save_params(path, jax.tree.map(lambda x: x + 1, params))  # overwrite
  _assert_same(jax.tree.map(lambda x: x + 1, params), restore_params(path))


def test_orbax_restore_onto_mesh_shardings(tmp_path):
  mesh = make_mesh((2, 2, 2))
  params = _tree()
  path = save_params(str(tmp_path / "p"), params)
  shardings = {"a": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
               "b": {"scale": NamedSharding(mesh, P(None, "tensor")), "ids": NamedSharding(mesh, P())}}
  restored = restore_params(path, shardings)
  _assert_same(params, restored)
  assert restored["a"]["kernel"].sharding.is_equivalent_to(shardings["a"]["kernel"], 2)
  assert restored["a"]["kernel"].addressable_shards[0].data.shape == (2, 4)
  with pytest.raises(ValueError, match="different tree"):
    restore_params(path, {"a": shardings["a"]})


def test_orbax_round_trip_of_loaded_llava(tmp_path):
  model = H.tiny_llava(seed=30)
  from llava_jax import load_pretrained
  config, params = load_pretrained(H.save_llava_hf(model, str(tmp_path / "m"), "saved"), dtype="bfloat16")
  _assert_same(params, restore_params(save_params(str(tmp_path / "ckpt"), params)))


def test_reader_matches_safetensors_and_torch(tmp_path):
  from safetensors.numpy import load_file as load_np
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(0)
  tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
             "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
             "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  reader = TensorReader(str(tmp_path))
  assert sorted(reader.keys()) == sorted(tensors)
  for k, t in tensors.items():
    got = reader.get(k)
    assert got.shape == tuple(t.shape) and reader.shape(k) == tuple(t.shape)
    if k == "bf16":
      assert got.dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    else:
      np.testing.assert_array_equal(got, t.numpy())
      assert got.dtype == t.numpy().dtype
  # the safetensors numpy loader (no bf16 support) on the other dtypes
  no_bf16 = {k: v for k, v in tensors.items() if k != "bf16"}
  save_file(no_bf16, str(tmp_path / "other.safetensors"))
  lib = load_np(str(tmp_path / "other.safetensors"))
  mine = TensorReader(str(tmp_path / "other.safetensors"))
  for k in no_bf16:
    np.testing.assert_array_equal(mine.get(k), lib[k])


def test_reader_sharded_index_and_errors(tmp_path):
  sd = {f"w{i}": torch.full((2,), float(i)) for i in range(5)}
  H.write_safetensors(str(tmp_path / "sharded"), sd, shards=3)
  reader = TensorReader(str(tmp_path / "sharded"))
  assert sorted(reader.keys()) == sorted(sd)
  assert len({reader.file_of(k) for k in sd}) == 3
  for k, v in sd.items():
    np.testing.assert_array_equal(reader.get(k), v.numpy())
  # index naming a file that is not there
  index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
  index["weight_map"]["w9"] = "model-00009-of-00009.safetensors"
  json.dump(index, open(tmp_path / "sharded" / "model.safetensors.index.json", "w"))
  with pytest.raises(CheckpointFormatError, match="does not exist"):
    TensorReader(str(tmp_path / "sharded"))
  # the same tensor in two unindexed files
  from safetensors.torch import save_file
  os.makedirs(tmp_path / "dup")
  save_file({"x": torch.zeros(1)}, str(tmp_path / "dup" / "a.safetensors"))
  save_file({"x": torch.ones(1)}, str(tmp_path / "dup" / "b.safetensors"))
  with pytest.raises(CheckpointFormatError, match="appears in both"):
    TensorReader(str(tmp_path / "dup"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointFormatError, match="no weights found"):
    TensorReader(str(tmp_path / "empty"))


def test_pickle_reader_bf16_and_flag(tmp_path):
  sd = {"a": torch.randn(3, 2).bfloat16(), "b": torch.arange(3)}
  torch.save(sd, str(tmp_path / "pytorch_model.bin"))
  with pytest.raises(CheckpointFormatError, match="allow_pickle=True"):
    TensorReader(str(tmp_path))
  reader = TensorReader(str(tmp_path), allow_pickle=True)
  np.testing.assert_array_equal(reader.get("a").view(np.uint16), sd["a"].view(torch.int16).numpy().view(np.uint16))
  np.testing.assert_array_equal(reader.get("b"), sd["b"].numpy())
