"""The training loop, top to bottom: config → data → state (fresh, imported or resumed) → steps → checkpoints.

Workdir layout (one stage):
  checkpoints/<step>/{state,data,config}   orbax: TrainState, input-iterator state, the run's config
  params/                                  final full parameter tree (orbax), the next stage's starting point
  metrics.jsonl, tb/, loss.png             JSON-lines metrics, TensorBoard events, loss curve
  tokenizer/                               a trained tokenizer (data.tokenizer='synthetic' only)
A config with `stages = ('stage1', 'stage2')` runs each stage in <workdir>/<stage>, stage i+1 starting from
stage i's params; each `config.<stage>` holds overrides of the sections (data, train, init, ...).
A run restarts from its latest checkpoint automatically; SIGTERM saves a checkpoint and exits (`llava_jax.main`
with exit code 75, checkpointing.PREEMPTED_EXIT_CODE). The workdir may be local or any etils.epath URL
(gs://bucket/run): every file above is written through epath / orbax, never under a local `gs:` folder.
With several processes, every process runs this loop on its own rows; the end-of-run eval runs on all of them
(the model is sharded over every process's devices) and process 0 writes eval_report.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Optional

import jax
import numpy as np
from etils import epath

from llava_jax import parallel, paths, recipes
from llava_jax.checkpoints.load import load_params
from llava_jax.checkpoints.orbax_params import PARAMS_DIR, save_params
from llava_jax.config import LlavaConfig
from llava_jax.data import from_config as data_config
from llava_jax.data.pipeline import make_pipeline
from llava_jax.errors import MissingFileError
from llava_jax.eval.synthetic import evaluate_synthetic
from llava_jax.models import flops as flops_lib
from llava_jax.train import checkpointing, host_batches, metrics as metrics_lib
from llava_jax.train.optim import optimizer_from_config
from llava_jax.train.progress import StepProgress
from llava_jax.train.state import TrainState, abstract_train_state, create_train_state, state_shardings
from llava_jax.train.step import make_train_step

logger = logging.getLogger(__name__)

MODEL_CONFIG_KEY = "llava_config"  # the LlavaConfig actually trained, saved beside the run config
EVAL_REPORT = "eval_report.json"


@dataclasses.dataclass
class StageResult:
  model_config: LlavaConfig
  state: TrainState
  workdir: str
  tokenizer: object
  final_loss: Optional[float]
  steps: int
  preempted: bool = False  # stopped by SIGTERM / orbax preemption after saving a checkpoint at `steps`


def train_and_evaluate(config, workdir: str) -> StageResult:
  """Run every stage of `config` in `workdir`, then evaluate if `config.eval` is set (the README's main job)."""
  result = None
  stages = recipes.stage_configs(config)
  for i, (name, stage_config) in enumerate(stages):
    stage_dir = workdir if name is None else paths.join(workdir, name)
    if i > 0:
      stage_config.init.from_workdir = result.workdir
    _say(f"=== {name or 'train'}: {stage_dir}")
    result = train(stage_config, stage_dir, tokenizer_workdir=workdir)
    if result.preempted:  # exit promptly; a rerun resumes this stage (later stages need its params)
      _say(f"preempted at step {result.steps} of {name or 'train'}: checkpoint saved, rerun to resume")
      return result
  if config.get("eval") is not None and config.eval.kind == "synthetic" and int(config.eval.synthetic_samples):
    report = evaluate_synthetic(config, result.model_config, result.state.full_params(), result.tokenizer,
                                mesh=parallel.make_mesh(tuple(config.mesh)), print_fn=_say)
    if jax.process_index() == 0:  # every process computed the same report
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      (epath.Path(workdir) / EVAL_REPORT).write_text(json.dumps(report, indent=2))
  return result


def initial_params(config, model_config: LlavaConfig, mesh):
  """Starting weights (`checkpoints.load.load_params`): a previous stage's params, an imported checkpoint, or
  None (random init).

  Returns (model_config, params or None); an imported checkpoint's architecture wins over the config's, and the
  config's LoRA runtime is kept (a base checkpoint's adapters start fresh in the train state).
  """
  init = config.init
  if init.from_workdir:
    path = paths.join(init.from_workdir, PARAMS_DIR)
    if not epath.Path(path).is_dir():
      raise MissingFileError(f"init.from_workdir={init.from_workdir!r} has no finished run ({path} missing)")
    return load_params(path, model_config, mesh)
  if init.pretrained or init.language_model:
    loaded_config, params = load_params(
        init.pretrained or init.language_model, model_config, mesh, vision_tower=init.vision_tower or None,
        projector=init.projector or None, projector_type=None if init.pretrained else model_config.projector_type,
        allow_pickle=bool(init.allow_pickle), seed=int(init.seed),
        config_overrides=dict(vision_feature_layer=model_config.vision_feature_layer,
                              vision_feature_select_strategy=model_config.vision_feature_select_strategy)
        if not init.pretrained else None)
    return loaded_config.with_runtime(lora=model_config.runtime.lora), params
  return model_config, None


def train(config, workdir: str, *, tokenizer_workdir: Optional[str] = None) -> StageResult:
  """One training stage in `workdir` (resumes from its latest checkpoint when there is one)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  model_config = recipes.llava_config(config.model)
  mesh = parallel.make_mesh(tuple(config.mesh))
  tcfg = config.train
  ckpt = checkpointing.Checkpointer(workdir, keep=int(tcfg.keep_checkpoints))
  start = ckpt.latest_step()
  params = None
  if start is not None:  # the architecture the run was started with (an imported checkpoint may differ)
    saved = ckpt.restore_config(start).get(MODEL_CONFIG_KEY)
    if saved:
      model_config = LlavaConfig.from_dict(saved)
  else:  # weights first: an imported checkpoint's architecture decides image size and placeholders
    model_config, params = initial_params(config, model_config, mesh)
  tokenizer = _build_tokenizer(config, model_config, tokenizer_workdir or workdir)
  source = data_config.build_source(config.data, model_config)
  steps = recipes.total_steps(tcfg, len(source))
  optimizer = optimizer_from_config(tcfg, steps)
  pipeline = make_pipeline(source, seed=int(tcfg.seed), global_batch_size=int(tcfg.global_batch_size),
                           **data_config.pipeline_kwargs(config, model_config, tokenizer))
  if start is not None:
    abstract = abstract_train_state(model_config, optimizer, mesh, trainable_patterns=tcfg.trainable,
                                    freeze=_freeze(tcfg))
    state, data_state, _ = ckpt.restore(start, abstract)
    if data_state is not None:
      pipeline.set_state(data_state)
    _say(f"resumed from {ckpt.directory} at step {start}")
  else:
    state = create_train_state(model_config, optimizer, mesh, int(config.init.seed),
                               trainable_patterns=tcfg.trainable, freeze=_freeze(tcfg), params=params)
    del params
    start = 0
  step_fn = make_train_step(model_config, optimizer, mesh, micro_batches=int(tcfg.micro_batches),
                            chunked_loss=tcfg.chunked_loss, state_shardings=state_shardings(state))
  writer = metrics_lib.MetricsWriter(workdir)
  preempted = checkpointing.PreemptionFlag().install()
  try:  # a failing step still releases the workers, the async checkpointer and the event files
    state, final_loss, last_step = _run_steps(config, model_config, state, step_fn, pipeline, ckpt, writer,
                                              preempted, start, steps)
    was_preempted = last_step < steps and (preempted.is_set() or ckpt.reached_preemption(last_step))
    if last_step >= steps:
      save_params(paths.join(workdir, PARAMS_DIR), state.full_params())
  finally:
    preempted.uninstall()
    ckpt.close()
    writer.close()
    pipeline.close()
  plot = metrics_lib.plot_loss_curve(workdir)
  if plot:
    _say(f"loss curve: {plot}")
  return StageResult(model_config, state, workdir, tokenizer, final_loss, last_step, preempted=was_preempted)


def model_flops_per_token(config, model_config: LlavaConfig, trainable) -> float:
  """Model FLOPs per token of this run's step (the MFU numerator; models/flops.py, the plan's FLOP model): rows
  of data.max_length with data.max_images_per_sample images, the trainable parts as `trainable` (a param tree)
  says, the lm_head and loss at every position (the step computes fewer: an upper bound, as the plan's)."""
  decoder_trainable, projector_trainable = flops_lib.trainable_parts(trainable)
  gb, seq = int(config.train.global_batch_size), int(config.data.max_length)
  images = gb * int(config.data.max_images_per_sample)
  f = flops_lib.step_flops(model_config, global_batch=gb, seq_len=seq, images=images,
                           decoder_trainable=decoder_trainable, projector_trainable=projector_trainable)
  return f.model / f.tokens


def _run_steps(config, model_config, state, step_fn, pipeline, ckpt, writer, preempted, start, steps):
  tcfg = config.train
  log_every, ckpt_every = max(1, int(tcfg.log_every)), max(1, int(tcfg.checkpoint_every))
  flops_per_token = model_flops_per_token(config, model_config, state.params)
  peak = metrics_lib.device_peak_flops()
  progress = StepProgress(start, steps, _say)
  config_dict = {**config.to_dict(), MODEL_CONFIG_KEY: model_config.to_dict()}
  window_tokens, window_start = 0, time.perf_counter()
  final_loss, step = None, start
  for step in range(start + 1, steps + 1):
    try:
      batch = next(pipeline)
    except StopIteration:
      logger.warning("data ran out at step %d of %d", step, steps)
      step -= 1
      break
    batch = host_batches.agree_on_length(batch, pipeline.spec)
    window_tokens += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
    if step == start + 1:
      progress.before_first()
    state, m = step_fn(state, batch)
    progress.dispatched(step, m)
    ckpt.check()  # a background save that failed stops the run now, not one save later
    if step % log_every == 0 or step == steps:
      m = jax.device_get(m)
      elapsed = time.perf_counter() - window_start
      row = {k: float(v) for k, v in m.items()}
      progress.finished(step)  # its metrics are on the host
      row["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
      if peak:
        row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
      row.update({k: float(v) for k, v in pipeline.metrics().items()})
      row["data/row_length"] = int(batch["input_ids"].shape[1])  # tokens per row, padding included
      writer.write(step, row)
      final_loss = row["loss"]
      progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                           tok_s=f"{row['tokens_per_s']:.0f}")
      window_tokens, window_start = 0, time.perf_counter()
    if step % ckpt_every == 0 or step == steps or preempted.is_set() or ckpt.reached_preemption(step):
      ckpt.save(step, state, data_state=pipeline.get_state(), config=config_dict, force=True)
      writer.flush()
      if preempted.is_set() or ckpt.reached_preemption(step):
        logger.warning("preempted: saved step %d, exiting", step)
        ckpt.wait()
        break
  progress.close()
  return state, final_loss, step


def _build_tokenizer(config, model_config, workdir):
  """data_config.build_tokenizer; a tokenizer trained into the (shared) workdir is trained by process 0 alone,
  and the other processes load it after a barrier (instead of all writing the same files at once)."""
  if jax.process_count() == 1 or config.data.tokenizer != data_config.SYNTHETIC_TOKENIZER:
    return data_config.build_tokenizer(config, model_config, workdir)
  from jax.experimental import multihost_utils
  tokenizer = data_config.build_tokenizer(config, model_config, workdir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("llava_jax: synthetic tokenizer saved")
  return tokenizer if tokenizer is not None else data_config.build_tokenizer(config, model_config, workdir)


def _freeze(tcfg):
  """train.freeze: regex of params never trained, whatever `trainable` says ('' = none; default the vision tower)."""
  return tcfg.freeze or None


def _say(text: str) -> None:
  """User-facing progress lines (process 0 only)."""
  if jax.process_index() == 0:
    print(text, flush=True)
