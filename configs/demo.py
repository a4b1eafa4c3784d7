"""The embedded demo (the README's main command): a small LLaVA trained from scratch on the synthetic shapes
data, stage 1 (captions) then stage 2 (visual QA, projector + LLM), then evaluated on held-out questions. No
downloads; minutes on a 2-core CPU.

What is real: the whole data path (templates, span masks, CLIP preprocessing, grain), the two-stage recipe
with the vision tower frozen, the token-weighted loss, orbax checkpoints and resume, metrics and plots.
What is scaled down: every size, and the learning rates (a from-scratch toy needs larger steps than
fine-tuning Vicuna). The vision tower is random and frozen, as LLaVA freezes CLIP: the projector and the
decoder learn to read random-but-fixed patch features, which carry colour, shape and (weakly) position.

One deliberate difference from LLaVA's recipe: LLaVA's stage 1 trains the projector only because its LLM is
a pretrained Vicuna (configs/paper_stage1.py, v15_stage1.py do exactly that). The demo's decoder is random,
so its stage 1 trains projector + decoder on captions that say what is where ("a red circle at the top left
and ..."), standing in for the language pretraining the demo cannot download; stage 2 is LLaVA's.
Stage 2 samples carry up to 6 questions (more supervised answer tokens per row for the same step cost).

`--config=configs/demo.py:lora`: stage 2 is LoRA fine-tuning instead (issue 13: its accuracy against the full
fine-tune's): adapters rank 16 / alpha 32 on every decoder linear at half the full fine-tune's rate, the
projector trained fully at the full fine-tune's rate, and the lm_head and token embeddings trained fully too
(PEFT's `modules_to_save`; README.md has the settings tried and their scores). LLaVA's finetune_lora trains
neither: its Vicuna already writes every token it is asked for. The demo's decoder has only ever written
captions: with its lm_head and embeddings frozen the LoRA stage never learns the answer words, the chat format
or `</s>` (held-out accuracy 36 %, at the majority-answer baseline). Stage 1 unchanged (the LoRA stage starts
from its params).
"""
import ml_collections

from llava_jax import recipes as r

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
TEXT = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, head_dim=None, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def get_config(arg: str = ""):
  c = r.base_config(
      model=r.model_section(VISION, TEXT, "mlp2x_gelu", image_token_index=TEXT["vocab_size"] - 1,
                            dtype="float32", remat_policy="none"),
      init=r.init_section(seed=0),
      data=r.data_section(source="synthetic", synthetic_samples=20000, tokenizer="synthetic",
                          template="vicuna_v1", max_length=128, bucket_lengths=(64, 96, 128), worker_count=0),
      train=r.train_section(global_batch_size=32, warmup_ratio=0.05, log_every=20, checkpoint_every=200,
                            keep_checkpoints=2),
      mesh=(-1, 1, 1))
  c.stages = ("stage1", "stage2")
  c.stage1 = ml_collections.ConfigDict(dict(
      data=dict(synthetic_caption=True, synthetic_caption_positions=True, template="plain"),
      train=dict(trainable=r.STAGE2_TRAINABLE, learning_rate=3e-3, num_steps=300)))
  c.stage2 = ml_collections.ConfigDict(dict(
      data=dict(synthetic_caption=False, synthetic_multi_turn=True, synthetic_max_turns=6, template="vicuna_v1"),
      train=dict(trainable=r.STAGE2_TRAINABLE, learning_rate=2e-3, num_steps=600)))
  c.eval = r.synthetic_eval_section(synthetic_samples=400, seed=987654, batch_size=32)
  if arg == "lora":
    lora = r.lora_section(rank=16, alpha=32.0, modules_to_save=("lm_head", "embed_tokens"))
    runtime = dict(c.model.runtime.to_dict(), lora=lora)               # stages replace a whole model field
    c.stage2.model = ml_collections.ConfigDict(dict(runtime=runtime))
    c.stage2.train.update(trainable=r.lora_trainable(lora["modules_to_save"]), learning_rate=1e-3,
                          mm_projector_lr=2e-3)
  elif arg:
    raise ValueError(f"configs/demo.py takes '' or 'lora', got {arg!r}")
  return c
