"""CLIP vision tower vs transformers' CLIPVisionModel (PyTorch, float32) on the same random weights."""
import dataclasses

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_jax import parallel
from llava_jax.checkpoints import table
from llava_jax.checkpoints.clip_keys import clip_key_specs
from llava_jax.config import RuntimeOptions, VisionConfig
from llava_jax.models.clip import CLIPVisionTransformer

GEOMETRIES = {"28px_patch4": (28, 4), "56px_patch7": (56, 7)}
N_IMAGES = 4  # divisible by data*fsdp = 4 of the (2, 2, 2) mesh


class Ref:
  """A tiny HF CLIPVisionModel, its state dict, and its outputs on fixed NHWC pixels."""

  def __init__(self, image_size, patch_size):
    torch.manual_seed(image_size)
    hf = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, attn_implementation="eager")
    model = CLIPVisionModel(hf).eval()
    with torch.no_grad():  # HF init leaves biases at 0 and norms at 1: perturb so every tensor matters
      for name, p in model.named_parameters():
        p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    self.config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size)
    self.state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(image_size)
    self.pixels = rng.standard_normal((N_IMAGES, image_size, image_size, 3)).astype(np.float32)
    with torch.no_grad():
      out = model(torch.from_numpy(self.pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    self.hidden = np.stack([h.numpy() for h in out.hidden_states])  # [L+1, N, P+1, D]
    self.pooled = out.pooler_output.numpy()

  def specs(self):
    # transformers 5 CLIPVisionModel state dicts carry no 'vision_model.' prefix (it strips it on load).
    return clip_key_specs(self.config, prefix="", path_prefix=())

  def params(self, scan_layers, dtype=None):
    return table.params_from_tensors(self.specs(), self.state.__getitem__, scan_layers, dtype)


@pytest.fixture(scope="module", params=list(GEOMETRIES), ids=list(GEOMETRIES))
def ref(request):
  return Ref(*GEOMETRIES[request.param])


@pytest.fixture(scope="module")
def ref28():
  return Ref(*GEOMETRIES["28px_patch4"])


def run(config, runtime, params, pixels, layers=None, method=None):
  model = CLIPVisionTransformer(config, runtime)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method, **({} if method else {"layers": layers})))
  return np.asarray(fn(params, jnp.asarray(pixels)).astype(jnp.float32))


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "none"), (True, "full"), (False, "dots")])
def test_every_hidden_state_matches_hf(ref, scan, remat):
  out = run(ref.config, RuntimeOptions(scan_layers=scan, remat_policy=remat), ref.params(scan), ref.pixels)
  assert out.shape == ref.hidden.shape  # [L+1, N, P+1, D]
  for i in range(out.shape[0]):
    np.testing.assert_allclose(out[i], ref.hidden[i], atol=1e-4, rtol=0, err_msg=f"hidden state {i}")


def test_param_tree_matches_init(ref28):
  """Converted checkpoint and `init` agree on every leaf name and shape (the contract's param tree)."""
  for scan in (True, False):
    model = CLIPVisionTransformer(ref28.config, RuntimeOptions(scan_layers=scan))
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
    init_shapes = jax.tree.map(lambda a: a.shape, nn.unbox(init)["params"])
    loaded_shapes = jax.tree.map(lambda a: a.shape, ref28.params(scan))
    assert init_shapes == loaded_shapes
  assert loaded_shapes["encoder"]["layers_2"]["self_attn"]["q_proj"]["kernel"] == (32, 32)
  assert loaded_shapes["embeddings"]["patch_embedding"]["kernel"] == (4, 4, 3, 32)


@pytest.mark.parametrize("scan", [True, False])
def test_layer_selection(ref28, scan):
  rt = RuntimeOptions(scan_layers=scan)
  params = ref28.params(scan)
  out = run(ref28.config, rt, params, ref28.pixels, layers=(-2,))
  assert out.shape == (1,) + ref28.hidden.shape[1:]
  np.testing.assert_allclose(out[0], ref28.hidden[-2], atol=1e-4, rtol=0)  # LLaVA's choice: block L-1
  sel = (3, 0, -2, 2, -4)  # unsorted, duplicates (-2 == 2, -4 == 0), first and last
  out = run(ref28.config, rt, params, ref28.pixels, layers=sel)
  np.testing.assert_allclose(out, ref28.hidden[list(sel)], atol=1e-4, rtol=0)


