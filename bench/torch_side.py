"""The reference side: transformers' PyTorch `LlavaForConditionalGeneration` (float32, CPU), timed as users run it.

Benchmarks as in bench/jax_side.py, on the reference's own API:
- training step: forward with labels + backward + clip_grad_norm_(1.0) + fused AdamW (HF Trainer's default
  optimizer on torch ≥ 2.8) + cosine-with-warmup scheduler step; the vision tower frozen (requires_grad False),
  as LLaVA trains;
- prefill: `generate(max_new_tokens=1)` (time to first token), and the bare forward with `logits_to_keep=1`;
- decode: greedy `generate` with its KV cache (DynamicCache) and no EOS stop, N and 1 new tokens;
- vision tower: `vision_tower(pixels, output_hidden_states=True).hidden_states[-2]`;
- matmul peak: `torch.mm` on the same float32 shapes.
"""
from __future__ import annotations

import time

import numpy as np

from bench import common


def set_threads(threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(max(1, threads))
  return dict(torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
              torch=torch.__version__, parallel_info=torch.__config__.parallel_info().splitlines()[:8])


def build_model(p: common.Preset, *, big: bool = False, seed: int = 0):
  """A random LlavaForConditionalGeneration for the preset (float32, eval mode)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  c = common.hf_config_dict(p, big=big)
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**c["vision"]), text_config=transformers.LlamaConfig(**c["text"]),
      image_token_index=c["image_token_index"], vision_feature_layer=c["vision_feature_layer"],
      vision_feature_select_strategy=c["vision_feature_select_strategy"],
      projector_hidden_act=c["projector_hidden_act"])
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():  # non-trivial norms and biases, like a trained checkpoint
    for name, prm in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        prm.add_(0.1 * torch.randn_like(prm))
  return model


def save_model(p: common.Preset, out_dir: str) -> dict:
  model = build_model(p)
  model.save_pretrained(out_dir)
  n = sum(x.numel() for x in model.parameters())
  return dict(model_dir=out_dir, params=int(n), attn_implementation=model.config._attn_implementation)


def _tensors(batch: dict):
  import torch
  out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
  if "pixel_values" in out:
    out["pixel_values"] = out["pixel_values"].permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW
  if "input_ids" in out:
    out["input_ids"] = out["input_ids"].long()
  if "attention_mask" in out:
    out["attention_mask"] = out["attention_mask"].long()
  return out


def matmul_bench(m: int, k: int, n: int):
  import torch
  a, b = torch.randn(m, k), torch.randn(k, n)
  return common.Bench(lambda: {"s": common.clock(lambda: torch.mm(a, b))[0]}, lambda: {"flop": 2 * m * k * n})


def train_bench(model, p: common.Preset):
  import torch
  from transformers import get_cosine_schedule_with_warmup
  model.train()
  for prm in model.model.vision_tower.parameters():
    prm.requires_grad_(False)
  params = [x for x in model.parameters() if x.requires_grad]
  opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
  sched = get_cosine_schedule_with_warmup(opt, 30, 1000)
  b = common.train_batch(p)
  t = _tensors(dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]))
  labels = torch.from_numpy(np.where(b["loss_mask"], b["input_ids"], -100)).long()
  losses = []

  def step():
    out = model(**t, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss.detach()))

  return common.Bench(lambda: {"s": common.clock(step)[0]},
                      lambda: {"tokens_per_step": int(b["input_ids"].size), "first_loss": losses[0]})


def _generate(model, inputs, n):
  import torch
  with torch.inference_mode():
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True)


def prefill_bench(model, p: common.Preset):
  inputs = _tensors(common.prompt(p, 1))
  return common.Bench(lambda: {"s": common.clock(lambda: _generate(model, inputs, 1))[0]},
                      lambda: {"prompt_tokens": int(inputs["input_ids"].shape[1])})


def prefill_forward_bench(model, p: common.Preset):
  """The bare forward that fills the cache (no generate bookkeeping): a lower bound of HF's prefill."""
  import torch
  inputs = _tensors(common.prompt(p, 1))

  def forward():
    with torch.inference_mode():
      return model(**inputs, use_cache=True, logits_to_keep=1)

  return common.Bench(lambda: {"s": common.clock(forward)[0]})


def decode_bench(model, p: common.Preset, batch: int):
  inputs = _tensors(common.prompt(p, batch))
  prompt_len = inputs["input_ids"].shape[1]
  last = {}

  def run():
    first, _ = common.clock(lambda: _generate(model, inputs, 1))
    full, out = common.clock(lambda: _generate(model, inputs, p.decode_new))
    last["tokens"] = out[:, prompt_len:].numpy()
    return {"first_s": first, "full_s": full}

  def info():
    tokens = last["tokens"]
    if tokens.shape[1] != p.decode_new:
      raise RuntimeError(f"HF generate produced {tokens.shape[1]} tokens, expected {p.decode_new}")
    return {"batch": batch, "new_tokens": p.decode_new, "tokens": tokens.tolist()}

  return common.Bench(run, info)


def vision_bench(model, p: common.Preset):
  import torch
  px = _tensors(dict(pixel_values=common.images(p, p.vision_batch)))["pixel_values"]

  def run():
    with torch.inference_mode():
      return model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2]

  return common.Bench(lambda: {"s": common.clock(run)[0]}, lambda: {"images": p.vision_batch})


def make_benches(p: common.Preset, args: dict):
  import torch
  import transformers
  facts = set_threads(int(args["threads"]))
  t0 = time.perf_counter()
  model = transformers.LlavaForConditionalGeneration.from_pretrained(args["model_dir"], dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # never stop early: every run decodes exactly N tokens
  model.generation_config.pad_token_id = 0
  facts.update(transformers=transformers.__version__, load_s=time.perf_counter() - t0,
               attn_implementation=model.config._attn_implementation)
  benches = {"matmul_" + "x".join(map(str, s)): matmul_bench(*s) for s in p.matmul_shapes}
  benches["vision"] = vision_bench(model, p)
  benches["prefill"] = prefill_bench(model, p)
  benches["prefill_forward"] = prefill_forward_bench(model, p)
  for b in p.decode_batches:
    benches[f"decode_b{b}"] = decode_bench(model, p, b)
  benches["train"] = common.Lazy(lambda: train_bench(model, p))  # last: it switches the model to training
  return facts, benches
