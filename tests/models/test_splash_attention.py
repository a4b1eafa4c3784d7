"""attention_impl='splash' (jax's Pallas TPU splash-attention kernel, interpret mode on CPU) against the 'xla'
kernel: the attention alone (padded and packed rows, GQA and MHA, values and gradients), a whole LLaMA under
scan + remat, the shard_map under an 8-device mesh, and a compile of the real Mosaic kernel for a TPU topology.

Float32 throughout; outputs compared at valid (segment != 0) positions, losses defined over them. Shapes stay
tiny: interpret mode runs the kernel's grid step by step."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llava_jax import parallel
from llava_jax.config import RuntimeOptions, TextConfig
from llava_jax.models import common, splash
from llava_jax.models.llama import LlamaForCausalLM, segment_causal_mask

TOL = 1e-5


def _segments(b: int, t: int) -> np.ndarray:
  """Row 0: three packed samples then padding; row 1: one sample, right-padded; further rows: whole, left-
  padded, packed in two."""
  seg = np.zeros((b, t), np.int32)
  seg[0, : t // 4], seg[0, t // 4: t // 2], seg[0, t // 2: t - 3] = 1, 2, 3
  if b > 1:
    seg[1, : t - t // 3] = 1
  for r in range(2, b):
    seg[r, r % 3:] = 1 + (np.arange(t - r % 3) >= t // 2)
  return seg


def _inputs(b, t, h, hkv, hd, seed):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
  k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
  v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
  return q, k, v, _segments(b, t)


def _xla(q, k, v, seg):
  return common.attention(q, k, v, common.mask_to_bias(segment_causal_mask(jnp.asarray(seg))), impl="xla")


def _splash(q, k, v, seg):
  return splash.splash_attention(q, k, v, jnp.asarray(seg))


def _loss_and_grads(fn, q, k, v, seg, seed):
  """Σ w · out over valid query positions, and its gradients w.r.t. q, k, v."""
  w = np.random.default_rng(seed).standard_normal(q.shape).astype(np.float32) * (seg != 0)[:, :, None, None]
  return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("b, t, h, hkv, hd", [
    (2, 13, 4, 2, 8),     # GQA, one padded 128 block
    (2, 13, 4, 4, 16),    # MHA
    (3, 300, 2, 1, 8),    # MQA-like GQA, 3 blocks of 128: causal block skipping, segments across blocks
])
def test_splash_equals_xla(b, t, h, hkv, hd):
  q, k, v, seg = _inputs(b, t, h, hkv, hd, seed=t + h + hkv)
  valid = seg != 0
  got = np.asarray(jax.jit(_splash)(q, k, v, seg))
  want = np.asarray(_xla(q, k, v, seg))
  assert np.isfinite(got).all()  # padding queries included
  np.testing.assert_allclose(got[valid], want[valid], atol=TOL, rtol=0)

  loss, grads = _loss_and_grads(_splash, q, k, v, seg, seed=1)
  want_loss, want_grads = _loss_and_grads(_xla, q, k, v, seg, seed=1)
  np.testing.assert_allclose(loss, want_loss, atol=TOL * 10, rtol=1e-6)
  for name, g, r in zip("qkv", grads, want_grads):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=f"d{name}")


def test_splash_bfloat16_close_to_xla():
  """bfloat16 inputs: output in bfloat16, within bfloat16 rounding of the 'xla' kernel on the same inputs."""
  q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == np.float32 else x for x in _inputs(2, 13, 4, 2, 16, seed=7))
  got = _splash(q, k, v, seg)
  assert got.dtype == jnp.bfloat16
  want = np.asarray(_xla(q, k, v, seg), np.float32)
  valid = seg != 0
  np.testing.assert_allclose(np.asarray(got, np.float32)[valid], want[valid], atol=3e-2, rtol=0)


def test_packed_samples_do_not_see_each_other():
  """Changing one packed sample's keys and values leaves the other samples' outputs exactly unchanged."""
  q, k, v, seg = _inputs(1, 24, 2, 1, 8, seed=5)
  seg[0] = np.repeat([1, 2, 3], 8)
  k2, v2 = k.copy(), v.copy()
  k2[0, 8:16] += 3.0
  v2[0, 8:16] -= 2.0
  a, b = np.asarray(_splash(q, k, v, seg)), np.asarray(_splash(q, k2, v2, seg))
  np.testing.assert_array_equal(a[0, :8], b[0, :8])
  np.testing.assert_array_equal(a[0, 16:], b[0, 16:])
  assert np.abs(a[0, 8:16] - b[0, 8:16]).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Whole decoder

CFG = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)


def _batch(b=4, t=20, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
  seg = _segments(b, t)
  pos = np.zeros((b, t), np.int32)  # positions restart per packed sample
  for r in range(b):
    for s in set(seg[r]) - {0}:
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  return ids, pos, seg


def _model(impl, policy="full", scan=True):
  return LlamaForCausalLM(CFG, RuntimeOptions(attention_impl=impl, scan_layers=scan, remat_policy=policy))


def _params(scan=True):
  ids, pos, seg = _batch()
  model = _model("xla", scan=scan)
  e = jnp.zeros(ids.shape + (CFG.hidden_size,))
  return nn.unbox(model.init(jax.random.PRNGKey(0), e, pos, seg)["params"])


def _logits_loss_grads(model, params, ids, pos, seg):
  """(logits, grads of the next-token NLL summed over positions whose next token is in the same sample)."""
  def loss(p):
    logits = model.apply({"params": p}, model.apply({"params": p}, ids, method=model.embed), pos, seg)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    same_sample = (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
    return -jnp.sum(picked * same_sample), logits
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


@pytest.mark.parametrize("policy, scan", [("full", True), ("save_attn_out", True), ("dots", False)])
def test_llama_splash_equals_xla(policy, scan):
  params = _params(scan)
  ids, pos, seg = _batch()
  run = jax.jit(_logits_loss_grads, static_argnums=0)
  got_logits, got_grads = run(_model("splash", policy, scan), params, ids, pos, seg)
  want_logits, want_grads = run(_model("xla", policy, scan), params, ids, pos, seg)
  valid = seg != 0
  assert np.isfinite(np.asarray(got_logits)).all()  # padding positions included
  np.testing.assert_allclose(np.asarray(got_logits)[valid], np.asarray(want_logits)[valid], atol=TOL, rtol=0)
  flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
  for (path, g), r in zip(flat_got, jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_llama_splash_sharded_equals_single_device():
  """jit + NamedShardings on a (data 2, fsdp 2, tensor 2) mesh: the shard_map splits batch and heads."""
  params = _params()
  ids, pos, seg = _batch()
  model = _model("splash", "save_attn_out")
  want_logits, want_grads = jax.jit(_logits_loss_grads, static_argnums=0)(model, params, ids, pos, seg)

  mesh = parallel.make_mesh((2, 2, 2))
  e = jnp.zeros(ids.shape + (CFG.hidden_size,))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), e, pos, seg)
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(abstract)["params"], mesh)
  batch = parallel.batch_sharding(mesh)
  args = [jax.device_put(jnp.asarray(x), batch) for x in (ids, pos, seg)]
  with jax.set_mesh(mesh), parallel.axis_rules():
    run = jax.jit(lambda p, i, po, s: _logits_loss_grads(model, p, i, po, s),
                  in_shardings=(shardings, batch, batch, batch), out_shardings=(None, shardings))
    lowered = run.lower(jax.device_put(params, shardings), *args)
    got_logits, got_grads = lowered.compile()(jax.device_put(params, shardings), *args)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=TOL, rtol=0)
  for g, r in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0)


@pytest.mark.parametrize("mesh_shape, b, h, hkv", [
    ((2, 2, 2), 2, 4, 1),   # batch 2 over data only (fsdp does not divide it); kv heads repeated for 'tensor'
    ((1, 1, 8), 2, 2, 2),   # heads 2 do not divide over tensor 8: replicated
])
def test_splash_sharded_attention_equals_xla(mesh_shape, b, h, hkv):
  q, k, v, seg = _inputs(b, 13, h, hkv, 8, seed=9)
  mesh = parallel.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), parallel.axis_rules():
    got_loss, got_grads = jax.jit(lambda *a: _loss_and_grads(_splash, *a, seed=3))(q, k, v, seg)
  want_loss, want_grads = _loss_and_grads(_xla, q, k, v, seg, seed=3)
  np.testing.assert_allclose(got_loss, want_loss, atol=TOL * 10, rtol=1e-6)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The real kernel, compiled for a TPU topology on this CPU host


def _tpu_topology_mesh():
  """(data 2, fsdp 1, tensor 2) over a v5e 2x2 topology's devices (descriptions only: nothing runs on them)."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    pytest.skip(f"libtpu is not importable, so XLA:TPU cannot compile here: {e}")
  from jax.experimental import topologies
  # other processes on this host (plan compiles, other test runs) may hold libtpu's lockfile; we only compile
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  return parallel.make_mesh((2, 1, 2), devices=topo.devices)