def test_unscanned_stops_at_deepest_requested_layer(ref28):
  params = ref28.params(False)
  del params["encoder"]["layers_2"]  # the last block is never reached for layers=(-2,)
  out = run(ref28.config, RuntimeOptions(scan_layers=False), params, ref28.pixels, layers=(-2,))
  np.testing.assert_allclose(out[0], ref28.hidden[-2], atol=1e-4, rtol=0)


def _scan_lengths(jaxpr) -> list:
  """Lengths of every `scan` in a (closed) jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out.append(eqn.params["length"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _scan_lengths(sub)
  return out


@pytest.mark.parametrize("layers,depth", [((-2,), 2), ((1, 0), 1), ((0,), 0), ((-1, -2), 3)])
def test_scanned_stops_at_deepest_requested_layer(ref28, layers, depth):
  """The scan runs only the blocks up to the deepest requested state (a slice of the stacked params; the tree
  keeps all L): hidden_states[-2] scans 2 of the 3 blocks and still equals HF's."""
  rt = RuntimeOptions(scan_layers=True)
  params = ref28.params(True)
  model = CLIPVisionTransformer(ref28.config, rt)
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, layers=layers))(params, ref28.pixels)
  assert _scan_lengths(jaxpr.jaxpr) == ([depth] if depth else [])
  out = run(ref28.config, rt, params, ref28.pixels, layers=layers)
  np.testing.assert_allclose(out, ref28.hidden[list(layers)], atol=1e-4, rtol=0)


