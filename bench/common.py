"""What both sides of the benchmark share: presets, deterministic inputs, timing, FLOP counts, process facts.

Nothing here imports jax or torch at module level: the orchestrator (bench/run.py) imports this file before
it has set the thread environment of the child processes that do import them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np


# ---------------------------------------------------------------------------------------------------------
# Presets


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """A LLaVA's dimensions (CLIP tower + LLaMA decoder), shared by the presets and bench/big_ckpt.py."""
  name: str
  # vision tower (CLIP)
  v_hidden: int
  v_mlp: int
  v_layers: int
  v_heads: int
  image_size: int
  patch: int
  # decoder (LLaMA)
  t_hidden: int
  t_mlp: int
  t_layers: int
  t_heads: int
  t_kv_heads: int
  vocab: int          # embedding rows (llava-hf pads 32000 to 32064; <image> = 32000)
  image_token: int

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2


@dataclasses.dataclass(frozen=True)
class Preset(ModelShapes):
  """Model dimensions and benchmark sizes. `full` is the small-but-real config of the report; `quick` is a
  seconds-long smoke run of the same code (tests/test_bench.py)."""
  # benchmark sizes
  train_batch: int
  train_text: int     # text tokens per training row (plus one image's placeholders)
  prompt_text: int    # text tokens of the prefill / decode prompt (plus one image)
  decode_new: int     # tokens generated in the decode benchmark
  decode_batches: tuple
  vision_batch: int
  data_samples: int   # samples timed in the data-pipeline benchmark
  data_batch: int
  data_workers: int
  matmul_shapes: tuple  # (m, k, n) float32 GEMMs whose best rate is the machine's peak
  warmup: int
  reps: int
  train_reps: int
  # the multi-GB checkpoint of the import-memory benchmark
  ckpt_t_hidden: int
  ckpt_t_mlp: int
  ckpt_t_layers: int
  ckpt_v_hidden: int
  ckpt_v_mlp: int
  ckpt_v_layers: int
  ckpt_shard_bytes: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


FULL = Preset(
    name="full",
    v_hidden=512, v_mlp=2048, v_layers=4, v_heads=8, image_size=224, patch=14,
    t_hidden=512, t_mlp=1408, t_layers=4, t_heads=8, t_kv_heads=8, vocab=32064, image_token=32000,
    train_batch=4, train_text=128, prompt_text=48, decode_new=64, decode_batches=(1, 8), vision_batch=8,
    data_samples=480, data_batch=8, data_workers=2,
    matmul_shapes=((1024, 1024, 1024), (2048, 2048, 2048), (3072, 3072, 3072), (1536, 512, 1408), (1536, 1408, 512),
                   (1536, 512, 32064), (2056, 512, 2048)),
    warmup=2, reps=7,
    train_reps=5,
    ckpt_t_hidden=2048, ckpt_t_mlp=5632, ckpt_t_layers=8, ckpt_v_hidden=1024, ckpt_v_mlp=4096,
    ckpt_v_layers=6, ckpt_shard_bytes=1 << 30)

QUICK = Preset(
    name="quick",
    v_hidden=32, v_mlp=64, v_layers=2, v_heads=4, image_size=28, patch=14,
    t_hidden=64, t_mlp=128, t_layers=2, t_heads=4, t_kv_heads=2, vocab=576, image_token=512,
    train_batch=2, train_text=12, prompt_text=8, decode_new=16, decode_batches=(1, 2), vision_batch=2,
    data_samples=8, data_batch=4, data_workers=0, matmul_shapes=((128, 128, 128), (64, 32, 576)),
    warmup=1, reps=2, train_reps=2,
    ckpt_t_hidden=64, ckpt_t_mlp=128, ckpt_t_layers=2, ckpt_v_hidden=32, ckpt_v_mlp=64, ckpt_v_layers=2,
    ckpt_shard_bytes=256 << 10)

PRESETS = {"full": FULL, "quick": QUICK}