@pytest.mark.parametrize("hd", [64, 128])
def test_splash_compiles_for_tpu(hd):
  """Forward + backward of the attention, lowered and compiled by XLA:TPU for a v5e 2x2 slice (no interpret:
  the platform comes from the mesh's devices, not from this host's CPU backend)."""
  mesh = _tpu_topology_mesh()
  b, t, h, hkv = 4, 1000, 8, 2   # T padded to 1024: blocks of 512
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  rows = NamedSharding(mesh, P(("data", "fsdp"), None))
  specs = (jax.ShapeDtypeStruct((b, t, h, hd), jnp.bfloat16, sharding=heads),
           jax.ShapeDtypeStruct((b, t, hkv, hd), jnp.bfloat16, sharding=heads),
           jax.ShapeDtypeStruct((b, t, hkv, hd), jnp.bfloat16, sharding=heads),
           jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows))

  def fwd_bwd(q, k, v, seg):
    out, vjp = jax.vjp(lambda q, k, v: splash.splash_attention(q, k, v, seg), q, k, v)
    return out, vjp(out)

  with jax.set_mesh(mesh), parallel.axis_rules():
    lowered = jax.jit(fwd_bwd, in_shardings=tuple(s.sharding for s in specs),
                      out_shardings=(heads, (heads, heads, heads))).lower(*specs)
  text = lowered.as_text()
  assert "tpu_custom_call" in text  # the Mosaic kernel, not the interpreter
  compiled = lowered.compile()
  assert compiled.as_text()


