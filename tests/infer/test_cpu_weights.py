"""bf16 generation on XLA:CPU without a float32 copy of the layer stacks (infer/cpu_weights.py): the stacks go to
the jitted prefill / decode as uint16 views of the same buffers and each layer is bitcast back inside the scan.
Checked: the views share memory with the params; generate gives the same tokens and scores with and without them
(on one device and on a 2-way fsdp mesh); the compiled prefill's temporaries drop below the bf16 params, where XLA
alone converts every layer of the stack to float32 (2x the params, printed for the record)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from llava_jax import parallel
from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.infer import cpu_weights, generate as gen
from llava_jax.models.llava import abstract_params, init_params

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=16, patch_size=8)
BF16 = RuntimeOptions(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)


def config(text=None):
  text = text or TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  return LlavaConfig(vision=VISION, text=text, image_token_index=95, runtime=BF16)


@pytest.fixture(scope="module")
def model():
  cfg = config()
  params = init_params(cfg, jax.random.key(3))
  flat = traverse_util.flatten_dict(params)
  params = traverse_util.unflatten_dict({p: (x * 20).astype(x.dtype) if p[-1] == "embedding" else x
                                         for p, x in flat.items()})  # peaked logits: greedy is decisive
  return cfg, params


def _prompts(cfg, rng):
  ids = [[1] + [cfg.image_token_index] * cfg.num_image_tokens + list(rng.integers(3, 90, n)) for n in (5, 9)]
  pixels = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  return ids, pixels


def test_views_share_the_params_buffers(model):
  cfg, params = model
  views = traverse_util.flatten_dict(cpu_weights.bit_views(params))
  flat = traverse_util.flatten_dict(params)
  viewed = [p for p in flat if views[p].dtype == jnp.uint16]
  assert viewed and all("layers" in p for p in viewed)
  assert all(flat[p].dtype == jnp.bfloat16 for p in viewed)
  assert not any(views[p].dtype == jnp.uint16 for p in flat if "layers" not in p)  # embeddings, heads stay bf16
  for p in viewed:
    assert views[p].unsafe_buffer_pointer() == flat[p].unsafe_buffer_pointer(), p
    np.testing.assert_array_equal(np.asarray(views[p]), np.asarray(flat[p]).view(np.uint16))


@pytest.mark.parametrize("fsdp", [1, 2])  # 2: fsdp x the rest as data
def test_generate_is_unchanged_by_the_views(model, fsdp, monkeypatch):
  cfg, params = model
  mesh = None
  if fsdp > 1:
    mesh = parallel.make_mesh((-1, fsdp, 1))
    params = gen.shard_params(cfg, params, mesh)
  ids, pixels = _prompts(cfg, np.random.default_rng(0))
  run = lambda: gen.generate(cfg, params, ids, pixels, max_new_tokens=6, stop_token_ids=[], output_scores=True,
                             mesh=mesh)
  with_views = run()
  monkeypatch.setattr(cpu_weights, "bit_views", lambda p: p)
  without = run()
  assert with_views.token_ids == without.token_ids
  for a, b in zip(with_views.scores, without.scores):
    np.testing.assert_array_equal(a, b)
  assert len(set(with_views.token_ids[0])) > 1  # not a degenerate constant answer


def test_compiled_prefill_holds_no_float32_copy_of_the_stack():
  cfg = config(TextConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256))
  shapes, _ = abstract_params(cfg)
  flat = traverse_util.flatten_dict(shapes)
  stack_bytes = sum(x.size * 2 for p, x in flat.items() if "layers" in p and "language_model" in p)
  as_bits = traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(x.shape, jnp.uint16)
                                          if "layers" in p and x.dtype == jnp.bfloat16 else x for p, x in flat.items()})
  b, t = 1, 64
  s = jax.ShapeDtypeStruct
  rest = (s((b, t), jnp.int32), s((b, t), jnp.int32), s((1, 16, 16, 3), jnp.float32), s((1,), jnp.bool_),
          s((b,), jnp.bool_), s((b,), jnp.uint32), s((b,), jnp.uint32), s((b,), jnp.float32), s((b,), jnp.float32),
          s((b,), jnp.int32), s((4,), jnp.int32), 0)
  temps = {name: gen._prefill.lower(p, *rest, config=cfg, max_new=8, output_scores=False).compile()
           .memory_analysis().temp_size_in_bytes for name, p in (("bf16", shapes), ("bits", as_bits))}
  print(f"decoder stack {stack_bytes / 2**20:.1f} MiB bf16; prefill temporaries: bf16 stack "
        f"{temps['bf16'] / 2**20:.1f} MiB, uint16 views {temps['bits'] / 2**20:.1f} MiB")
  assert temps["bits"] < 0.5 * stack_bytes
