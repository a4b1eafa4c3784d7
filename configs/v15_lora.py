"""LLaVA-1.5 LoRA fine-tuning (the reference's scripts/v1_5/finetune_lora.sh): stage 2 on mix665k with LoRA
r 128, alpha 256, dropout 0.05 on every decoder linear (q/k/v/o/gate/up/down), the projector trained fully at
mm_projector_lr 2e-5 while the adapters use 2e-4; global batch 128 (4 GPUs × 16 × 2 accumulation), 1 epoch,
warmup 0.03, cosine, weight decay 0, bf16 with gradient checkpointing; the vision tower and the base decoder
weights stay frozen (no gradient, no optimizer state).

`--config=configs/v15_lora.py[:7b|13b] --config.init.language_model=<vicuna-7b-v1.5>
 --config.init.vision_tower=<clip-vit-large-patch14-336> --config.init.projector=<stage-1 mm_projector.bin>`
(or `--config.init.from_workdir=<v15_stage1 workdir>`). Export: `export_hf` writes the merged model,
`llava_jax.checkpoints.peft.export_peft_adapter` the adapter alone in PEFT's format.
"""
from llava_jax import recipes as r


def get_config(size: str = "7b"):
  c = r.base_config(
      model=r.model_section(r.clip_vit_l14(336), r.vicuna(size), "mlp2x_gelu"),
      init=r.init_section(),
      data=r.data_section(source="llava_json", template="vicuna_v1", image_aspect_ratio="pad",
                          group_by_modality=True),
      train=r.train_section(global_batch_size=128, learning_rate=2e-4, num_epochs=1.0),
      mesh=(1, -1, 1))
  return r.with_lora(c, mm_projector_lr=2e-5, rank=128, alpha=256.0, dropout=0.05)
