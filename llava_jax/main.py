"""Command-line entry: `python -m llava_jax.main --config=configs/<recipe>.py[:arg] [--config.a.b=v] --mode=...`.

Modes:
  train    train (and resume) in --workdir; the README's main command runs configs/demo.py this way. Exits 0 when
           the run finished, 75 (EX_TEMPFAIL, train/checkpointing.PREEMPTED_EXIT_CODE) when SIGTERM / a
           preemption stopped it after saving a checkpoint: rerun the same command to resume
  eval     evaluate a workdir's latest checkpoint (or --checkpoint) on the config's eval data
  inspect  print samples with the supervised spans marked and write --inspect_out JSON lines
  plan     per-device memory and step time of the config on --plan.topology, without the hardware
  chat     talk about an image in the terminal (--checkpoint or --workdir, --image); reads a pipe too
  serve    OpenAI-compatible API + chat page on --host:--port (127.0.0.1:8000)

A mistake the user can fix (a wrong path, a --config.a.b naming no field, a missing data file or tokenizer) is
one line `error: ...` on stderr and exit status 2; --verbose adds the traceback (see cli_errors.py).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from llava_jax import allocator, cli_errors
from llava_jax.errors import MissingFileError, require_path
from llava_jax.limits import MAX_IMAGE_PIXELS
from llava_jax.scale.cli import plan_flag_defaults

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file (configs/*.py[:arg]).",
                                          lock_config=False)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "inspect", "chat", "serve", "plan"], "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots (default: ./workdir/<config name>).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint to evaluate / chat with / serve (workdir or exported dir).")
_INSPECT_OUT = flags.DEFINE_string("inspect_out", None, "inspect mode: JSON-lines output file.")
_INSPECT_LIMIT = flags.DEFINE_integer("inspect_limit", 8, "inspect mode: number of samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (auto on TPU pods / SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_PLAN = config_flags.DEFINE_config_dict("plan", plan_flag_defaults(), "plan mode: --plan.topology=8xA100-80G|"
                                        "8xH100|v4-32|v5p-64|v5e-256 [--plan.mfu=0.4 --plan.headroom=0.1 ...].")
# eval with a judge (LLaVA-Bench reviews, the ScienceQA judge ensemble); the API key is read from the environment
_JUDGE_BASE_URL = flags.DEFINE_string("judge_base_url", None, "eval: the judge's OpenAI-compatible endpoint, e.g. "
                                      "http://127.0.0.1:8001/v1 (default: config.eval.judge.base_url, else "
                                      "$OPENAI_BASE_URL); the key comes from $OPENAI_API_KEY.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "eval: the judge model name (config.eval.judge.model).")
# chat / serve
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4", "nf4"],
                              "eval/chat/serve: weight-only quantized decoder linears (model.runtime.quantize): "
                              "int8 per-channel, int4 groups of 64, nf4 = bitsandbytes NF4 (--load-8bit/--load-4bit).")
_IMAGE = flags.DEFINE_string("image", None, "chat: the image to talk about (/image PATH changes it).")
_TEMPLATE = flags.DEFINE_string("template", None, "chat/serve: conversation template (default: the config's data.template).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.2, "chat, serve default: sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "chat, serve default: nucleus sampling mass.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "chat, serve default: most tokens per answer.")
_SEED = flags.DEFINE_integer("seed", 0, "chat: sampling seed of the first answer (then +1 per answer).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on (other than loopback = exposed).")
_PORT = flags.DEFINE_integer("port", 8000, "serve: port.")
_ALLOW_REMOTE_IMAGES = flags.DEFINE_bool("allow_remote_images", False, "serve: fetch http(s) image URLs.")
_LOCAL_IMAGE_ROOT = flags.DEFINE_string("local_image_root", None, "serve: allow image paths under this directory.")
_MAX_REQUEST_BYTES = flags.DEFINE_integer("max_request_bytes", 20 * 1024 * 1024, "serve: largest request body.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", MAX_IMAGE_PIXELS, "serve: largest decoded image (pixels).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 4, "serve: most images per request.")
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", None, "serve: longest prompt (default: the context).")
_MAX_OUTPUT_TOKENS = flags.DEFINE_integer("max_output_tokens", 1024, "serve: largest max_tokens a request may ask.")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 8, "serve: requests generated together.")
_READ_TIMEOUT = flags.DEFINE_float("read_timeout_s", 30.0, "serve: seconds a client has to send a request's "
                                   "head, and its body; then the connection is closed.")
_PRECOMPILE = flags.DEFINE_bool("precompile", False, "serve: compile every shape the limits allow before listening "
                                "(else a request of a new shape waits for its compile, off the serving path; narrow "
                                "the max_* limits first: a 4k-context model has thousands).")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("workdir", name)


def skip_absent_tpu() -> None:
  """CPU only when nothing but libtpu could claim an accelerator and no TPU is attached.

  With libtpu installed (the dev extra: TPU compiles for --mode=plan) jax tries its TPU backend on any machine,
  and on one without TPUs libtpu logs an alarming (harmless) `INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` error
  before jax falls back to CPU. jax already skips CUDA when no GPU is visible; this does the same for TPU when
  JAX_PLATFORMS is unset and no other PJRT plugin (CUDA, ROCm, ...) is installed.
  """
  if "JAX_PLATFORMS" in os.environ or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return
  import importlib.metadata
  import importlib.util
  if (importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("jax_plugins") is not None
      or importlib.metadata.entry_points(group="jax_plugins")):
    return
  from jax._src import hardware_utils, xla_bridge
  if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return
  import jax
  os.environ["JAX_PLATFORMS"] = "cpu"  # child processes (data workers) too
  jax.config.update("jax_platforms", "cpu")


def maybe_initialize_distributed() -> None:
  """jax.distributed for multi-host runs: explicit flags, or auto-detection on TPU pods and SLURM."""
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def log_allocator() -> None:
  """Which malloc this process runs with: a warning when XLA:CPU runs under the system malloc because tcmalloc
  was not found (allocator.py), else an INFO line."""
  import jax
  slow = jax.default_backend() == "cpu" and not allocator.is_loaded() and os.environ.get(allocator.ENV) != "0"
  (logging.warning if slow else logging.info)(allocator.describe())


def apply_judge_flags(config) -> None:
  """--judge_base_url / --judge_model → config.eval.judge (an eval kind that uses a judge)."""
  if _JUDGE_BASE_URL.value is None and _JUDGE_MODEL.value is None:
    return
  if config.get("eval") is None or config.eval.get("judge") is None:
    raise app.UsageError("--judge_base_url / --judge_model need a config whose eval section has a judge "
                         "(eval.kind 'scienceqa' or 'llava_bench')")
  if _JUDGE_BASE_URL.value is not None:
    config.eval.judge.base_url = _JUDGE_BASE_URL.value
  if _JUDGE_MODEL.value is not None:
    config.eval.judge.model = _JUDGE_MODEL.value


def apply_quantize_flag(config, mode: str) -> None:
  """--quantize → model.runtime.quantize (the one place the flag sets it); only for modes that load weights to
  run them (training a quantized base is QLoRA: set model.runtime.quantize in the config)."""
  if _QUANTIZE.value is None:
    return
  if mode not in ("eval", "chat", "serve"):
    raise app.UsageError(f"--quantize is for --mode=eval|chat|serve, not {mode} (QLoRA training: set "
                         "model.runtime.quantize in the config)")
  from llava_jax.recipes import with_quantize
  with_quantize(config, _QUANTIZE.value)


def _path(flag) -> Optional[str]:
  """A path flag's value with `~` expanded."""
  return None if flag.value is None else os.path.expanduser(flag.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli_errors.loaded_config("config")
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO; --verbosity=0 shows it
  skip_absent_tpu()
  maybe_initialize_distributed()
  log_allocator()
  workdir = _path(_WORKDIR) or default_workdir(flags.FLAGS["config"].config_filename)
  mode = _MODE.value
  apply_quantize_flag(config, mode)
  if mode == "train":
    from llava_jax.train.checkpointing import PREEMPTED_EXIT_CODE
    from llava_jax.train.loop import train_and_evaluate
    if train_and_evaluate(config, workdir).preempted:
      sys.exit(PREEMPTED_EXIT_CODE)  # saved, not finished: a requeue-on-failure scheduler restarts the run
  elif mode == "eval":
    apply_judge_flags(config)
    from llava_jax.eval.run import evaluate_checkpoint
    evaluate_checkpoint(config, workdir, checkpoint=_path(_CHECKPOINT))
  elif mode == "inspect":
    from llava_jax.data.from_config import inspect_from_config
    inspect_from_config(config, out_path=_INSPECT_OUT.value, limit=_INSPECT_LIMIT.value, workdir=workdir)
  elif mode in ("chat", "serve"):
    image = _path(_IMAGE)
    if mode == "chat" and image and not os.path.isfile(image):  # before the weights load
      raise MissingFileError(f"--image={_IMAGE.value}: no such file")
    if mode == "serve":
      require_path(_path(_LOCAL_IMAGE_ROOT), "--local_image_root")
    from llava_jax.infer.loading import load_for_inference
    model = load_for_inference(config, workdir=_path(_WORKDIR), checkpoint=_path(_CHECKPOINT),
                               template=_TEMPLATE.value)
    if mode == "chat":
      from llava_jax.infer.chat import run_chat
      sys.exit(run_chat(model, image=image, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                        max_new_tokens=_MAX_NEW_TOKENS.value, seed=_SEED.value))
    from llava_jax.infer.openai_api import Limits
    from llava_jax.infer.server import ServerOptions, serve
    serve(model, ServerOptions(
        host=_HOST.value, port=_PORT.value, max_batch_size=_MAX_BATCH_SIZE.value,
        read_timeout_s=_READ_TIMEOUT.value, precompile=_PRECOMPILE.value, limits=Limits(
            max_request_bytes=_MAX_REQUEST_BYTES.value, max_image_pixels=_MAX_IMAGE_PIXELS.value,
            max_images=_MAX_IMAGES.value,
            max_prompt_tokens=_MAX_PROMPT_TOKENS.value, max_output_tokens=_MAX_OUTPUT_TOKENS.value,
            default_max_tokens=min(_MAX_NEW_TOKENS.value, _MAX_OUTPUT_TOKENS.value),
            default_temperature=_TEMPERATURE.value, default_top_p=_TOP_P.value,
            allow_remote_images=_ALLOW_REMOTE_IMAGES.value, local_image_root=_path(_LOCAL_IMAGE_ROOT))))
  elif mode == "plan":
    from llava_jax.scale.cli import run_plan
    try:
      code = run_plan(config, _PLAN.value, flags.FLAGS["config"].config_filename)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    sys.exit(code)
  else:
    raise app.UsageError(f"--mode={mode} is not available yet")


if __name__ == "__main__":
  cli_errors.run(main)