def test_pooled_output_uses_post_layernorm(ref28):
  out = run(ref28.config, RuntimeOptions(), ref28.params(True), ref28.pixels,
            method=CLIPVisionTransformer.pooled_output)
  np.testing.assert_allclose(out, ref28.pooled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_close_to_float32(ref28, param_dtype):
  rt = RuntimeOptions(dtype="bfloat16", param_dtype=param_dtype)
  params = ref28.params(True, dtype=param_dtype)
  model = CLIPVisionTransformer(ref28.config, rt)
  raw = jax.jit(model.apply)({"params": params}, jnp.asarray(ref28.pixels))
  assert raw.dtype == jnp.bfloat16
  out = np.asarray(raw.astype(jnp.float32))
  for i in range(out.shape[0]):
    rel = np.linalg.norm(out[i] - ref28.hidden[i]) / np.linalg.norm(ref28.hidden[i])
    assert rel <= 2e-2, f"hidden state {i}: relative error {rel:.4f}"


@pytest.mark.parametrize("scan", [True, False])
def test_export_reproduces_state_dict(ref28, scan):
  specs = ref28.specs()
  assert {s.hf_key for s in specs} == set(ref28.state)  # every tensor listed, nothing extra
  exported = dict(table.export_tensors(specs, ref28.params(scan), scan))
  assert set(exported) == set(ref28.state)
  for k, v in ref28.state.items():
    assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_key_specs_default_prefix():
  cfg = VisionConfig(num_hidden_layers=2)
  keys = [s.hf_key for s in clip_key_specs(cfg)]
  assert "vision_model.embeddings.patch_embedding.weight" in keys
  assert "vision_model.encoder.layers.1.self_attn.out_proj.bias" in keys
  assert "vision_model.post_layernorm.weight" in keys
  assert not any("position_ids" in k for k in keys)
  assert all(s.path[0] == "vision_tower" for s in clip_key_specs(cfg))
  nested = clip_key_specs(cfg, prefix="vision_tower.vision_model.", path_prefix=("a", "b"))
  assert nested[0].hf_key == "vision_tower.vision_model.embeddings.class_embedding"
  assert nested[0].path == ("a", "b", "embeddings", "class_embedding")


def test_params_from_tensors_errors(ref28):
  state = dict(ref28.state)
  del state["encoder.layers.1.mlp.fc1.bias"]
  with pytest.raises(KeyError, match="encoder.layers.1.mlp.fc1.bias"):
    table.params_from_tensors(ref28.specs(), state.__getitem__, True)
  specs = [s for s in ref28.specs() if not (s.layer == 0 and s.hf_key.endswith("fc2.weight"))]
  with pytest.raises(ValueError, match="layer rows"):
    table.params_from_tensors(specs, ref28.state.__getitem__, True)


@pytest.mark.parametrize("scan", [True, False])
def test_logical_partition_specs(ref28, scan):
  model = CLIPVisionTransformer(ref28.config, RuntimeOptions(scan_layers=scan))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
  specs = nn.get_partition_spec(abstract)["params"]
  lead = ("layers",) if scan else ()
  layer = specs["encoder"]["layers" if scan else "layers_1"]
  P = jax.sharding.PartitionSpec
  assert specs["embeddings"]["class_embedding"] == P("vision_embed")
  assert specs["embeddings"]["patch_embedding"]["kernel"] == P("patch", None, "channels", "vision_embed")
  assert specs["embeddings"]["position_embedding"]["embedding"] == P("positions", "vision_embed")
  assert specs["pre_layrnorm"]["scale"] == P("norm")
  assert specs["post_layernorm"]["bias"] == P("norm")
  for name in ("q_proj", "k_proj", "v_proj"):
    assert layer["self_attn"][name]["kernel"] == P(*lead, "vision_embed", "vision_heads")
    assert layer["self_attn"][name]["bias"] == P(*lead, "vision_heads")
  assert layer["self_attn"]["out_proj"]["kernel"] == P(*lead, "vision_heads", "vision_embed")
  assert layer["mlp"]["fc1"]["kernel"] == P(*lead, "vision_embed", "vision_mlp")
  assert layer["mlp"]["fc2"]["kernel"] == P(*lead, "vision_mlp", "vision_embed")
  assert layer["layer_norm1"]["scale"] == P(*lead, "norm")
  names = {a for a, _ in parallel.LOGICAL_AXIS_RULES}
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
    assert len(spec) >= 1 and set(spec) - {None} <= names, spec  # every leaf annotated, only known names


@pytest.mark.parametrize("scan", [True, False])
def test_sharded_apply_matches_unsharded(ref28, scan):
  assert jax.device_count() == 8
  config, rt = ref28.config, RuntimeOptions(scan_layers=scan, remat_policy="full")
  model = CLIPVisionTransformer(config, rt)
  params = ref28.params(scan)
  expected = run(config, rt, params, ref28.pixels, layers=(-2, -1))

  mesh = parallel.make_mesh((2, 2, 2))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(abstract)["params"], mesh)
  sharded = jax.device_put(params, shardings)
  q = sharded["encoder"]["layers" if scan else "layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.shard_shape(q.shape) != q.shape  # really split (fsdp × tensor)
  pixels = jax.device_put(ref28.pixels, parallel.batch_sharding(mesh, 4))
  with jax.set_mesh(mesh), parallel.axis_rules():
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, layers=(-2, -1)),
                 in_shardings=(shardings, parallel.batch_sharding(mesh, 4)))
    out = fn(sharded, pixels)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out), ref28.hidden[[-2, -1]], atol=1e-4, rtol=0)


def test_bad_inputs(ref28):
  model = CLIPVisionTransformer(ref28.config, RuntimeOptions())
  variables = {"params": ref28.params(True)}
  with pytest.raises(ValueError, match="image size 56x56 does not match"):
    model.apply(variables, jnp.zeros((1, 56, 56, 3)))
  with pytest.raises(ValueError, match="NCHW"):
    model.apply(variables, jnp.zeros((1, 3, 28, 28)))
  with pytest.raises(ValueError, match="out of range"):
    model.apply(variables, jnp.zeros((1, 28, 28, 3)), layers=(4,))
  with pytest.raises(ValueError, match="hidden_act"):
    bad = CLIPVisionTransformer(dataclasses.replace(ref28.config, hidden_act="swish"), RuntimeOptions())
    bad.apply(variables, jnp.zeros((1, 28, 28, 3)))
