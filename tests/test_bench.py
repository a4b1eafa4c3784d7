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
  assert "| benchmark | unit | llava_jax | PyTorch | ratio | target | result |" in md
  assert len(doc["meta"]["git"]["commit"]) == 40 and f"Commit `{doc['meta']['git']['commit']}`" in md
  for key in ("train_tokens_per_s", "decode_b1_tokens_per_s", "train_mfu"):  # issue 8's targets, kept by issue 13
    assert rows[key]["target"] is not None and (("PASS" if rows[key]["met"] else "FAIL") in md)
  assert md.count("\n| ") - 1 == len(rows)  # header + one line per row (the separator starts with '|-')
  assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_7b_group_code_path_on_tiny_shapes(tmp_path):
  """`--only 7b` end to end on TINY (same structure as llava-v1.5-7b): the generated checkpoint has exactly the
  keys and shapes transformers 5's save_pretrained writes and loads in transformers without missing keys;
  every requested row has its numbers; both bf16 sides pick the same first greedy token; the index validates
  (reused) and a truncated shard is caught (regenerated). Nothing timed is asserted."""
  import torch
  import transformers
  from bench import big_ckpt, big_report
  from llava_jax import allocator
  from llava_jax.checkpoints.reader import read_safetensors_header
  ckpt, out = tmp_path / "ckpt", tmp_path / "results"
  cmd = [sys.executable, "-m", "bench.run", "--only", "7b", "--big-shapes", "tiny", "--big-dir", str(ckpt),
         "--out-dir", str(out), "--big-rows", "ours_bf16,hf_bf16,torch_int8,kernels", "--big-new-tokens", "4",
         "--threads", "1", "--date", "smoke"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((out / "smoke-7b.json").read_text())
  assert doc["report"]["checkpoint"]["reused"] is False and doc["report"]["checkpoint"]["shards"] > 1
  assert set(doc["raw"]) == {"ours_bf16", "hf_bf16", "torch_int8", "kernels"} and not doc["report"]["skipped"]
  assert len(doc["meta"]["git"]["commit"]) == 40 and all(len(r["git"]["commit"]) == 40 for r in doc["raw"].values())
  kernels = doc["raw"].pop("kernels")  # the matmul ceilings: every pair timed on both sides
  assert {r["label"] for r in doc["report"]["kernels"]} == {p[0] for p in big_report.KERNEL_PAIRS}
  assert all(r["ours_ms"] > 0 and r["ref_ms"] > 0 and r["ratio"] > 0 for r in doc["report"]["kernels"])
  assert kernels["jax"]["gemm_bf16"]["m"] == 1 + 32 + big_ckpt.TINY.num_patches
  # every child ran under the allocator the report names (tcmalloc when installed, both sides), and our kernels
  # were timed again under the system malloc
  tcmalloc = allocator.find_tcmalloc() is not None
  assert doc["meta"]["allocator"].startswith("tcmalloc" if tcmalloc else "system malloc")
  assert all(r["facts"]["tcmalloc"] is tcmalloc for r in doc["raw"].values())
  assert ("jax_system_malloc" in kernels) is tcmalloc
  assert all((r["system_ms"] is not None) is tcmalloc for r in doc["report"]["kernels"])
  rows = {r["key"]: r for r in doc["report"]["rows"]}
  for key in ("ttft_ours_bf16", "decode_ours_bf16"):
    r = rows[key]
    assert r["ours"] > 0 and r["reference"] > 0 and r["met"] is not None, r
  assert rows["import_rss_ours_bf16"]["target"] == 1.3 and rows["import_rss_ours_bf16"]["met"] is not None
  for r in doc["raw"].values():
    assert len(r["tokens"]) == 4 and r["ttft_s"] > 0 and r["decode_step_s"] > 0
  assert doc["raw"]["ours_bf16"]["tokens"][0] == doc["raw"]["hf_bf16"]["tokens"][0]
  assert doc["raw"]["ours_bf16"]["recompiled"] is False
  md = (out / "smoke-7b.md").read_text()
  assert "| benchmark | unit | llava_jax | reference | ratio | target | result |" in md
  assert "Matmul ceilings" in md

  # the key set and shapes are what transformers 5 itself saves for this architecture, and it loads cleanly
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.bfloat16,
                                                                           output_loading_info=True)
  assert not any(info.values()), info
  resaved = tmp_path / "resaved"
  model.save_pretrained(str(resaved))
  theirs = {}
  for f in resaved.glob("*.safetensors"):
    theirs.update({k: tuple(v["shape"]) for k, v in read_safetensors_header(str(f))[0].items()})
  assert theirs == dict(big_ckpt.tensor_plan(big_ckpt.TINY))

  # reuse validates the index and the shards; a truncated shard is regenerated
  assert big_ckpt.ensure_checkpoint(big_ckpt.TINY, str(ckpt))["reused"] is True
  shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
  with open(shard, "r+b") as f:
    f.truncate(shard.stat().st_size - 2)
  assert "truncated" in big_ckpt.validate(big_ckpt.TINY, str(ckpt))
  assert big_ckpt.ensure_checkpoint(big_ckpt.TINY, str(ckpt))["reused"] is False
