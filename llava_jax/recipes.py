"""Building blocks for the config files in configs/: one function per component, composed per recipe.

A config is an ml_collections.ConfigDict with sections:
  model   — LlavaConfig fields (vision, text, projector, runtime), see llava_jax/config.py
  init    — where the weights come from (pretrained dirs, a stage-1 workdir, or random)
  data    — source, template, tokenizer, preprocessing, batching
  train   — trainable set, optimizer and schedule, steps, logging, checkpointing
  mesh    — (data, fsdp, tensor) device mesh; -1 takes the remaining devices
Field values follow the original LLaVA's training scripts (github.com/haotian-liu/LLaVA: `scripts/pretrain.sh`,
`scripts/finetune.sh`, `scripts/finetune_sqa.sh` for the paper; `scripts/v1_5/pretrain.sh`, `finetune.sh`,
`finetune_lora.sh` for v1.5): AdamW (0.9, 0.999), eps 1e-8, no weight decay, 3 % warmup then cosine, bf16,
gradient checkpointing, max length 2048.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

from llava_jax import limits, openai_client
from llava_jax.config import (LORA_MODULES_TO_SAVE, QUANTIZE_MODES, LlavaConfig, LoraConfig, RuntimeOptions, TextConfig,
                              VisionConfig)

STAGE1_TRAINABLE = r"multi_modal_projector/.*"
STAGE2_TRAINABLE = r"multi_modal_projector/.*|language_model/.*"
VISION_TOWER = r"vision_tower/.*"  # train.freeze's default: LLaVA never trains CLIP
LORA_TRAINABLE = r"multi_modal_projector/.*|.*/lora_(a|b)"  # LoRA fine-tuning: adapters + the projector


def lora_trainable(modules_to_save=()) -> str:
  """`train.trainable` of a LoRA stage: adapters + the projector (`LORA_TRAINABLE`), plus the decoder modules
  PEFT would save in full (`LoraConfig.modules_to_save`: 'lm_head', 'embed_tokens')."""
  paths = [f"language_model/{LORA_MODULES_TO_SAVE[m]}" for m in modules_to_save]
  return "|".join([LORA_TRAINABLE] + paths)


def _dc(obj) -> dict:
  return {k: (_dc(v) if dataclasses.is_dataclass(v) else v) for k, v in dataclasses.asdict(obj).items()}


def clip_vit_l14(image_size: int = 224) -> dict:
  """openai/clip-vit-large-patch14 (224 px, paper / v1) or -336 (v1.5)."""
  return _dc(VisionConfig(image_size=image_size))


def vicuna(size: str = "7b") -> dict:
  """Vicuna v1.5 (LLaMA-2 architecture, 4096 context)."""
  if size == "7b":
    return _dc(TextConfig())
  if size == "13b":
    return _dc(TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40))
  raise ValueError(f"vicuna size {size!r}: expected '7b' or '13b'")


def llama32_1b() -> dict:
  """meta-llama/Llama-3.2-1B(-Instruct): GQA 32/8, head_dim 64, tied embeddings, llama3 rope scaling."""
  text = _dc(TextConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                        bos_token_id=128000, eos_token_id=128009, pad_token_id=None))
  text["rope_scaling"] = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192, rope_type="llama3")
  return text


def model_section(vision: dict, text: dict, projector_type: str, image_token_index: int = 32000,
                  dtype: str = "bfloat16", param_dtype: str = "float32", remat_policy: str = "full",
                  attention_impl: str = "xla") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vision=vision, text=text, projector_type=projector_type, projector_bias=True,
      image_token_index=image_token_index, vision_feature_layer=-2, vision_feature_select_strategy="default",
      runtime=_dc(RuntimeOptions(dtype=dtype, param_dtype=param_dtype, scan_layers=True,
                                 remat_policy=remat_policy, attention_impl=attention_impl))))


def lora_section(rank: int = 128, alpha: float = 256.0, dropout: float = 0.05, **kw) -> dict:
  """`model.runtime.lora`: LoRA on the decoder (models/lora.py); defaults = LLaVA's finetune_lora.sh (r 128,
  alpha 256, dropout 0.05, every decoder linear but the lm_head). Train with `LORA_TRAINABLE`."""
  return _dc(LoraConfig(rank=rank, alpha=alpha, dropout=dropout, **kw))


def with_lora(config: ml_collections.ConfigDict, mm_projector_lr: float = 2e-5, **lora) -> ml_collections.ConfigDict:
  """A recipe turned into its LoRA variant (in place): adapters on the decoder (`lora_section(**lora)`), only
  adapters + projector trained, the projector at its own peak rate `mm_projector_lr` (reference: 2e-5 while the
  adapters use train.learning_rate, 2e-4)."""
  config.model.runtime.lora = lora_section(**lora)
  config.train.trainable = lora_trainable(config.model.runtime.lora.modules_to_save)
  config.train.mm_projector_lr = float(mm_projector_lr)
  return config


def with_quantize(config: ml_collections.ConfigDict, mode) -> ml_collections.ConfigDict:
  """Weight-only quantized decoder (`model.runtime.quantize`, models/quant.py) for inference (in place): set on
  the model section and on every stage's own `model.runtime` override, so the last stage (what chat / serve /
  eval load) has it. mode: None | 'int8' | 'int4' | 'nf4' (validated here, with the modes listed)."""
  if mode is not None and mode not in QUANTIZE_MODES:
    raise ValueError(f"quantize={mode!r}; choose one of {QUANTIZE_MODES}")
  config.model.runtime.quantize = mode
  for name in tuple(config.get("stages", ()) or ()):
    stage_model = config.get(name, {}).get("model") if name in config else None
    if stage_model is not None and stage_model.get("runtime") is not None:
      stage_model.runtime.quantize = mode
  return config


QLORA_QUANTIZE = "nf4"  # the reference's train.py `--bits 4` (bitsandbytes `bnb_4bit_quant_type='nf4'`)


def with_qlora(config: ml_collections.ConfigDict, quantize: str = QLORA_QUANTIZE, mm_projector_lr: float = 2e-5,
               **lora) -> ml_collections.ConfigDict:
  """A recipe turned into its QLoRA variant (in place): `with_lora`, and the decoder's Dense kernels stored
  quantized (`model.runtime.quantize`: 'nf4' as the reference's `--bits 4`, or 'int4' / 'int8'), frozen and
  dequantized inside each matmul in the compute dtype (train/qlora.py). Float starting weights are quantized on
  the host as they load."""
  with_lora(config, mm_projector_lr=mm_projector_lr, **lora)
  return with_quantize(config, quantize)


def init_section(**kw) -> ml_collections.ConfigDict:
  """Weights: `pretrained` (llava-hf or original LLaVA dir) or `language_model` + `vision_tower` (+ `projector`,
  a stage-1 mm_projector file) or `from_workdir` (a finished stage-1 run of ours); empty = random init."""
  d = dict(pretrained="", vision_tower="", language_model="", projector="", from_workdir="", seed=0,
           allow_pickle=False)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def data_section(**kw) -> ml_collections.ConfigDict:
  d = dict(
      source="llava_json",        # llava_json | scienceqa | synthetic | tfds
      json_path="", image_root="", scienceqa_root="", scienceqa_format="QCM-LEA", split="train",
      tfds_name="", tfds_data_dir="", tfds_adapter="",
      synthetic_samples=0, synthetic_seed=0, synthetic_caption=False, synthetic_multi_turn=False,
      synthetic_max_turns=3, synthetic_caption_positions=False,
      tokenizer="",               # directory with tokenizer files ('' = the language model's dir)
      template="vicuna_v1",
      image_aspect_ratio="square",  # square | pad
      max_length=2048,
      bucket_lengths=(512, 1024, 2048),
      packing=False,
      group_by_modality=False,
      worker_count=4,
      strict=False,
      max_pixels=limits.MAX_IMAGE_PIXELS,
      max_image_bytes=limits.MAX_IMAGE_BYTES,  # larger image files: skipped ('unreadable_image') unread
      max_images_per_sample=1,
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def train_section(**kw) -> ml_collections.ConfigDict:
  d = dict(
      trainable=STAGE2_TRAINABLE,
      freeze=VISION_TOWER,  # never trained whatever `trainable` says (LLaVA freezes CLIP); '' = none
      global_batch_size=128, micro_batches=1,
      learning_rate=2e-5, mm_projector_lr=0.0,  # > 0: the projector's own peak rate (LoRA recipes)
      warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0,
      b1=0.9, b2=0.999, eps=1e-8,
      num_epochs=1.0, num_steps=-1,  # num_steps > 0 overrides epochs
      seed=0, log_every=10, checkpoint_every=500, keep_checkpoints=3,
      chunked_loss=False,
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def total_steps(train, num_samples) -> int:
  """Optimizer steps of a run with the `train` section: train.num_steps when > 0, else
  ceil(num_epochs × num_samples / global_batch_size) (at least 1). The training loop and the plan both count so."""
  if int(train.num_steps) > 0:
    return int(train.num_steps)
  return max(1, math.ceil(float(train.num_epochs) * int(num_samples) / int(train.global_batch_size)))


def synthetic_eval_section(**overrides) -> ml_collections.ConfigDict:
  """The `eval` section for the synthetic shapes task (eval/synthetic.py; the demo's held-out questions), also run
  at the end of training when synthetic_samples > 0. Fields: kind 'synthetic'; synthetic_samples (0 = none);
  seed (of the held-out questions: not the training data's); batch_size; template ('' = data.template)."""
  d = dict(kind="synthetic", synthetic_samples=0, seed=0, batch_size=8, template="")
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def scienceqa_eval_section(**overrides) -> ml_collections.ConfigDict:
  """The `eval` section for ScienceQA (eval/scienceqa.py; configs/scienceqa.py). Fields:
  kind 'scienceqa'; split ('test'); prompt_format ('' = data.scienceqa_format; v1.5 used 'CQM-A'); answer_suffix ('' or ANSWER_SUFFIX for v1.5); template ('' = data.template); batch_size;
  max_new_tokens; parse_rules ('v1.5' | 'latest', see parse_answer); limit (0 = the whole split); out_dir
  ('' = <workdir>/eval/scienceqa_<split>); model_id (written in the predictions); judge_ensemble (bool); judge
  (openai_client.judge_settings(): base_url, model, ... — the key comes from the environment).
  """
  d = dict(kind="scienceqa", split="test", prompt_format="", answer_suffix="", template="", batch_size=8,
           max_new_tokens=1024, parse_rules="v1.5", limit=0, out_dir="", model_id="llava_jax",
           judge_ensemble=False, judge=openai_client.judge_settings())
  judge = overrides.pop("judge", {})
  d.update(overrides)
  d["judge"] = {**d["judge"], **judge}
  return ml_collections.ConfigDict(d)


def llava_bench_eval_section(**overrides) -> ml_collections.ConfigDict:
  """The `eval` section for LLaVA-Bench (eval/llava_bench.py). Fields: kind 'llava_bench'; questions, context, reference_answers
  (paths, see the module docstring); image_root (folder of the questions' images); rule_file ('' = built-in
  RULES); template ('' = data.template); batch_size; max_new_tokens; out_dir ('' = <workdir>/eval/llava_bench);
  model_id; judge (openai_client.judge_settings(); with no judge model the answers are generated, not
  reviewed)."""
  d = dict(kind="llava_bench", questions="", context="", reference_answers="", image_root="", rule_file="",
           template="", batch_size=8, max_new_tokens=1024, out_dir="", model_id="llava_jax",
           judge=openai_client.judge_settings())
  judge = overrides.pop("judge", {})
  d.update(overrides)
  d["judge"] = {**d["judge"], **judge}
  return ml_collections.ConfigDict(d)


def base_config(model, init, data, train, mesh=(-1, 1, 1)) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model, c.init, c.data, c.train = model, init, data, train
  c.mesh = tuple(mesh)
  return c


def llava_config(model_section_dict) -> LlavaConfig:
  """ConfigDict `model` section → LlavaConfig."""
  d = model_section_dict.to_dict() if hasattr(model_section_dict, "to_dict") else dict(model_section_dict)
  return LlavaConfig.from_dict(d)


def stage_configs(config):
  """[(name or None, config)] — one entry per stage with the stage's overrides applied."""
  names = tuple(config.get("stages", ()) or ())
  if not names:
    return [(None, config)]
  out = []
  for name in names:
    if name not in config:
      raise ValueError(f"config.stages names {name!r} but config has no section {name!r}")
    merged = ml_collections.ConfigDict(config.to_dict())
    for section, values in config[name].items():
      if isinstance(values, ml_collections.ConfigDict) and section in merged:
        for k, v in values.items():
          merged[section][k] = v
      else:
        merged[section] = values
    out.append((name, merged))
  return out


def last_stage(config):
  """(stage name or None, the config with the last stage's overrides): what a finished run's params are."""
  return stage_configs(config)[-1]
