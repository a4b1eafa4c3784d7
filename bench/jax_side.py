"""Our side: llava_jax on the same checkpoint (loaded with `load_pretrained` from the transformers-saved dir).

Benchmarks (each `run()` times one repetition and blocks until the result is ready):
- matmul_MxKxN: jitted `a @ b` in float32, square and the training step's own GEMM shapes (the machine's peak,
  with torch's);
- vision: the jitted CLIP tower returning hidden_states[-2] for `vision_batch` images;
- prefill: `generate(max_new_tokens=1)` on one image + prompt (time to first token);
- decode_bB: greedy `generate` with the bucketed KV cache and no stop ids, N and 1 new tokens back to back;
- train: `make_train_step` (token-weighted CE, AdamW with warmup-cosine and clipping, vision tower frozen,
  projector + LLM trained) on a one-device mesh; records the positions its lm_head ran on (metric
  `logit_positions`), which `common.train_step_flops` (llava_jax.models.flops) counts.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from bench import common

TRAINABLE = r"multi_modal_projector/.*|language_model/.*"


def _block(x):
  import jax
  return jax.block_until_ready(x)


def matmul_bench(m: int, k: int, n: int):
  import jax
  import jax.numpy as jnp
  mm = jax.jit(lambda a, b: a @ b)
  ka, kb = jax.random.split(jax.random.key(m * k + n))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  b = jax.random.normal(kb, (k, n), jnp.float32)
  return common.Bench(lambda: {"s": common.clock(lambda: _block(mm(a, b)))[0]}, lambda: {"flop": 2 * m * k * n})


def vision_bench(config, params, p: common.Preset):
  import jax
  from llava_jax.models.clip import CLIPVisionTransformer
  tower = CLIPVisionTransformer(config.vision, config.runtime)
  fn = jax.jit(lambda prm, x: tower.apply({"params": prm}, x, layers=config.vision_feature_layers))
  px = jax.device_put(common.images(p, p.vision_batch))
  vp = params["vision_tower"]
  return common.Bench(lambda: {"s": common.clock(lambda: _block(fn(vp, px)))[0]}, lambda: {"images": p.vision_batch})


def _generate(config, params, inputs, n):
  from llava_jax.infer.generate import generate
  return generate(config, params, input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                  max_new_tokens=n, stop_token_ids=())


def prefill_bench(config, params, p: common.Preset):
  inputs = common.prompt(p, 1)
  return common.Bench(lambda: {"s": common.clock(lambda: _generate(config, params, inputs, 1))[0]},
                      lambda: {"prompt_tokens": int(inputs["input_ids"].shape[1])})


def decode_bench(config, params, p: common.Preset, batch: int):
  inputs = common.prompt(p, batch)
  last = {}

  def run():
    first, _ = common.clock(lambda: _generate(config, params, inputs, 1))
    full, res = common.clock(lambda: _generate(config, params, inputs, p.decode_new))
    last["tokens"] = res.token_ids
    return {"first_s": first, "full_s": full}

  def info():
    tokens = last["tokens"]
    if any(len(t) != p.decode_new for t in tokens):
      raise RuntimeError(f"generate produced {[len(t) for t in tokens]} tokens, expected {p.decode_new}")
    return {"batch": batch, "new_tokens": p.decode_new, "tokens": tokens}

  return common.Bench(run, info)


def train_bench(config, params, p: common.Preset):
  import jax
  from llava_jax import parallel
  from llava_jax.train.optim import make_optimizer
  from llava_jax.train.state import create_train_state
  from llava_jax.train.step import make_train_step
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  opt = make_optimizer(learning_rate=2e-5, total_steps=1000, warmup_ratio=0.03, max_grad_norm=1.0)
  params = jax.tree.map(np.array, params)  # own copy: the step donates its state
  state = create_train_state(config, opt, mesh, 0, trainable_patterns=TRAINABLE, params=params)
  step = make_train_step(config, opt, mesh)
  b = common.train_batch(p)
  batch = dict(input_ids=b["input_ids"], loss_mask=b["loss_mask"], attention_mask=b["attention_mask"],
               pixel_values=b["pixel_values"])
  try:  # XLA's own count (it counts a scanned layer body once, not L times: see bench/README.md)
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"])
  except Exception as e:  # best effort
    xla_flops = f"unavailable: {type(e).__name__}: {e}"
  holder = {"state": state, "losses": [], "positions": set()}

  def one():
    holder["state"], metrics = step(holder["state"], batch)
    holder["losses"].append(float(metrics["loss"]))  # blocks until the step is done
    holder["positions"].add(int(metrics["logit_positions"]))

  def info():
    if len(holder["positions"]) != 1:  # the MFU numerator counts one lm_head size for every timed step
      raise RuntimeError(f"the step computed logits at {sorted(holder['positions'])} positions across "
                         "repetitions of the same batch; expected one count")
    (positions,) = holder["positions"]
    return {"tokens_per_step": int(b["input_ids"].size), "first_loss": holder["losses"][0],
            "xla_cost_flops": xla_flops, "logit_positions": positions}

  return common.Bench(lambda: {"s": common.clock(one)[0]}, info)


def make_benches(p: common.Preset, args: dict):
  import jax
  import flax
  from llava_jax.checkpoints.hf import load_pretrained
  from llava_jax.config import RuntimeOptions
  t0 = time.perf_counter()
  config, params = load_pretrained(args["model_dir"], runtime=RuntimeOptions(**(args.get("runtime") or {})))
  facts = dict(jax=jax.__version__, flax=flax.__version__, devices=[str(d) for d in jax.devices()],
               runtime=dataclasses.asdict(config.runtime), load_s=time.perf_counter() - t0)
  benches = {"matmul_" + "x".join(map(str, s)): matmul_bench(*s) for s in p.matmul_shapes}
  benches["vision"] = vision_bench(config, params, p)
  benches["prefill"] = prefill_bench(config, params, p)
  for b in p.decode_batches:
    benches[f"decode_b{b}"] = decode_bench(config, params, p, b)
  benches["train"] = common.Lazy(lambda: train_bench(config, params, p))
  return facts, benches
