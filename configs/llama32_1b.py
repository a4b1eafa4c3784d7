"""LLaVA with a LLaMA-3.2-1B decoder (the cheap student setting): v1.5 recipe shape, 336 px, mlp2x_gelu.
`--config=configs/llama32_1b.py[:stage1|stage2]`. The template for Llama-3 chat models is not one of the
reference's; register one (data/conversation.py) or use 'plain' for stage 1."""
from llava_jax import recipes as r


def get_config(stage: str = "stage2"):
  if stage not in ("stage1", "stage2"):
    raise ValueError(f"llama32_1b stage {stage!r}: expected stage1 or stage2")
  s1 = stage == "stage1"
  return r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.llama32_1b(), "mlp2x_gelu", image_token_index=-200),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="plain" if s1 else "chatml",
                          image_aspect_ratio="square" if s1 else "pad"),
      train=r.train_section(trainable=r.STAGE1_TRAINABLE if s1 else r.STAGE2_TRAINABLE,
                            global_batch_size=256 if s1 else 128, learning_rate=1e-3 if s1 else 2e-5),
      mesh=(1, -1, 1))
