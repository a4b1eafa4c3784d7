"""LLaVA-1.5 stage 2: mix665k, vicuna_v1 template, image_aspect_ratio 'pad', mlp2x_gelu, 336 px,
projector + LLM, global batch 128, LR 2e-5, 1 epoch. `--config=configs/v15_stage2.py[:7b|13b]`
with `--config.init.from_workdir=<v15_stage1 workdir>` (or init.projector=<mm_projector.bin>)."""
from llava_jax import recipes as r


def get_config(size: str = "7b"):
  return r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="vicuna_v1", image_aspect_ratio="pad",
                          group_by_modality=True),
      train=r.train_section(trainable=r.STAGE2_TRAINABLE, global_batch_size=128, learning_rate=2e-5,
                            num_epochs=1.0),
      mesh=(1, -1, 1))
