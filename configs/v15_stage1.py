"""LLaVA-1.5 stage 1: LCS-558K, 'plain' template, mlp2x_gelu projector, 336 px, projector only,
global batch 256, LR 1e-3, 1 epoch. `--config=configs/v15_stage1.py[:7b|13b]`."""
from llava_jax import recipes as r


def get_config(size: str = "7b"):
  return r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="plain", image_aspect_ratio="square"),
      train=r.train_section(trainable=r.STAGE1_TRAINABLE, global_batch_size=256, learning_rate=1e-3,
                            num_epochs=1.0, checkpoint_every=1000),
      mesh=(1, -1, 1))
