"""ScienceQA evaluation of a released checkpoint as its authors evaluated it; Table 7 layout.

Default (`:7b` / `:13b`): LLaVA-1.5 zero-shot, as scripts/v1_5/eval/sqa.sh: the test split in the 'CQM-A' format
(llava_test_CQM-A.json) + "Answer with the option's letter from the given choices directly.", conv-mode
vicuna_v1, 336 px with 'pad', greedy (--temperature 0), max_new_tokens 1024 (model_vqa_science.py).

`:paper`: the paper's ScienceQA model (LLaVA-13b-v0-science_qa, linear projector, 224 px), as the reference's
scripts/sqa_eval_batch.sh ran it from LLaVA v1.0.0 on: 'QCM' questions, conv-mode llava_v0 (the v0 `###` prompt
without a worked example), no answer suffix, max_new_tokens 1024. Not reproduced: its `--answer-prompter` second
pass, and its sampling at temperature 0.2 (we decode greedily); the April 2023 scripts used conv-mode 'simple'
(another system text and a "Hi!" example), which is not a template here.

  python -m llava_jax.main --config=configs/scienceqa_eval.py[:7b|13b|paper] --mode=eval \\
    --checkpoint=/models/llava-v1.5-7b --config.data.scienceqa_root=/data/scienceqa [--workdir=runs/sqa]
"""
from llava_jax import recipes as r
from llava_jax.eval.scienceqa import ANSWER_SUFFIX


def get_config(size: str = "7b"):
  if size == "paper":
    c = r.base_config(
        model=r.model_section(r.clip_vit_l14(224), r.vicuna("13b"), "linear"),
        init=r.init_section(),
        data=r.data_section(source="scienceqa", template="llava_v0", split="test", image_aspect_ratio="square"),
        train=r.train_section(),
        mesh=(1, -1, 1))
    c.eval = r.scienceqa_eval_section(split="test", prompt_format="QCM-LEA", answer_suffix="",
                                      template="llava_v0", max_new_tokens=1024)
    return c
  c = r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="scienceqa", template="vicuna_v1", split="test", image_aspect_ratio="pad"),
      train=r.train_section(),
      mesh=(1, -1, 1))
  c.eval = r.scienceqa_eval_section(split="test", prompt_format="CQM-A", answer_suffix=ANSWER_SUFFIX,
                                    template="vicuna_v1", max_new_tokens=1024)
  return c
