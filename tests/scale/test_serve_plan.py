"""The serving plan: KV cache per token, and the search for the largest batch that fits (on synthetic compiler
numbers, so every branch is exercised in milliseconds; the real prefill / decode compiles are in
test_tpu_compile.py and the command line below)."""
import os
import subprocess
import sys
import types

import jax
import pytest

from llava_jax import recipes
from llava_jax.scale import serve
from llava_jax.scale import tpu as tpu_lib
from tests.fixtures import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20


def test_kv_bytes_per_token_by_hand():
  cfg = recipes.llava_config(load_config("v15_stage2", "7b").model)  # 32 layers, 32 kv heads of 128, bf16
  assert serve.kv_bytes_per_token(cfg) == 2 * 32 * 32 * 128 * 2 == 512 * 1024
  small = recipes.llava_config(load_config("llama32_1b").model)  # 16 layers, 8 kv heads of 64 (GQA)
  t = small.text
  assert (t.num_hidden_layers, t.num_key_value_heads, t.resolved_head_dim) == (16, 8, 64)
  assert serve.kv_bytes_per_token(small) == 2 * 16 * 8 * 64 * 2


def _fake_compiles(monkeypatch, bytes_of_rows, shards):
  """compile_generate → objects whose memory_analysis() reports bytes_of_rows(rows per device) (prefill) and
  half of it (decode); records the batches compiled."""
  batches = []

  def stats(total):
    return types.SimpleNamespace(argument_size_in_bytes=total, output_size_in_bytes=0, alias_size_in_bytes=0,
                                 temp_size_in_bytes=0, generated_code_size_in_bytes=0)

  def fake(model_config, mesh, *, batch, prompt_len, max_new, num_images=1):
    assert batch % shards == 0
    batches.append(batch)
    rows = batch // shards
    phase = lambda total: serve.Compiled(types.SimpleNamespace(memory_analysis=lambda: stats(total)), ())
    return phase(bytes_of_rows(rows)), phase(bytes_of_rows(rows) // 2)

  monkeypatch.setattr(serve, "compile_generate", fake)
  return batches


@pytest.mark.parametrize("budget_mib", [130, 1000, 5000])
def test_largest_batch_search(monkeypatch, budget_mib):
  """Bytes grow faster than linearly with the rows (temporaries): the search still lands on the largest fitting
  batch, checked by a compile, and every measured larger batch exceeds the budget."""
  cost = lambda r: 100 * MIB + r * 10 * MIB + r * r * MIB // 4
  want = max(r for r in range(1, 1000) if cost(r) <= budget_mib * MIB)
  batches = _fake_compiles(monkeypatch, cost, 8)
  cfg = recipes.llava_config(load_config("tiny").model)
  sp = serve.plan_serving(cfg, jax.devices()[:8], budget_mib * MIB, context=256, max_new=32, max_checks=16)
  assert sp.max_rows_per_device == want
  assert sp.checked.rows_per_device == want and sp.checked.peak == cost(want) <= budget_mib * MIB
  assert all(m.peak > budget_mib * MIB for m in sp.measures if m.rows_per_device > want)
  assert batches[:2] == [8, 16] and len(batches) <= 18  # 1 and 2 rows per device, then the search
  assert sp.per_row_bytes == cost(2) - cost(1)
  assert sp.kv_per_row_per_device == serve.kv_bytes_per_token(cfg) * 256
  assert f"{want} rows per device ({8 * want} in all" in sp.render()


def test_a_larger_probe_skips_the_small_batch_overhead(monkeypatch):
  """One row per device carries less than its share of fixed overhead (decode state, layout): with the second
  measure at 8 rows instead of 2 the fitted per-row slope is the large-batch one, and two checks land on the
  largest fitting batch."""
  cost = lambda r: 100 * MIB + r * 10 * MIB + (30 * MIB if r > 1 else 0)
  budget = 1000 * MIB
  want = max(r for r in range(1, 1000) if cost(r) <= budget)
  batches = _fake_compiles(monkeypatch, cost, 8)
  cfg = recipes.llava_config(load_config("tiny").model)
  sp = serve.plan_serving(cfg, jax.devices()[:8], budget, context=256, max_new=32, max_checks=2, probe_rows=8)
  assert batches[:2] == [8, 64] and len(batches) == 4
  assert sp.per_row_bytes == (cost(8) - cost(1)) / 7
  assert sp.max_rows_per_device == want and sp.checked.peak == cost(want)

def test_nothing_fits_when_one_row_does_not(monkeypatch):
  _fake_compiles(monkeypatch, lambda r: 100 * MIB + r * 10 * MIB, 8)
  cfg = recipes.llava_config(load_config("tiny").model)
  sp = serve.plan_serving(cfg, jax.devices()[:8], 50 * MIB, context=256, max_new=32)
  assert sp.max_rows_per_device == 0 and sp.checked is None
  assert "does not fit" in sp.render()


@pytest.mark.skipif(not tpu_lib.libtpu_available(), reason="libtpu is not installed (pip install -e '.[dev]')")
def test_cli_serving_plan_on_the_tpu_compiler():
  """`--mode=plan --plan.serve` compiles generate's prefill and decode for a v5e slice on libtpu, from the entry
  point as a user runs it: no JAX_PLATFORMS, and no libtpu start-up error on this TPU-less machine."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  cmd = [sys.executable, "-m", "llava_jax.main", "--mode=plan", "--config=configs/tiny.py", "--plan.topology=v5e-4",
         "--plan.serve=True", "--plan.train=False", "--plan.serve_context=128", "--plan.serve_new=16",
         "--plan.serve_max_rows=2"]  # the search itself is tested above: compile 1 and 2 rows per chip only
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "libtpu's TPU compiler for v5e:2x2" in out.stdout and "FALLBACK" not in out.stdout
  # tiny: 2 layers × 2 kv heads × 16 dims × k, v × float32 = 512 B per token
  assert "KV cache 512 B per token = 64 KiB per row per device" in out.stdout
  assert "largest batch: 2 rows per device (8 in all" in out.stdout
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "INVALID_ARGUMENT" not in out.stderr


@pytest.mark.skipif(not tpu_lib.libtpu_available(), reason="without libtpu jax has no TPU backend to try")
def test_entry_point_skips_the_absent_tpu():
  """With libtpu installed, no TPU attached and JAX_PLATFORMS unset, main's start-up picks CPU before jax
  tries (and loudly fails) to start libtpu."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "from llava_jax.main import skip_absent_tpu; skip_absent_tpu(); import jax; print(jax.default_backend())"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "INVALID_ARGUMENT" not in out.stderr
