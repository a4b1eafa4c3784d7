"""Paper stage 2 (visual instruction tuning): LLaVA-Instruct-158K, vicuna_v0 ('###') template, linear
projector, 224 px, projector + LLM, global batch 32, LR 2e-5, 3 epochs.

`--config=configs/paper_stage2.py[:7b|13b] --config.init.from_workdir=<stage-1 workdir>`.
"""
from llava_jax import recipes as r


def get_config(size: str = "13b"):
  return r.base_config(
      model=r.model_section(r.clip_vit_l14(224), r.vicuna(size), "linear"),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="vicuna_v0", image_aspect_ratio="square"),
      train=r.train_section(trainable=r.STAGE2_TRAINABLE, global_batch_size=32, learning_rate=2e-5,
                            num_epochs=3.0),
      mesh=(1, -1, 1))