@pytest.mark.parametrize("policy, kernels", [("full", 4), ("save_attn_out", 3)])
def test_save_attn_out_keeps_the_kernel_residuals_on_tpu(policy, kernels):
  """Under 'save_attn_out' the kernel's residuals (named 'attn_out') are saved, so the compiled TPU step runs the
  forward, dq and dkv kernels once each; 'full' recomputes the forward in the backward pass (4 kernels)."""
  mesh = _tpu_topology_mesh()
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  specs = [jax.ShapeDtypeStruct((4, 256, 4, 128), jnp.bfloat16, sharding=sharding)] * 3
  seg = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))

  def loss(q, k, v, seg):
    out = jax.ad_checkpoint.checkpoint_name(splash.splash_attention(q, k, v, seg), "attn_out")
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  loss = jax.checkpoint(loss, policy=common.remat_policy(policy))
  with jax.set_mesh(mesh), parallel.axis_rules():
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*specs, seg).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == kernels


def test_llama_train_step_compiles_for_tpu():
  """A bfloat16 LLaMA (scan + save_attn_out remat) value-and-grad compiled for the v5e 2x2 topology: the
  shard_map'd kernel inside nn.scan / nn.remat lowers to Mosaic (forward, dq, dkv once each in the layer body).
  One kv head for two q heads over tensor=2 takes the repeat-kv path."""
  mesh = _tpu_topology_mesh()
  cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                            num_key_value_heads=1)
  model = LlamaForCausalLM(cfg, RuntimeOptions(dtype="bfloat16", attention_impl="splash", scan_layers=True,
                                               remat_policy="save_attn_out"))
  b, t = 4, 300
  ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((b, t, 256), jnp.bfloat16),
                            ints, ints)
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(abstract)["params"], mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract["params"]), shardings)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=parallel.batch_sharding(mesh))

  def loss(p, ids, pos, seg):
    logits = model.apply({"params": p}, model.apply({"params": p}, ids, method=model.embed), pos, seg)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  with jax.set_mesh(mesh), parallel.axis_rules():
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids, ids, ids).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
