"""ScienceQA zero-shot evaluation of a LLaVA-1.5 checkpoint as LLaVA-1.5 reports it: the test split in the
'CQM-A' format (llava_test_CQM-A.json) + "Answer with the option's letter from the given choices directly.",
vicuna_v1, 336 px with 'pad', greedy; Table 7 layout.

  python -m llava_jax.main --config=configs/scienceqa_eval.py[:7b|13b] --mode=eval \\
    --checkpoint=/models/llava-v1.5-7b --config.data.scienceqa_root=/data/scienceqa [--workdir=runs/sqa]
"""
from llava_jax import recipes as r
from llava_jax.eval.scienceqa import ANSWER_SUFFIX, eval_config


def get_config(size: str = "7b"):
  c = r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="scienceqa", template="vicuna_v1", split="test", image_aspect_ratio="pad"),
      train=r.train_section(),
      mesh=(1, -1, 1))
  c.eval = eval_config(split="test", prompt_format="CQM-A", answer_suffix=ANSWER_SUFFIX, max_new_tokens=128)
  return c