def hf_config_dict(p: Preset, *, big: bool = False) -> dict:
  """Arguments of transformers.LlavaConfig for the preset (or its multi-GB checkpoint variant)."""
  tv = dict(hidden_size=p.ckpt_t_hidden if big else p.t_hidden, intermediate_size=p.ckpt_t_mlp if big else p.t_mlp,
            num_hidden_layers=p.ckpt_t_layers if big else p.t_layers,
            num_attention_heads=16 if big else p.t_heads, num_key_value_heads=16 if big else p.t_kv_heads,
            vocab_size=p.vocab, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  vv = dict(hidden_size=p.ckpt_v_hidden if big else p.v_hidden, intermediate_size=p.ckpt_v_mlp if big else p.v_mlp,
            num_hidden_layers=p.ckpt_v_layers if big else p.v_layers, num_attention_heads=16 if big else p.v_heads,
            image_size=p.image_size, patch_size=p.patch, projection_dim=p.v_hidden, hidden_act="quick_gelu")
  return dict(text=tv, vision=vv, image_token_index=p.image_token, vision_feature_layer=-2,
              vision_feature_select_strategy="default", projector_hidden_act="gelu")


# ---------------------------------------------------------------------------------------------------------
# Deterministic inputs (both sides build the same arrays from the same seed)

BOS = 1
TEXT_LOW = 3


def _text(rng, n: int, p: Preset) -> np.ndarray:
  return rng.integers(TEXT_LOW, min(p.image_token, 29000), size=n).astype(np.int32)


def images(p: Preset, n: int, seed: int = 0) -> np.ndarray:
  """[n, S, S, 3] float32, CLIP-normalized-like values (NHWC; torch gets the NCHW transpose)."""
  rng = np.random.default_rng(seed + 1000)
  return rng.standard_normal((n, p.image_size, p.image_size, 3)).astype(np.float32)


def train_batch(p: Preset, seed: int = 0) -> Dict[str, np.ndarray]:
  """B rows of [BOS, system+USER text, image placeholders, question, answer] without padding.

  loss_mask marks the answer tokens (the last third of the text), as the data pipeline would.
  """
  rng = np.random.default_rng(seed)
  k = p.num_patches
  t = p.train_text + k
  ids = np.zeros((p.train_batch, t), np.int32)
  mask = np.zeros((p.train_batch, t), bool)
  pre = max(2, p.train_text // 3)
  for r in range(p.train_batch):
    text = _text(rng, p.train_text, p)
    text[0] = BOS
    ids[r] = np.concatenate([text[:pre], np.full(k, p.image_token, np.int32), text[pre:]])
    answer = p.train_text - pre - (p.train_text - pre) // 2
    mask[r, t - answer:] = True
  return dict(input_ids=ids, loss_mask=mask, pixel_values=images(p, p.train_batch, seed),
              attention_mask=np.ones((p.train_batch, t), np.int32))


def prompt(p: Preset, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """`batch` prompts of equal length (so neither side pads): [BOS, text, image, question]."""
  rng = np.random.default_rng(seed + 7)
  k = p.num_patches
  pre = max(2, (2 * p.prompt_text) // 3)
  rows = []
  for _ in range(batch):
    text = _text(rng, p.prompt_text, p)
    text[0] = BOS
    rows.append(np.concatenate([text[:pre], np.full(k, p.image_token, np.int32), text[pre:]]))
  ids = np.stack(rows)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=images(p, batch, seed))


# ---------------------------------------------------------------------------------------------------------
# Timing


class Bench:
  """One benchmark of one side: `run()` times one repetition → {name: seconds}; `info()` → facts about the
  repetitions run so far (token counts, outputs to compare across sides)."""

  def __init__(self, run: Callable[[], Dict[str, float]], info: Callable[[], dict] = dict):
    self.run, self.info = run, info


class Lazy:
  """A Bench built on first use (e.g. a train state, created only when its benchmark starts)."""

  def __init__(self, make: Callable[[], Bench]):
    self._make, self._bench = make, None

  def _get(self) -> Bench:
    if self._bench is None:
      self._bench = self._make()
    return self._bench

  def run(self):
    return self._get().run()

  def info(self):
    return self._get().info()


def summarize(reps: List[Dict[str, float]]) -> Dict[str, dict]:
  """Repetitions [{name: seconds}] → {name: {median, min, max, values}} (the median is the reported number)."""
  out = {}
  for key in (reps[0] if reps else {}):
    vals = [r[key] for r in reps]
    out[key] = dict(median=statistics.median(vals), min=min(vals), max=max(vals), values=vals)
  return out


def clock(fn: Callable[[], Any]):
  """(seconds, result) of one call of fn (which must block until its result is ready)."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------------------
# Model FLOPs (the MFU numerator): llava_jax's one FLOP model, models/flops.py


def llava_config(p: Preset):
  """Our LlavaConfig of the preset's model (the same as `hf_config_dict`, read by the checkpoint loader's parser)."""
  from llava_jax.checkpoints.hf_configs import text_config_from_hf, vision_config_from_hf
  from llava_jax.config import LlavaConfig
  c = hf_config_dict(p)
  return LlavaConfig(vision=vision_config_from_hf(c["vision"]), text=text_config_from_hf(c["text"]),
                     image_token_index=c["image_token_index"], vision_feature_layer=c["vision_feature_layer"])


def train_step_flops(p: Preset, lm_head_positions: int) -> Dict[str, float]:
  """FLOPs of one llava_jax training step (the MFU numerator), from `llava_jax.models.flops.step_flops`: frozen
  vision forward through the L−1 blocks it runs + 3 × (projector + decoder forward + lm_head at the
  `lm_head_positions` the step computed logits for — its `logit_positions` metric, recorded by jax_side — :
  forward and the two backward matmuls per weight) + the loss's elementwise work on those logits
  (LOSS_ELEMENTWISE_PER_LOGIT per logit). AdamW, norms and softmax inside attention are not counted.

  `conventional_total`: the usual model-FLOPs count with the lm_head over every position and no loss work.
  `reference_total`: what a step computing logits and loss everywhere (PyTorch's) executes, counted the same
  way as `total`."""
  from llava_jax.models import flops
  config = llava_config(p)
  b = train_batch(p)
  bsz, t = b["input_ids"].shape
  positions = int(lm_head_positions)  # the step's budget (train.loss.loss_row_budget), measured, not recomputed
  step = lambda **kw: flops.step_flops(config, global_batch=bsz, seq_len=t, images=bsz, decoder_trainable=True,
                                       projector_trainable=True, remat_policy="none", **kw).model
  total = step(logit_positions=positions)
  vis = bsz * flops.vision_flops_per_image(config)
  loss = float(flops.LOSS_ELEMENTWISE_PER_LOGIT * positions * p.vocab)
  return dict(vision_forward=vis, decoder_forward=(total - vis - loss) / 3, lm_head_positions=positions,
              all_positions=bsz * t, lm_head_forward=positions * flops.head_flops(config), loss_elementwise=loss,
              total=total, conventional_total=step(loss_elementwise=False), reference_total=step())


# ---------------------------------------------------------------------------------------------------------
# Process facts


def proc_status(pid: str = "self") -> Dict[str, int]:
  """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes (Linux /proc)."""
  out = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      key, _, rest = line.partition(":")
      if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        out[key] = int(rest.split()[0]) * 1024
  return out


def blas_info() -> List[dict]:
  """threadpoolctl's view of the loaded BLAS / OpenMP libraries (which kernel runs), or why it is absent."""
  try:
    import threadpoolctl
  except ImportError:
    return [{"error": "threadpoolctl not installed (pip install threadpoolctl to record the BLAS kernel)"}]
  keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture", "threading_layer")
  return [{k: v for k, v in d.items() if k in keep} for d in threadpoolctl.threadpool_info()]


def thread_env(threads: int, malloc: str = "system") -> Dict[str, str]:
  """Environment for a benchmark child: N threads everywhere, no OpenBLAS core override, one CPU device, and
  `malloc` 'tcmalloc' (preloaded when installed, llava_jax/allocator.py) or 'system'."""
  from llava_jax import allocator
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(x for x in env.get("LD_PRELOAD", "").split(":") if x and "tcmalloc" not in x)
  env[allocator.ENV] = "0"
  if malloc == "tcmalloc":
    env = allocator.preload_env(env)
  for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    env.pop(k, None)
  for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[k] = str(threads)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["TOKENIZERS_PARALLELISM"] = "false"
  env["HF_HUB_OFFLINE"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def allocator_of(env: Dict[str, str]) -> str:
  """'tcmalloc (<library>)' when `env` preloads one, else 'system malloc'."""
  lib = [x for x in env.get("LD_PRELOAD", "").split(":") if "tcmalloc" in x]
  return f"tcmalloc ({lib[0]})" if lib else "system malloc"


def child_facts() -> dict:
  """Thread and library facts as seen from inside a child."""
  from llava_jax import allocator
  return dict(pid=os.getpid(), affinity=sorted(os.sched_getaffinity(0)), tcmalloc=allocator.is_loaded(),
              env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS")},
              blas=blas_info())


def machine_facts() -> dict:
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line
          break
  except OSError:
    pass
  simd = [s for s in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {s}" in flags]
  return dict(cpu=cpu, cores=os.cpu_count(), simd=simd, python=sys.version.split()[0], platform=platform.platform(),
              mem_total_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1))


def git_state(repo: str) -> dict:
  """{'commit': HEAD, 'dirty': uncommitted changes to tracked files} of the code that ran (or why unknown)."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    return {"commit": f"unknown ({type(e).__name__})", "dirty": None}
  return {"commit": commit, "dirty": bool(status.strip())}


def loadavg() -> List[float]:
  return list(os.getloadavg())


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
