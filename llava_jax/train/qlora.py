"""QLoRA: LoRA adapters trained on a frozen, quantized decoder (`runtime.quantize` + `runtime.lora`).

What is quantized and frozen: with `runtime.quantize` ('int8' | 'int4' | 'nf4') the decoder's q/k/v/o/gate/up/
down Dense layers hold `kernel_q` (int8, or two 4-bit codes per uint8) and `kernel_scale` instead of `kernel`,
dequantized inside the matmul (models/quant.py). These leaves are frozen whatever `train.trainable` says
(train/state.py `is_quantized_leaf`): the step differentiates the trainable subtree only (adapters + projector
under `recipes.LORA_TRAINABLE`), so integer leaves never meet `jax.grad` and the optimizer state holds only the
adapters and the projector. Embeddings, norms, the lm_head, CLIP and the projector stay in `param_dtype`.

Starting weights are float (a llava-hf / LLaMA directory, a previous stage's params); each float kernel is
quantized on the host before it is placed, so the float decoder never exists on device:
- `init.pretrained` / `init.language_model`: `checkpoints.hf.load_pretrained` quantizes while it streams;
- `init.from_workdir` (a float run's `params/`): `checkpoints.load.restore_orbax_params` reads it into host
  memory and quantizes it as it is placed;
- a float base given to `create_train_state` (numpy or jax arrays): `quantize_float_base`, which places it with
  `checkpoints.hf.place_host_params` (quantizing kernel by kernel); adapters given with it are kept.
A QLoRA run's own checkpoints and its final `params/` hold the quantized tree (integer leaves included) and
restore as they are.
"""
from __future__ import annotations

from flax import traverse_util
from jax.sharding import Mesh

from llava_jax.checkpoints.hf import place_host_params
from llava_jax.config import LlavaConfig
from llava_jax.models import lora, quant


def quantize_float_base(config: LlavaConfig, params, mesh: Mesh):
  """Params for `config` given with float decoder kernels (a float base) → the quantized tree placed on the
  model's shardings on `mesh` (`hf.place_host_params`: each kernel quantized on the host, then placed). LoRA
  adapters in `params` are passed through as they are (the train state places them and adds missing ones).
  Params without float decoder kernels, and configs without `runtime.quantize`, are returned unchanged."""
  if config.runtime.quantize is None or not quant.float_kernels(params):
    return params
  flat = traverse_util.flatten_dict(params)
  adapters = {p: flat.pop(p) for p in list(flat) if p[-1] in (lora.LORA_A, lora.LORA_B)}
  base = place_host_params(traverse_util.unflatten_dict(flat), config.with_runtime(lora=None), mesh)
  del flat
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **adapters})
