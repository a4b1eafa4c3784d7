"""A recipe's wall clock at a given MFU: the reference recipes' published sizes and times, and step time from the
FLOP model (`models/flops.py`); step counts are `recipes.total_steps`."""
from __future__ import annotations

from llava_jax.models.flops import StepFlops

# Published numbers of the reference recipes (samples as released; wall clock from the LLaVA-1.5 paper / model
# zoo, PyTorch + DeepSpeed on one 8×A100 node). Keys are configs/ file names.
DATASETS = {
    "paper_stage1": ("CC3M-595K (LLaVA filtered)", 595_375),
    "paper_stage2": ("LLaVA-Instruct-158K", 157_712),
    "scienceqa": ("ScienceQA train", 12_726),
    "v15_stage1": ("LCS-558K (blip_laion_cc_sbu_558k)", 558_128),
    "v15_stage2": ("llava_v1_5_mix665k", 665_298),
}
PUBLISHED_HOURS = {  # (config name, size) → hours on 8×A100
    ("v15_stage1", "7b"): 3.5, ("v15_stage2", "7b"): 10.0,
    ("v15_stage1", "13b"): 5.5, ("v15_stage2", "13b"): 20.0,
    ("paper_stage1", "13b"): 4.0,
}


def step_seconds(flops: StepFlops, peak_flops_total: float, mfu: float) -> float:
  """Seconds per step when the useful (model) FLOPs run at `mfu` of the devices' combined peak."""
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu} must be in (0, 1]")
  return flops.model / (peak_flops_total * mfu)
