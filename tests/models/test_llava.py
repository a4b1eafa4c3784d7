"""Full LLaVA logits against transformers' LlavaForConditionalGeneration on the same (tiny, random) weights."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from llava_jax.models.llava import LlavaModel
from tests import fixtures

TOL = 1e-4


def _ids_with_images(num_image_tokens, image_token, rows, length):
  """rows: list of lists of 'img' / int tokens; right-padded with 0 to `length`. Returns ids, mask."""
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for r, row in enumerate(rows):
    flat = []
    for tok in row:
      flat += [image_token] * num_image_tokens if tok == "img" else [tok]
    ids[r, :len(flat)] = flat
    mask[r, :len(flat)] = 1
  return ids, mask


def _pixels(n, size, seed=0):
  return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def _compare(model, config, ids, mask, pixels_nchw, tol=TOL):
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=None if pixels_nchw is None else torch.from_numpy(pixels_nchw)).logits.numpy()
  params = fixtures.llava_params_from_hf_model(model, config)
  pixels = None if pixels_nchw is None else jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))
  ours = np.asarray(LlavaModel(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), pixels,
                                             jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  diff = np.abs(ours - ref)[real].max()
  assert diff <= tol, f"max |logit diff| on real tokens {diff:.2e} > {tol}"
  return ours


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full"), ((-3, -1), "default")])
def test_logits_mlp2x_gelu(layer, strategy):
  model = fixtures.tiny_hf_llava(vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
                                 vision_feature_select_strategy=strategy)
  config = fixtures.llava_config_from_hf_model(model)
  k = config.num_image_tokens
  assert k == 16 + (strategy == "full")
  # row 0: image in the middle; row 1: text only and right-padded; row 2: two images, image last
  ids, mask = _ids_with_images(k, config.image_token_index,
                               [[1, 5, "img", 7, 8, 9], [1, 10, 11, 12], [1, "img", 3, 4, "img"]], 2 * k + 8)
  _compare(model, config, ids, mask, _pixels(3, 28))


def test_logits_linear_projector_and_second_geometry():
  model = fixtures.tiny_hf_llava(seed=1, vision=dict(image_size=56, patch_size=14), projector_hidden_act="linear")
  fixtures.make_linear_projector(model)
  config = fixtures.llava_config_from_hf_model(model, projector_type="linear")
  assert "linear_2" not in fixtures.llava_params_from_hf_model(model, config)["multi_modal_projector"]
  ids, mask = _ids_with_images(config.num_image_tokens, config.image_token_index, [[1, "img", 20, 21]], 24)
  _compare(model, config, ids, mask, _pixels(1, 56, seed=2))


def test_padding_changes_no_real_position():
  model = fixtures.tiny_hf_llava(seed=2)
  config = fixtures.llava_config_from_hf_model(model)
  k = config.num_image_tokens
  rows = [[1, 5, "img", 7, 8, 9]]
  ids, mask = _ids_with_images(k, config.image_token_index, rows, k + 5)
  ids_pad, mask_pad = _ids_with_images(k, config.image_token_index, rows, k + 13)
  px = _pixels(1, 28)
  alone = _compare(model, config, ids, mask, px)
  padded = _compare(model, config, ids_pad, mask_pad, px)
  np.testing.assert_allclose(padded[:, :k + 5], alone, atol=TOL)
  assert np.isfinite(padded).all()


def test_text_only_sequence():
  model = fixtures.tiny_hf_llava(seed=3)
  config = fixtures.llava_config_from_hf_model(model)
  ids, mask = _ids_with_images(0, 0, [[1, 4, 5, 6, 7], [1, 9, 9]], 6)
  _compare(model, config, ids, mask, None)


def test_unscanned_and_remat_match_reference():
  model = fixtures.tiny_hf_llava(seed=4)
  ids, mask = _ids_with_images(16, fixtures.TINY_IMAGE_TOKEN, [[1, "img", 30, 31]], 20)
  for runtime in (dict(scan_layers=False), dict(scan_layers=True, remat_policy="full")):
    config = fixtures.llava_config_from_hf_model(model, **runtime)
    _compare(model, config, ids, mask, _pixels(1, 28))


def test_bfloat16_close_to_float32():
  model = fixtures.tiny_hf_llava(seed=5)
  ids, mask = _ids_with_images(16, fixtures.TINY_IMAGE_TOKEN, [[1, "img", 30, 31, 40, 41]], 22)
  px = jnp.asarray(_pixels(1, 28).transpose(0, 2, 3, 1))
  c32 = fixtures.llava_config_from_hf_model(model)
  c16 = fixtures.llava_config_from_hf_model(model, dtype="bfloat16", param_dtype="bfloat16")
  p32 = fixtures.llava_params_from_hf_model(model, c32)
  p16 = fixtures.llava_params_from_hf_model(model, c16, dtype="bfloat16")
  assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
  l32 = np.asarray(LlavaModel(c32).apply({"params": p32}, jnp.asarray(ids, jnp.int32), px))
  l16 = LlavaModel(c16).apply({"params": p16}, jnp.asarray(ids, jnp.int32), px)
  assert l16.dtype == jnp.float32  # logits for the loss are float32
  rel = np.linalg.norm(np.asarray(l16) - l32) / np.linalg.norm(l32)
  assert rel <= 2e-2, rel


def test_placeholder_count_mismatch_is_a_clear_error():
  model = fixtures.tiny_hf_llava(seed=6)
  config = fixtures.llava_config_from_hf_model(model)
  params = fixtures.llava_params_from_hf_model(model, config)
  ids, _ = _ids_with_images(16, config.image_token_index, [[1, "img", 5]], 20)
  ids[0, 3] = 9  # one placeholder short
  with pytest.raises(ValueError, match="15 image placeholders"):
    LlavaModel(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.zeros((1, 28, 28, 3)))
  with pytest.raises(ValueError, match="2 image"):
    LlavaModel(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.zeros((2, 28, 28, 3)))


def test_padding_image_slots_are_ignored():
  """Fixed-shape batches carry unused image slots (image_valid False) after the real ones."""
  model = fixtures.tiny_hf_llava(seed=7)
  config = fixtures.llava_config_from_hf_model(model)
  params = fixtures.llava_params_from_hf_model(model, config)
  ids, mask = _ids_with_images(16, config.image_token_index, [[1, "img", 5, 6]], 20)
  px = jnp.asarray(_pixels(1, 28).transpose(0, 2, 3, 1))
  m = LlavaModel(config)
  one = m.apply({"params": params}, jnp.asarray(ids, jnp.int32), px)
  padded_px = jnp.concatenate([px, jnp.ones_like(px)], axis=0)
  two = m.apply({"params": params}, jnp.asarray(ids, jnp.int32), padded_px, image_valid=jnp.array([True, False]))
  np.testing.assert_allclose(np.asarray(two), np.asarray(one), atol=1e-6)
