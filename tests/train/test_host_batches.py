"""Per-host batch length agreement (train/host_batches.py) and the padding it applies (data/batching.py)."""
import numpy as np

from llava_jax.data import batching
from llava_jax.train import host_batches


def sample(n, image=False, s=4):
  ids = np.arange(10, 10 + n, dtype=np.int32)
  return {"id": f"s{n}", "input_ids": ids, "loss_mask": np.arange(n) % 2 == 0,
          "pixels": np.full((1 if image else 0, s, s, 3), 7, np.uint8)}


def spec(buckets, packing=False):
  return batching.BatchSpec(rows=2, image_slots=2, image_size=4, max_length=buckets[-1], buckets=tuple(buckets),
                            packing=packing, pad_id=3)


def test_pad_to_length_equals_assembling_into_the_longer_bucket():
  """A 16-token batch padded to 32 is exactly what `assemble` builds when 32 is the smallest bucket."""
  rows = [[sample(9, image=True)], [sample(14)]]
  short = batching.assemble(rows, spec((16, 32)))
  assert short["input_ids"].shape == (2, 16)
  want = batching.assemble(rows, spec((32,)))
  got = batching.pad_to_length(short, 32, pad_id=3)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got[k].dtype == want[k].dtype, k
  assert batching.pad_to_length(short, 16, pad_id=3) is short


def test_pad_to_length_refuses_to_shrink():
  batch = batching.assemble([[sample(20)]], spec((32,)))
  try:
    batching.pad_to_length(batch, 16, pad_id=3)
  except ValueError as e:
    assert "32" in str(e) and "16" in str(e)
  else:
    raise AssertionError("expected ValueError")


def test_one_process_never_needs_agreement():
  """One process, packing, or a single bucket: the batch passes through untouched (no collective)."""
  batch = batching.assemble([[sample(9)]], spec((16, 32)))
  for s in (spec((16, 32)), spec((32,)), spec((16, 32), packing=True)):
    assert not host_batches.needs_agreement(s)
    assert host_batches.agree_on_length(batch, s) is batch
