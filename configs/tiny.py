"""A tiny LLaVA (random init) on the synthetic shapes data: for tests and smoke runs; seconds per stage.

The tokenizer is a SentencePiece BPE trained on the synthetic texts (vocab_size - 1 pieces); the last id is
the image placeholder, as llava-hf appends `<image>` after the LLaMA vocabulary.
`--config=configs/tiny.py:lora`: the LoRA variant (rank 4 adapters on the decoder, projector at its own rate);
`:qlora` the same adapters on an NF4-quantized, frozen decoder (recipes.with_qlora).
"""
import ml_collections

from llava_jax import recipes as r

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
TEXT = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=None, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_scaling=None, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def get_config(arg: str = ""):
  c = r.base_config(
      model=r.model_section(VISION, TEXT, "mlp2x_gelu", image_token_index=383, dtype="float32",
                            remat_policy="none"),
      init=r.init_section(seed=0),
      data=r.data_section(source="synthetic", synthetic_samples=64, tokenizer="synthetic", template="vicuna_v1",
                          max_length=160, bucket_lengths=(160,), worker_count=0),
      train=r.train_section(trainable=r.STAGE2_TRAINABLE, global_batch_size=8, learning_rate=1e-3,
                            warmup_ratio=0.1, num_steps=4, log_every=1, checkpoint_every=2, keep_checkpoints=2),
      mesh=(-1, 1, 1))
  c.eval = ml_collections.ConfigDict(dict(synthetic_samples=16, seed=12345, batch_size=8))
  c.stages = ()
  if arg == "lora":
    r.with_lora(c, mm_projector_lr=3e-4, rank=4, alpha=8.0, dropout=0.05)
  elif arg == "qlora":
    r.with_qlora(c, mm_projector_lr=3e-4, rank=4, alpha=8.0, dropout=0.05)
  elif arg:
    raise ValueError(f"configs/tiny.py takes '', 'lora' or 'qlora', got {arg!r}")
  return c
