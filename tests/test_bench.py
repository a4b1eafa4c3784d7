"""Smoke test of the benchmark harness: `python -m bench.run --preset quick` end to end, report structure only.

No timing is asserted (the machine is shared); what is asserted could fail: every benchmark produced a row
with both sides' numbers, the two frameworks computed the same first training loss and the same first greedy
token from the same converted weights, the children ran with the requested thread environment, and the
markdown / PNG / JSON outputs exist and agree.
"""
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = {"train_tokens_per_s", "prefill_speedup", "decode_b1_tokens_per_s", "decode_b2_tokens_per_s",
                 "vision_images_per_s", "data_samples_per_s", "train_mfu", "ckpt_staging_over_largest_shard"}


def test_quick_run_writes_a_complete_report(tmp_path):
  out = tmp_path / "results"
  env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")  # the harness must drop it for its children
  proc = subprocess.run([sys.executable, "-m", "bench.run", "--preset", "quick", "--threads", "1",
                         "--out-dir", str(out), "--date", "smoke"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((out / "smoke.json").read_text())

  rows = {r["key"]: r for r in doc["report"]["rows"]}
  assert set(rows) == EXPECTED_ROWS
  for key, r in rows.items():
    assert isinstance(r["ours"], float) and math.isfinite(r["ours"]) and r["ours"] > 0, (key, r)
    if key not in ("train_mfu", "ckpt_staging_over_largest_shard"):  # those compare with a target, not PyTorch
      assert isinstance(r["reference"], float) and r["reference"] > 0, (key, r)
    assert r["ratio"] is not None and r["ratio"] > 0, (key, r)
    assert (r["met"] is None) == (r["target"] is None), (key, r)

  # same weights on both sides: equal first loss and equal first greedy token of every decode row
  sanity = doc["report"]["sanity"]
  assert sanity["first_train_loss"]["rel_diff"] < 1e-4, sanity
  for b in ("1", "2"):
    ours = doc["raw"]["jax"]["benches"][f"decode_b{b}"]["info"]["tokens"]
    ref = doc["raw"]["torch"]["benches"][f"decode_b{b}"]["info"]["tokens"]
    assert [r[0] for r in ours] == [r[0] for r in ref]

  # MFU pieces are consistent: achieved = model FLOPs / median step time, peak = best measured matmul
  mfu = doc["report"]["mfu"]
  assert math.isclose(mfu["achieved_flops"],
                      mfu["model_flops_per_step"]["total"]
                      / doc["raw"]["jax"]["benches"]["train"]["summary"]["s"]["median"], rel_tol=1e-9)
  assert mfu["peak_flops"] == max(mfu["peak_jax"], mfu["peak_torch"])
  # PyTorch is credited with the lm_head at every position (what it runs), ours with what ours runs
  flops = mfu["model_flops_per_step"]
  assert flops["reference_total"] >= flops["total"] and flops["lm_head_positions"] <= flops["all_positions"]
  assert math.isclose(mfu["reference_achieved_flops"],
                      flops["reference_total"]
                      / doc["raw"]["torch"]["benches"]["train"]["summary"]["s"]["median"], rel_tol=1e-9)

  # every child ran with the thread environment the report states
  for task, facts in doc["meta"]["child_facts"].items():
    assert facts["affinity"] == doc["meta"]["affinity"] and len(facts["affinity"]) == 1, task
    assert facts["env"]["OMP_NUM_THREADS"] == "1" and facts["env"]["OPENBLAS_CORETYPE"] is None, task
  assert doc["raw"]["torch"]["facts"]["torch_threads"] == 1
  assert len(doc["meta"]["loadavg_samples"]) >= 2

  md = (out / "smoke.md").read_text()
  assert "| benchmark | unit | llava_jax | PyTorch | ratio | target | met |" in md
  assert md.count("\n| ") - 1 == len(rows)  # header + one line per row (the separator starts with '|-')
  assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
