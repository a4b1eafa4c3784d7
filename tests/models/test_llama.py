"""LlamaForCausalLM against transformers' PyTorch LlamaForCausalLM on the same (tiny, random) weights."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from llava_jax import parallel
from llava_jax.checkpoints.llama_keys import llama_key_specs
from llava_jax.checkpoints.table import export_tensors, leaf_path, params_from_tensors
from llava_jax.checkpoints.hf_configs import text_config_from_hf
from llava_jax.config import RuntimeOptions
from llava_jax.models.llama import LlamaForCausalLM, rope_inv_freq

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2, num_hidden_layers=3, vocab_size=300),
    "llama3_rope": dict(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE),
    "theta_tied": dict(rope_parameters={"rope_type": "default", "rope_theta": 1234.5}, tie_word_embeddings=True),
}
CONTRACT_AXES = {  # param module name → logical axes of its leaf (docs/architecture.md)
    "embed_tokens": ("vocab", "embed"), "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"), "input_layernorm": ("norm",),
    "post_attention_layernorm": ("norm",), "norm": ("norm",), "lm_head": ("embed", "vocab"),
}


@functools.lru_cache(maxsize=None)
def hf_model(name):
  """(torch model, our TextConfig, torch state dict as numpy), built once per config name."""
  torch.manual_seed(sorted(CONFIGS).index(name))
  hf = HFLlama(LlamaConfig(**{**BASE, **CONFIGS[name]}, attn_implementation="eager")).eval()
  with torch.no_grad():  # norm weights are ones at init: randomize them so the scale is exercised
    for k, v in hf.state_dict().items():
      if "norm" in k:
        v.copy_(1 + 0.1 * torch.randn_like(v))
  sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  return hf, text_config_from_hf(hf.config.to_dict()), sd


@functools.lru_cache(maxsize=None)
def _ours(name, runtime):
  _, cfg, sd = hf_model(name)
  params = params_from_tensors(llama_key_specs(cfg), sd.__getitem__, runtime.scan_layers)
  model = LlamaForCausalLM(cfg, runtime)
  run = jax.jit(lambda v, ids, pos, seg: model.apply(v, model.apply(v, ids, method=model.embed), pos, seg))
  return model, {"params": params["language_model"]}, run


def ours(name, **runtime):
  """(model, variables, run) with the HF weights converted through the key table; `run(v, ids, pos, seg)`
  is the jitted embed → decoder → logits. Cached per (config, runtime) so each compiles once."""
  return _ours(name, RuntimeOptions(**runtime))


def forward(run, variables, ids, positions=None, segment_ids=None):
  """ids [B, T] → logits [B, T, V] numpy float32 (positions default to arange, segments to all ones)."""
  b, t = ids.shape
  positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
  segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
  return np.asarray(run(variables, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                        jnp.asarray(segment_ids, jnp.int32)))


def hf_logits(name, ids, attention_mask=None):
  hf = hf_model(name)[0]
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    return hf(torch.tensor(np.asarray(ids)), attention_mask=mask).logits.numpy()


def random_ids(name, shape, seed=0):
  return np.random.RandomState(seed).randint(0, hf_model(name)[1].vocab_size, shape)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(name):
  hf, cfg, _ = hf_model(name)
  model, variables, run = ours(name)
  ids = random_ids(name, (2, 40))
  got = forward(run, variables, ids)
  want = hf_logits(name, ids)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  assert ("lm_head" in variables["params"]) == (not cfg.tie_word_embeddings)
  # the RoPE frequencies are HF's (incl. llama3 scaling); theta came through the config conversion
  np.testing.assert_allclose(rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling),
                             hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6, atol=0)


def test_llama3_scaling_hits_all_three_bands():
  """The llama3 test config keeps, divides and interpolates frequencies (so all branches are compared)."""
  cfg = hf_model("llama3_rope")[1]
  base = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta)
  ratio = base / rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
  assert np.isclose(ratio, 1.0).any(), ratio
  assert np.isclose(ratio, cfg.rope_scaling.factor).any(), ratio
  assert ((ratio > 1.01) & (ratio < cfg.rope_scaling.factor - 0.01)).any(), ratio


def test_right_padding_matches_rows_alone_and_transformers():
  name = "gqa"
  model, variables, run = ours(name)
  lengths = [16, 9]
  ids = random_ids(name, (2, 16), seed=1)
  mask = (np.arange(16)[None] < np.array(lengths)[:, None]).astype(np.int32)
  got = forward(run, variables, ids, segment_ids=mask)
  assert np.isfinite(got).all()  # padded positions too
  want = hf_logits(name, ids, attention_mask=mask)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(got[row, :n], want[row, :n], atol=TOL, rtol=0)
    alone_hf = hf_logits(name, ids[row:row + 1, :n])[0]
    np.testing.assert_allclose(got[row, :n], alone_hf, atol=TOL, rtol=0)
  alone = forward(run, variables, ids[1:, :9])[0]  # padding changes no real position
  np.testing.assert_allclose(got[1, :9], alone, atol=1e-5, rtol=0)


def packed_inputs(name):
  """Row 0 packs sample A (5 tokens, segment 1), sample B (6, segment 2) and 2 padding tokens; row 1 is one
  plain 13-token sample C. Returns (A, B, C, ids, segment_ids, positions)."""
  a, b, c = (random_ids(name, (1, n), seed)[0] for seed, n in ((2, 5), (3, 6), (4, 13)))
  ids = np.stack([np.concatenate([a, b, [0, 0]]), c])
  seg = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13])
  pos = np.array([list(range(5)) + list(range(6)) + [0, 0], list(range(13))])
  return a, b, c, ids, seg, pos


@pytest.mark.parametrize("name", ["gqa", "llama3_rope"])
def test_packed_row_matches_samples_alone(name):
  model, variables, run = ours(name)
  a, b, c, ids, seg, pos = packed_inputs(name)
  got = forward(run, variables, ids, positions=pos, segment_ids=seg)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[0, :5], hf_logits(name, a[None])[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(got[0, 5:11], hf_logits(name, b[None])[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(got[1], hf_logits(name, c[None])[0], atol=TOL, rtol=0)


def test_scan_unscanned_and_remat_agree():
  name = "gqa"
  hf = hf_model(name)[0]
  ids = random_ids(name, (2, 16), seed=3)
  want = hf_logits(name, ids)
  for scan in (True, False):
    model, variables, run = ours(name, scan_layers=scan)
    assert ("layers" in variables["params"]) == scan and ("layers_2" in variables["params"]) != scan
    np.testing.assert_allclose(forward(run, variables, ids), want, atol=TOL, rtol=0, err_msg=f"scan={scan}")

  # remat (scanned or not) gives torch's loss and gradient w.r.t. the input embeddings on a right-padded
  # batch (loss over real tokens only; the fully masked padding rows must not leak NaN into the gradient)
  mask = (np.arange(16)[None] < np.array([[16], [11]])).astype(np.int32)
  embeds = torch.tensor(hf_model(name)[2]["model.embed_tokens.weight"][ids], requires_grad=True)
  hf_out = hf(inputs_embeds=embeds, attention_mask=torch.tensor(mask)).logits
  hf_loss = (hf_out * torch.tensor(mask)[..., None]).sum()
  hf_loss.backward()
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  for scan, remat in [(True, "full"), (False, "dots")]:
    model, variables, _ = ours(name, scan_layers=scan, remat_policy=remat)
    fn = jax.value_and_grad(lambda x: (model.apply(variables, x, pos, jnp.asarray(mask)) * mask[..., None]).sum())
    x = jnp.asarray(embeds.detach().numpy())
    assert "remat" in str(jax.make_jaxpr(fn)(x))
    value, grad = jax.jit(fn)(x)
    np.testing.assert_allclose(float(value), hf_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), embeds.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=remat)


def test_return_hidden_and_logits_method():
  name = "theta_tied"
  model, variables, run = ours(name)
  ids = random_ids(name, (1, 9), seed=4)
  pos, seg = jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32)

  @jax.jit
  def hidden_and_logits(v, ids):
    hidden = model.apply(v, model.apply(v, ids, method=model.embed), pos, seg, return_hidden=True)
    return hidden, model.apply(v, hidden, method=model.logits)

  hidden, logits = hidden_and_logits(variables, jnp.asarray(ids))
  hf = hf_model(name)[0]
  with torch.no_grad():
    want = hf.model(torch.tensor(ids)).last_hidden_state.numpy()
  assert hidden.shape == (1, 9, 64)
  np.testing.assert_allclose(np.asarray(hidden), want, atol=TOL, rtol=0)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), hf_logits(name, ids), atol=TOL, rtol=0)


def test_embed_out_of_vocab_reads_row_zero():
  name = "mha"
  model, variables, run = ours(name)
  table = hf_model(name)[2]["model.embed_tokens.weight"]
  ids = jnp.array([[5, -200, 128, 3]])
  got = np.asarray(model.apply(variables, ids, method=model.embed))
  np.testing.assert_array_equal(got, table[[5, 0, 0, 3]][None])
  with pytest.raises(ValueError, match="integers"):
    model.apply(variables, jnp.zeros((1, 2), jnp.float32), method=model.embed)


def test_bad_shapes_raise():
  model, variables, run = ours("mha")
  e = jnp.zeros((2, 5, 64))
  with pytest.raises(ValueError, match="positions"):
    model.apply(variables, e, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="inputs_embeds"):
    model.apply(variables, jnp.zeros((2, 5, 32)), jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_close_to_float32(param_dtype):
  name = "gqa"
  model, variables, run = ours(name, dtype="bfloat16", param_dtype=param_dtype)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)),
                            jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  assert {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(abstract))} == {jnp.dtype(param_dtype)}
  variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), variables)
  ids = random_ids(name, (2, 16), seed=5)
  got = forward(run, variables, ids)
  assert got.dtype == np.float32
  want = hf_logits(name, ids)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 2e-2, rel
  assert np.abs(got - want).max() > 1e-4  # it really ran in bfloat16


def test_dot_product_attention_equals_xla():
  name = "gqa"
  a, b, c, ids, seg, pos = packed_inputs(name)  # packing, padding rows and GQA in one batch
  out = {}
  for impl in ("xla", "dot_product"):
    model, variables, run = ours(name, attention_impl=impl)
    out[impl] = forward(run, variables, ids, positions=pos, segment_ids=seg)
  assert np.isfinite(out["dot_product"]).all()
  np.testing.assert_allclose(out["dot_product"], out["xla"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["dot_product"][0, 5:11], hf_logits(name, b[None])[0], atol=TOL, rtol=0)
  _, variables, run = ours(name, attention_impl="cudnn")  # flash attention is GPU-only: check the guard
  with pytest.raises(ValueError, match="cudnn"):
    forward(run, variables, ids, positions=pos, segment_ids=seg)


def test_sharded_apply_equals_unsharded():
  name = "gqa"
  model, variables, run = ours(name)
  ids = random_ids(name, (4, 16), seed=8)
  seg = (np.arange(16)[None] < np.array([[16], [9], [16], [4]])).astype(np.int32)
  want = forward(run, variables, ids, segment_ids=seg)

  mesh = parallel.make_mesh((2, 2, 2))
  e = jnp.zeros((4, 16, 64))
  pos = jnp.broadcast_to(jnp.arange(16), (4, 16))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), e, pos, jnp.asarray(seg))
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
  sharded = jax.device_put(variables, shardings)
  q = sharded["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  batch = parallel.batch_sharding(mesh)
  args = [jax.device_put(jnp.asarray(x, jnp.int32), batch) for x in (ids, pos, seg)]

  def run(v, ids, pos, seg):
    return model.apply(v, model.apply(v, ids, method=model.embed), pos, seg)

  with jax.set_mesh(mesh), parallel.axis_rules():
    got = jax.jit(run)(sharded, *args)
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")  # the activation constraints took effect
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gqa", "theta_tied"])
@pytest.mark.parametrize("scan", [True, False])
def test_key_specs_cover_params_and_export_state_dict(name, scan):
  hf, cfg, sd = hf_model(name)
  specs = llama_key_specs(cfg)
  model = LlamaForCausalLM(cfg, RuntimeOptions(scan_layers=scan))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)),
                            jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  leaves = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  shapes = {path: leaf.value.shape for path, leaf in leaves.items()}
  paths = {leaf_path(s, scan)[1:] for s in specs}
  assert paths == set(shapes)  # the table covers exactly the module's param tree
  for path, leaf in leaves.items():  # logical axes as docs/architecture.md lists them
    names = tuple(leaf.names)
    if scan and path[0] == "layers":
      assert names[0] == "layers"
      names = names[1:]
    assert names == CONTRACT_AXES[path[-2]], path

  params = params_from_tensors(specs, sd.__getitem__, scan)
  for path, shape in shapes.items():
    node = params["language_model"]
    for k in path:
      node = node[k]
    assert node.shape == shape, path
  exported = dict(export_tensors(specs, params, scan))
  expected = set(sd) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  assert set(exported) == expected
  for k in expected:
    np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)


def test_key_specs_prefixes():
  cfg = dataclasses.replace(hf_model("mha")[1], num_hidden_layers=1)
  specs = llama_key_specs(cfg, prefix="language_model.model.", lm_head_key="language_model.lm_head.weight",
                          path_prefix=("lm",))
  keys = [s.hf_key for s in specs]
  assert keys[0] == "language_model.model.embed_tokens.weight" and keys[-1] == "language_model.lm_head.weight"
  assert all(s.path[0] == "lm" for s in specs)
  assert len(keys) == 1 + 9 + 1 + 1 and not any("rotary_emb" in k for k in keys)
