"""LLaVA-1.5 QLoRA fine-tuning: configs/v15_lora.py (the reference's finetune_lora.sh: r 128, alpha 256, dropout
0.05, LR 2e-4, projector 2e-5, global batch 128, 1 epoch, bf16 compute) with the reference train.py's `--bits 4`:
the decoder's q/k/v/o/gate/up/down kernels stored NF4 (4-bit NormalFloat codes with per-group scales), frozen,
dequantized per layer inside each matmul in bf16; the adapters, the projector, the embeddings, norms, lm_head
and CLIP stay in param_dtype. Float starting weights (init.language_model / init.pretrained / init.from_workdir)
are quantized on the host as they load, so the float decoder is never on device (train/qlora.py).

`--config=configs/v15_qlora.py[:7b|13b]` with the same init flags as v15_lora.py;
`--config.model.runtime.quantize=int8` (or int4) for the other weight formats. The reference's bitsandbytes
double quantization (8-bit scales of the scales) is not reproduced: our group scales stay in float.
Export: `export_hf` writes the merged model with the base dequantized (W = dequant(W_q) + (alpha / r)·A·B),
`llava_jax.checkpoints.peft.export_peft_adapter` the adapter alone.
"""
import importlib.util
import os

from llava_jax import recipes as r


def get_config(size: str = "7b"):
  spec = importlib.util.spec_from_file_location(
      "configs_v15_lora", os.path.join(os.path.dirname(os.path.abspath(__file__)), "v15_lora.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(size)
  return r.with_quantize(c, r.QLORA_QUANTIZE)
