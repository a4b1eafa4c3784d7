"""ScienceQA fine-tune (paper Table 7): QCM-LEA (reasoning first), linear projector, 224 px, global batch 128,
LR 2e-5, 12 epochs, from a stage-1 (or stage-2) run. `--config=configs/scienceqa.py[:7b|13b]`
with data.scienceqa_root pointing at the raw release (problems.json, pid_splits.json, images/).
`--mode=eval` then answers the test split in the training format (reasoning, then "The answer is X.") and
prints Table 7; `--config.eval.judge_ensemble=True --judge_model=...` adds the paper's judge ensemble."""
from llava_jax import recipes as r


def get_config(size: str = "13b"):
  c = r.base_config(
      model=r.model_section(r.clip_vit_l14(224), r.vicuna(size), "linear"),
      init=r.init_section(),
      data=r.data_section(source="scienceqa", template="vicuna_v1", split="train", image_aspect_ratio="square"),
      train=r.train_section(trainable=r.STAGE2_TRAINABLE, global_batch_size=128, learning_rate=2e-5,
                            num_epochs=12.0),
      mesh=(1, -1, 1))
  c.eval = r.scienceqa_eval_section(split="test", max_new_tokens=1024)
  return c
