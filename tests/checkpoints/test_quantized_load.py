"""Loading float checkpoints into a quantized model (runtime.quantize): llava-hf via `load_pretrained` and our
orbax params via the inference loader are quantized on the host before placement: every device_put receives
kernel_q / kernel_scale for the decoder's linear layers, never their float kernels, and the result is exactly
`quant.quantize_params` of the float load. Export writes the dequantized (and, with LoRA, merged) weights."""
import numpy as np
import pytest

import jax
from flax import traverse_util

from llava_jax.checkpoints.hf import load_pretrained, place_host_params
from llava_jax.checkpoints.orbax_params import restore_params, save_params
from llava_jax.config import RuntimeOptions
from llava_jax.errors import ConfigError
from llava_jax.checkpoints import load
from llava_jax.models import quant
from llava_jax.parallel import make_mesh
from tests.fixtures import hf_checkpoints as H


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return H.save_llava_hf(H.tiny_llava(seed=0), str(tmp_path_factory.mktemp("hf")), "saved")


@pytest.fixture(scope="module")
def float_load(saved):
  config, params = load_pretrained(saved)
  return config, jax.tree.map(np.asarray, params)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def decoder_kernel_shapes(config):
  """Scanned [L, in, out] shapes (the 2-D ones collide with the projector's, lm_head's and embeddings')."""
  assert config.runtime.scan_layers
  t = config.text
  hd = t.resolved_head_dim
  ins_outs = [(t.hidden_size, t.num_attention_heads * hd), (t.hidden_size, t.num_key_value_heads * hd),
              (t.num_attention_heads * hd, t.hidden_size), (t.hidden_size, t.intermediate_size),
              (t.intermediate_size, t.hidden_size)]
  return {(t.num_hidden_layers,) + s for s in ins_outs}


@pytest.fixture
def placed(monkeypatch):
  """Record (shape, dtype) of every array handed to jax.device_put."""
  seen = []
  real = jax.device_put

  def record(x, *args, **kw):
    for leaf in jax.tree.leaves(x):
      seen.append((tuple(np.shape(leaf)), np.dtype(leaf.dtype)))
    return real(x, *args, **kw)

  monkeypatch.setattr(jax, "device_put", record)
  return seen


def assert_no_float_decoder_kernel_placed(seen, config):
  floats = [(s, d) for s, d in seen if s in decoder_kernel_shapes(config) and np.issubdtype(d, np.floating)]
  assert not floats, floats
  assert any(d in (np.int8, np.uint8) for _, d in seen)


def assert_is_quantized_float(got, float_params, mode):
  want = flat(quant.quantize_params(jax.tree.map(np.copy, float_params), mode))
  got = flat(got)
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


@pytest.mark.parametrize("mode,mesh", [("nf4", None), ("int8", (2, 2, 2))])
def test_load_pretrained_quantizes_on_the_host(saved, float_load, placed, mode, mesh):
  float_config, float_params = float_load
  m = None if mesh is None else make_mesh(mesh)
  config, params = load_pretrained(saved, runtime=RuntimeOptions(quantize=mode), mesh=m)
  assert config.runtime.quantize == mode
  assert_no_float_decoder_kernel_placed(placed, config)
  assert_is_quantized_float(params, float_params, mode)
  if m is not None:
    q = params["language_model"]["layers"]["mlp"]["up_proj"][quant.KERNEL_Q]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_orbax_params_are_quantized_on_the_host(float_load, tmp_path, placed):
  float_config, float_params = float_load
  path = save_params(str(tmp_path / "params"), float_params)
  placed.clear()
  config = float_config.with_runtime(quantize="int4")
  params = load.restore_orbax_params(path, config, None)
  assert_no_float_decoder_kernel_placed(placed, config)
  assert_is_quantized_float(params, float_params, "int4")
  host = restore_params(path, host=True)
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(host))
  again = save_params(str(tmp_path / "quantized"), params)  # an already quantized tree loads as it is
  assert_is_quantized_float(load.restore_orbax_params(again, config, None), float_params, "int4")


def test_mismatched_params_are_a_clear_error(float_load, tmp_path):
  float_config, float_params = float_load
  host = jax.tree.map(np.copy, float_params)
  del host["language_model"]["norm"]
  with pytest.raises(ValueError, match="no checkpoint tensor filled"):
    place_host_params(host, float_config.with_runtime(quantize="int8"))
  path = save_params(str(tmp_path / "params"), float_params)
  other = float_config.replace(text=float_config.text.__class__(**{**float_config.text.__dict__,
                                                                    "intermediate_size": 192}))
  with pytest.raises(ConfigError, match="does not hold params"):
    load.restore_orbax_params(path, other.with_runtime(quantize="int8"), None)


def test_export_writes_the_dequantized_weights_and_merges_qlora(saved, float_load, tmp_path):
  """export_hf of a quantized (+ LoRA = QLoRA) model writes deq(Q) (+ (alpha / r)·A·B) as plain llava-hf
  weights: loading the export back gives exactly `merge_lora(dequantize_params(...))`."""
  from llava_jax.checkpoints.hf import export_hf
  from llava_jax.config import LoraConfig
  from llava_jax.models.lora import merge_lora
  float_config, float_params = float_load
  lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
  qparams = quant.quantize_params(jax.tree.map(np.copy, float_params), "nf4")
  rs = np.random.RandomState(0)
  for path in [p for p in traverse_util.flatten_dict(qparams) if p[-1] == quant.KERNEL_Q]:
    module = qparams
    for name in path[:-1]:
      module = module[name]
    d_in, d_out = float_params["language_model"]["layers"][path[2]][path[3]]["kernel"].shape[1:]
    module["lora_a"] = rs.randn(float_config.text.num_hidden_layers, d_in, 4).astype(np.float32) * 0.1
    module["lora_b"] = rs.randn(float_config.text.num_hidden_layers, 4, d_out).astype(np.float32) * 0.1
  config = float_config.with_runtime(quantize="nf4", lora=lora)
  out = export_hf(config, qparams, str(tmp_path / "export"))
  _, reloaded = load_pretrained(out)
  want = flat(merge_lora(quant.dequantize_params(qparams, "nf4"), lora))
  got = flat(reloaded)
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
  k = "language_model/layers/mlp/down_proj/kernel"
  assert np.abs(np.asarray(got[k]) - float_params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"]).max() > 0
