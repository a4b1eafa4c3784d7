"""LLaVA-Bench (COCO or In-the-Wild) for a LLaVA-1.5 checkpoint: greedy answers (vicuna_v1, 336 px, 'pad'),
reviewed by a judge at any OpenAI-compatible endpoint against the reference answers.

  python -m llava_jax.main --config=configs/llava_bench.py[:7b|13b] --mode=eval --checkpoint=/models/llava-v1.5-7b \\
    --config.eval.questions=llava-bench-in-the-wild/questions.jsonl \\
    --config.eval.context=llava-bench-in-the-wild/context.jsonl \\
    --config.eval.reference_answers=llava-bench-in-the-wild/answers_gpt4.jsonl \\
    --config.eval.image_root=llava-bench-in-the-wild/images \\
    --config.eval.rule_file=LLaVA/llava/eval/table/rule.json --judge_model=gpt-4o [--judge_base_url=...]
(OPENAI_API_KEY in the environment; without a rule file our own wording of the rules is used.) Numbers compare
with published ones only with the reference's judge model (gpt-4-0314, retired) and rule.json: name the judge
with every number (docs/evaluation.md). Answers as scripts/v1_5/eval/llavabench.sh: greedy, 1024 new tokens.
"""
from llava_jax import recipes as r


def get_config(size: str = "7b"):
  c = r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="vicuna_v1", image_aspect_ratio="pad"),
      train=r.train_section(),
      mesh=(1, -1, 1))
  c.eval = r.llava_bench_eval_section()
  return c
