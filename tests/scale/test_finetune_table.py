"""scale.finetune_table: the probe each row compiles (savers on, rows per micro-batch) and the table's verdicts,
from rows as the command writes them (no compile here: the 7B rows take minutes each)."""

from llava_jax import config_files
from llava_jax.scale import finetune_table as ft

GIB = 1024 ** 3


def test_probe_config_turns_every_saver_on_at_the_asked_rows():
  lora = next(m for m in ft.METHODS if m.key == "lora")
  config, note = ft.probe_config(lora, "1xA100-80G", micro_rows=1)
  rt = config.model.runtime
  assert not note and rt.attention_impl == "cudnn" and rt.remat_policy == "full" and config.train.chunked_loss
  assert config.train.micro_batches == 128  # one GPU holds the whole global batch of 128: 1 row per micro-batch
  assert config.train.trainable == config_files.load("configs/v15_lora.py:7b").train.trainable
  config, _ = ft.probe_config(lora, "v5e-8", micro_rows=4)
  assert config.model.runtime.attention_impl in ("splash", "chunked") and config.train.micro_batches == 4  # 16 / 4
  nf4 = next(m for m in ft.METHODS if m.key == "qlora_nf4")
  assert ft.probe_config(nf4, "1xA100-40G")[0].model.runtime.quantize == "nf4"
  bf16 = next(m for m in ft.METHODS if m.key == "lora_bf16")
  assert ft.probe_config(bf16, "1xA100-40G")[0].model.runtime.param_dtype == "bfloat16"
  _, note = ft.probe_config(lora, "v5e-8", micro_rows=3)
  assert "do not split" in note


def _row(method, topology, rows, fits, total, **kw):
  r = dict(method=method, topology=topology, micro_rows=rows, rows=rows, fits=fits, total=total * GIB,
           temporaries=(total - 5) * GIB, budget=36 * GIB, frozen=3 * GIB, trainable=GIB, optimizer=GIB,
           backend="cpu", temp_factor=1.25)
  r.update(kw)
  return r


def test_render_picks_the_most_rows_that_fit_and_lists_what_is_missing():
  rows = [_row("lora", "1xA100-40G", 1, True, 20), _row("lora", "1xA100-40G", 4, True, 30),
          _row("lora", "1xA100-40G", 8, False, 40),
          dict(method="full", topology="1xA100-40G", micro_rows=1, fits=False, state_exceeds=True, budget=36 * GIB,
               frozen=GIB, trainable=25 * GIB, optimizer=50 * GIB, backend="cpu", temp_factor=1.25),
          _row("full", "v5e-8", 1, False, 0, backend="tpu", error="JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of "
               "memory on HBM, the total memory required for HLO temporaries (18.50G) exceeds available HBM (15.75G).")]
  text = ft.render(rows, topologies=("1xA100-40G", "v5e-8"))
  lora = [l for l in text.splitlines() if l.startswith("| LoRA r 128 (adapters") and "1xA100-40G" in l]
  assert len(lora) == 1 and "**yes**" in lora[0] and "| 30.0 (36.0) | 4 (8: no) |" in lora[0]
  full = [l for l in text.splitlines() if l.startswith("| full")]
  assert "state alone is over the budget" in full[0] and "1.0 + 25.0 + 50.0 = 76.0" in full[0]
  assert "TPU compiler refuses it (HLO temporaries 18.50G > 15.75G of HBM)" in full[1]
  missing = text.split("Not planned yet")[1]
  assert "LoRA r 128 (adapters + projector) on v5e-8" in missing and "on 1xA100-40G" in missing
  assert "full fine-tune" not in missing
