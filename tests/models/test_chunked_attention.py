"""attention_impl='chunked' (query blocks, rematerialized) against torch's scaled_dot_product_attention and
against the 'xla' kernel (values and gradients), and a whole LLaMA with it against transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_jax.config import RuntimeOptions
from llava_jax.models import common
from llava_jax.models.llama import LlamaForCausalLM, segment_causal_mask


def _inputs(b=2, t=13, h=4, hkv=2, hd=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
  k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
  v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
  seg = np.ones((b, t), np.int32)
  seg[1, 9:] = 0          # right padding in row 1
  seg[0, 6:] = 2          # two packed samples in row 0
  return q, k, v, seg


def _torch_sdpa(q, k, v, mask):
  """torch reference: kv heads repeated as HF's repeat_kv, [B, H, T, hd] layout, bool mask (True = attend)."""
  groups = q.shape[2] // k.shape[2]
  tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2))) for x in (q, k, v))
  tk, tv = tk.repeat_interleave(groups, dim=1), tv.repeat_interleave(groups, dim=1)
  out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(np.array(mask)))
  return np.swapaxes(out.numpy(), 1, 2)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_equals_torch_sdpa(chunk):
  q, k, v, seg = _inputs()
  mask = segment_causal_mask(jnp.asarray(seg))
  got = np.asarray(common.chunked_attention(q, k, v, mask=mask, chunk=chunk))
  want = _torch_sdpa(q, k, v, mask)
  valid = seg != 0  # torch gives NaN on fully masked (padding) query rows; ours stays finite there
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=0)
  xla = np.asarray(common.attention(q, k, v, common.mask_to_bias(mask), impl="xla"))
  np.testing.assert_allclose(got, xla, atol=1e-6, rtol=0)  # padding rows too: the same bias semantics


def test_chunked_gradients_equal_xla():
  q, k, v, seg = _inputs(seed=1)
  mask = segment_causal_mask(jnp.asarray(seg))
  w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)

  def loss(impl, q, k, v):
    if impl == "chunked":
      out = common.chunked_attention(q, k, v, mask=mask, chunk=4)
    else:
      out = common.attention(q, k, v, common.mask_to_bias(mask), impl="xla")
    return jnp.sum(out * w)

  got = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0)


def test_chunked_without_mask_is_full_attention():
  """The CLIP path (no mask): equals torch's unmasked attention."""
  q, k, v, _ = _inputs(h=2, hkv=2, t=11, seed=3)
  got = np.asarray(common.attention(q, k, v, None, impl="chunked"))
  want = _torch_sdpa(q, k, v, np.ones((1, 1, 11, 11), bool))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_llama_with_chunked_attention_equals_transformers():
  from transformers import LlamaConfig
  from transformers import LlamaForCausalLM as HFLlama

  from llava_jax.checkpoints.llama_keys import llama_key_specs
  from llava_jax.checkpoints.table import params_from_tensors
  from llava_jax.checkpoints.hf_configs import text_config_from_hf

  torch.manual_seed(0)
  hf = HFLlama(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           attn_implementation="eager")).eval()
  cfg = text_config_from_hf(hf.config.to_dict())
  sd = {k: x.detach().numpy().copy() for k, x in hf.state_dict().items()}
  runtime = RuntimeOptions(attention_impl="chunked", scan_layers=True, remat_policy="full")
  params = params_from_tensors(llama_key_specs(cfg), sd.__getitem__, True)["language_model"]
  model = LlamaForCausalLM(cfg, runtime)
  ids = np.random.default_rng(4).integers(0, 96, (2, 300)).astype(np.int32)  # > one 256-query block
  mask = np.ones((2, 300), np.int32)
  mask[1, 250:] = 0
  pos = np.broadcast_to(np.arange(300, dtype=np.int32), (2, 300))
  run = jax.jit(lambda p, i, s: model.apply({"params": p}, model.apply({"params": p}, i, method=model.embed),
                                            pos, s))
  got = np.asarray(run(params, ids, mask))
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[1, :250], want[1, :250], atol=1e-4, rtol=0)
