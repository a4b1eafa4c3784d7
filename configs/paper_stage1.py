"""Paper stage 1 (feature alignment): CC3M-595K, 'plain' template, linear projector, 224 px, projector only.

`--config=configs/paper_stage1.py[:7b|13b]` (the paper used Vicuna-13B). Point init.language_model,
init.vision_tower and data.json_path / data.image_root at local copies.
"""
from llava_jax import recipes as r


def get_config(size: str = "13b"):
  return r.base_config(
      model=r.model_section(r.clip_vit_l14(224), r.vicuna(size), "linear"),
      init=r.init_section(language_model="", vision_tower=""),
      data=r.data_section(source="llava_json", template="plain", image_aspect_ratio="square", max_length=2048),
      train=r.train_section(trainable=r.STAGE1_TRAINABLE, global_batch_size=128, learning_rate=2e-3,
                            num_epochs=1.0, checkpoint_every=1000),
      mesh=(1, -1, 1))
