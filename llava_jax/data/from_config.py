"""The config's `data` section → source, tokenizer, template and pipeline (used by train, eval and inspect)."""
from __future__ import annotations

import logging
import os
from typing import Optional

from etils import epath

from llava_jax.config import LlavaConfig
from llava_jax.data import conversation
from llava_jax.data.sources import LlavaJsonSource, ScienceQASource, SyntheticShapesSource, TfdsSource
from llava_jax.data.tokenizer import load_tokenizer, train_tokenizer
from llava_jax.errors import require_path

logger = logging.getLogger(__name__)

SYNTHETIC_TOKENIZER = "synthetic"  # data.tokenizer value: train a tiny BPE on the synthetic texts


def build_source(data, model_config: LlavaConfig, *, split: Optional[str] = None, seed: Optional[int] = None,
                 num_samples: Optional[int] = None):
  """A random-access source for data.source ('llava_json' | 'scienceqa' | 'synthetic' | 'tfds')."""
  kind = data.source
  if kind == "llava_json":
    if not data.json_path:
      raise ValueError("data.source='llava_json' needs --config.data.json_path=<file.json> "
                       "(and data.image_root for image samples)")
    require_path(data.json_path, "--config.data.json_path")
    return LlavaJsonSource(data.json_path, data.image_root or None, strict=bool(data.strict))
  if kind == "scienceqa":
    if not data.scienceqa_root:
      raise ValueError("data.source='scienceqa' needs --config.data.scienceqa_root=<dir with problems.json, "
                       "pid_splits.json, images/>")
    require_path(data.scienceqa_root, "--config.data.scienceqa_root")
    return ScienceQASource(data.scienceqa_root, split or data.split,
                           prompt_format=data.scienceqa_format)
  if kind == "synthetic":
    n = num_samples if num_samples is not None else int(data.synthetic_samples)
    if n <= 0:
      raise ValueError("data.source='synthetic' needs data.synthetic_samples > 0")
    return SyntheticShapesSource(n, seed=int(data.synthetic_seed if seed is None else seed),
                                 image_size=model_config.vision.image_size,
                                 multi_turn=bool(data.synthetic_multi_turn),
                                 max_turns=int(data.synthetic_max_turns),
                                 caption_positions=bool(data.synthetic_caption_positions),
                                 style="caption" if data.synthetic_caption else "qa")
  if kind == "tfds":
    if not data.tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name (and data.tfds_data_dir, data.tfds_adapter)")
    return TfdsSource(data.tfds_name, split or data.split, data_dir=data.tfds_data_dir or None,
                      adapter=data.tfds_adapter or None)
  raise ValueError(f"data.source={kind!r}; choose llava_json, scienceqa, synthetic or tfds")


def tokenizer_dir(config, workdir: Optional[str]) -> str:
  """Where the tokenizer lives: data.tokenizer, else the language model's / pretrained checkpoint's directory."""
  data, init = config.data, config.init
  if data.tokenizer == SYNTHETIC_TOKENIZER:
    if not workdir:
      raise ValueError("a synthetic tokenizer is trained into the workdir; pass --workdir")
    return os.fspath(epath.Path(workdir) / "tokenizer")
  path = data.tokenizer or init.pretrained or init.language_model
  if not path:
    raise ValueError("no tokenizer: set --config.data.tokenizer=<dir> (or init.pretrained / init.language_model)")
  return path


def build_tokenizer(config, model_config: LlavaConfig, workdir: Optional[str]):
  """Load the tokenizer; for data.tokenizer='synthetic' train it once (vocab_size − 1 pieces; the last id is the
  image placeholder) from synthetic conversations rendered with every registered template's system text."""
  path = tokenizer_dir(config, workdir)
  if config.data.tokenizer == SYNTHETIC_TOKENIZER and not (epath.Path(path) / "tokenizer.json").exists():
    texts = synthetic_corpus(config, model_config)
    logger.info("training a %d-piece tokenizer on %d synthetic texts into %s", model_config.text.vocab_size - 1,
                len(texts), path)
    return train_tokenizer(texts, path, vocab_size=model_config.text.vocab_size - 1)
  return load_tokenizer(path)


def synthetic_corpus(config, model_config: LlavaConfig, num_samples: int = 2000) -> list:
  """Rendered conversations (QA and captions, all templates' tags) of the synthetic source."""
  texts = []
  seed = int(config.data.synthetic_seed)
  for style in ("qa", "caption"):
    src = SyntheticShapesSource(num_samples, seed=seed, image_size=model_config.vision.image_size,
                                multi_turn=True, style=style)
    for i in range(num_samples):
      convs = src[i]["conversations"]
      for name in ("vicuna_v1", "vicuna_v0", "llava_llama_2", "plain"):
        try:
          texts.append(conversation.prompt_text(conversation.render(convs, conversation.get_template(name))))
        except ValueError:  # e.g. 'plain' takes single-turn samples only
          pass
  return texts


def pipeline_kwargs(config, model_config: LlavaConfig, tokenizer) -> dict:
  """Keyword arguments of data.pipeline.make_pipeline from the config (without source, seed and batch size)."""
  data = config.data
  buckets = tuple(data.bucket_lengths) or None  # several processes agree per step (train/host_batches.py)
  return dict(
      tokenizer=tokenizer, template=data.template, image_size=model_config.vision.image_size,
      aspect_ratio=data.image_aspect_ratio, num_image_tokens=model_config.num_image_tokens,
      image_token_index=model_config.image_token_index, max_length=int(data.max_length),
      bucket_lengths=buckets, packing=bool(data.packing),
      group_by_modality=bool(data.group_by_modality), worker_count=int(data.worker_count),
      strict=bool(data.strict), max_pixels=int(data.max_pixels),
      max_image_bytes=int(data.max_image_bytes),
      max_images_per_sample=int(data.max_images_per_sample))


def inspect_from_config(config, *, out_path: Optional[str], limit: int, workdir: Optional[str] = None) -> dict:
  """`--mode=inspect`: print `limit` encoded samples with the supervised spans marked, write JSON lines.

  Uses the training pipeline's options (`pipeline_kwargs`), so a sample shown as used is one training uses."""
  from llava_jax import recipes
  from llava_jax.data.inspect import inspect_samples
  model_config = recipes.llava_config(config.model)
  tokenizer = build_tokenizer(config, model_config, workdir)
  source = build_source(config.data, model_config)
  kw = pipeline_kwargs(config, model_config, tokenizer)
  return inspect_samples(source, tokenizer, conversation.get_template(kw["template"]),
                         num_image_tokens=kw["num_image_tokens"], image_token_index=kw["image_token_index"],
                         max_length=kw["max_length"], max_images_per_sample=kw["max_images_per_sample"],
                         max_pixels=kw["max_pixels"], max_image_bytes=kw["max_image_bytes"],
                         out_path=out_path, limit=limit, color=os.isatty(1))
