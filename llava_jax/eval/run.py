"""`--mode=eval`: score a finished run (or a checkpoint) on the config's `eval` section, by `config.eval.kind`.

Called from main; the end-of-training evaluation (train/loop.py) calls `evaluate_synthetic` directly.
"""
from __future__ import annotations

from typing import Optional

from etils import epath

from llava_jax import parallel, paths, recipes
from llava_jax.checkpoints.load import load_params
from llava_jax.checkpoints.orbax_params import PARAMS_DIR
from llava_jax.data import from_config as data_config
from llava_jax.errors import MissingFileError
from llava_jax.eval.llava_bench import evaluate_llava_bench
from llava_jax.eval.scienceqa import evaluate_scienceqa
from llava_jax.eval.synthetic import evaluate_synthetic
from llava_jax.infer.loading import load_for_inference

EVAL_KINDS = ("synthetic", "scienceqa", "llava_bench")


def evaluate_checkpoint(config, workdir: str, checkpoint: Optional[str] = None) -> dict:
  """`--mode=eval`: score a finished run's params (its last stage's `params/`, or --checkpoint = a params dir
  or a pretrained checkpoint directory) on `config.eval`, by `config.eval.kind`:
  'synthetic' (default; the demo's held-out questions, eval/synthetic.py), 'scienceqa' (eval/scienceqa.py) or
  'llava_bench' (eval/llava_bench.py)."""
  if config.get("eval") is None:
    raise ValueError("this config has no `eval` section; --mode=eval needs one (see configs/demo.py)")
  kind = config.eval.kind
  if kind not in EVAL_KINDS:
    raise ValueError(f"config.eval.kind={kind!r}; choose one of {EVAL_KINDS}")
  name, last = recipes.last_stage(config)
  if kind != "synthetic":
    model = load_for_inference(config, workdir=workdir, checkpoint=checkpoint)
    run = evaluate_scienceqa if kind == "scienceqa" else evaluate_llava_bench
    return run(last, model.config, model.params, model.tokenizer, workdir=workdir, mesh=model.mesh)
  mesh = parallel.make_mesh(tuple(config.mesh))
  model_config = recipes.llava_config(last.model)
  path = checkpoint or paths.join(workdir if name is None else paths.join(workdir, name), PARAMS_DIR)
  if not epath.Path(path).is_dir():
    raise MissingFileError(f"no params at {path}: train first, or pass --checkpoint")
  model_config, params = load_params(path, model_config, mesh)  # quantized on the host under --quantize
  tokenizer = data_config.build_tokenizer(last, model_config, workdir)
  return evaluate_synthetic(config, model_config, params, tokenizer, mesh=mesh)
