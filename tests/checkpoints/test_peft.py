"""LoRA against PEFT (checkpoints/peft.py, models/lora.py): an adapter PEFT made, imported onto our params, gives
PeftModel's logits (the oracle); our adapter exported in PEFT's format has PEFT's exact key names and
`PeftModel.from_pretrained` computes our logits with it; import ∘ export is exact; the merged export reloads in
transformers with the same logits; what our LoRA cannot compute is refused."""
import json
import os

import numpy as np
import pytest

import jax
from flax import traverse_util
from safetensors.numpy import load_file

from llava_jax import export_hf
from llava_jax.checkpoints import peft as peft_io
from llava_jax.config import LoraConfig
from llava_jax.models import lora as lora_lib
from tests import fixtures
from tests.fixtures import hf_checkpoints as H

peft = pytest.importorskip("peft")

SEED = 5
LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def peft_model(target_modules=LLM_TARGETS, **kw):
  """A fresh tiny transformers Llava (always the same weights) with a random PEFT adapter (B ≠ 0), eval mode."""
  import torch
  model = H.tiny_llava(seed=SEED)
  torch.manual_seed(11)
  cfg = peft.LoraConfig(**{**dict(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=target_modules,
                                  init_lora_weights=False), **kw})
  return peft.get_peft_model(model, cfg).eval()


def flat(tree):
  return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def base():
  model = H.tiny_llava(seed=SEED)
  config = fixtures.llava_config_from_hf_model(model, scan_layers=True)
  return config, fixtures.llava_params_from_hf_model(model, config)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
  pm = peft_model()
  d = str(tmp_path_factory.mktemp("peft"))
  pm.save_pretrained(d)
  ids, mask, pixels = H.inputs((fixtures.TINY_VISION["image_size"] // fixtures.TINY_VISION["patch_size"]) ** 2)
  return d, H.reference_logits(pm, ids, mask, pixels)


def test_imported_peft_adapter_gives_peft_logits(base, peft_dir):
  config, params = base
  d, ref = peft_dir
  lconfig, lparams = peft_io.import_peft_adapter(d, config, params)
  assert lconfig.runtime.lora.rank == 4 and lconfig.runtime.lora.scale == 3.0
  assert lconfig.runtime.lora.dropout == pytest.approx(0.1)
  ids, mask, pixels = H.inputs(config.num_image_tokens)
  H.assert_logits_close(H.our_logits(lconfig, lparams, ids, mask, pixels), ref, mask)
  plain = H.our_logits(config, params, ids, mask, pixels)
  assert np.abs(plain - ref)[mask.astype(bool)].max() > 1e-2  # the adapter changes the logits
  # unscanned layout, same adapter
  uconfig = fixtures.llava_config_from_hf_model(H.tiny_llava(seed=SEED), scan_layers=False)
  uconfig_l, uparams = peft_io.import_peft_adapter(d, uconfig, fixtures.llava_params_from_hf_model(
      H.tiny_llava(seed=SEED), uconfig))
  H.assert_logits_close(H.our_logits(uconfig_l, uparams, ids, mask, pixels), ref, mask)


def test_export_has_peft_key_names_and_round_trips(base, peft_dir, tmp_path):
  config, params = base
  d, _ = peft_dir
  lconfig, lparams = peft_io.import_peft_adapter(d, config, params)
  out = peft_io.export_peft_adapter(lconfig, lparams, str(tmp_path / "ours"))
  theirs, ours = load_file(os.path.join(d, "adapter_model.safetensors")), load_file(os.path.join(out, "adapter_model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  cfg = peft.LoraConfig.from_pretrained(out)
  assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora, cfg.use_rslora) == (4, 12, 0.1, False, False)
  again_config, again = peft_io.import_peft_adapter(out, config, lora_lib.strip_lora(lparams))
  assert again_config.runtime.lora.rank == lconfig.runtime.lora.rank
  a, b = flat(again), flat(lparams)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_our_adapter_loads_into_peft_with_our_logits(base, tmp_path):
  import torch
  import transformers
  config, params = base
  lora = LoraConfig(rank=3, alpha=5.0, dropout=0.05, target=r".*/(q_proj|v_proj|down_proj)")
  lconfig = config.with_runtime(lora=lora)
  rs = np.random.RandomState(2)
  from llava_jax.models.llava import init_params
  fresh = flat(init_params(lconfig, jax.random.key(0)))
  lparams = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **{
      tuple(k.split("/")): rs.randn(*v.shape).astype(np.float32) * 0.2 for k, v in fresh.items() if "lora" in k}})
  out = peft_io.export_peft_adapter(lconfig, lparams, str(tmp_path / "adapter"))
  loaded = peft.PeftModel.from_pretrained(H.tiny_llava(seed=SEED), out).eval()
  n_adapted = sum(1 for name, _ in loaded.named_modules() if name.endswith(("q_proj", "v_proj", "down_proj"))
                  and hasattr(_, "lora_A"))
  assert n_adapted == 3 * config.text.num_hidden_layers  # the LLM's only, not CLIP's q/v projections
  ids, mask, pixels = H.inputs(config.num_image_tokens)
  ours = H.our_logits(lconfig, lparams, ids, mask, pixels)
  H.assert_logits_close(ours, H.reference_logits(loaded, ids, mask, pixels), mask)
  # merged export: a plain llava-hf model computing the same function
  merged_dir = export_hf(lconfig, lparams, str(tmp_path / "merged"))
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
  H.assert_logits_close(H.reference_logits(reloaded, ids, mask, pixels), ours, mask)
  assert not any("lora" in k for k in reloaded.state_dict())
  with torch.no_grad():
    merged = loaded.merge_and_unload()
  H.assert_logits_close(H.reference_logits(merged, ids, mask, pixels), ours, mask)


def test_partial_layers_adapter_fills_zeros(base, tmp_path):
  config, params = base
  pm = peft_model(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers",
                  exclude_modules=r".*vision_tower.*")
  pm.save_pretrained(str(tmp_path / "p"))
  keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
  assert len(keys) == 4 and all(".layers.1." in k and "language_model" in k for k in keys), sorted(keys)
  lconfig, lparams = peft_io.import_peft_adapter(str(tmp_path / "p"), config, params)
  ids, mask, pixels = H.inputs(config.num_image_tokens)
  H.assert_logits_close(H.our_logits(lconfig, lparams, ids, mask, pixels), H.reference_logits(pm, ids, mask, pixels),
                        mask)
  a = flat(lparams)["language_model/layers/self_attn/q_proj/lora_a"]
  assert not np.any(a[0]) and np.any(a[1])


def test_what_our_lora_cannot_compute_is_refused(base, peft_dir, tmp_path):
  config, params = base
  d, _ = peft_dir
  for change, match in ((dict(use_dora=True), "use_dora"), (dict(use_rslora=True), "use_rslora"),
                        (dict(bias="all"), "bias"), (dict(rank_pattern={"q_proj": 8}), "rank_pattern")):
    bad = tmp_path / f"bad_{match}"
    bad.mkdir()
    cfg = {**json.load(open(os.path.join(d, "adapter_config.json"))), **change}
    json.dump(cfg, open(bad / "adapter_config.json", "w"))
    os.symlink(os.path.join(d, "adapter_model.safetensors"), bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=match):
      peft_io.import_peft_adapter(str(bad), config, params)
  # a plain list of names also adapts CLIP's q/k/v projections: not something our model has
  vision = tmp_path / "vision"
  peft_model(target_modules=["q_proj", "k_proj"]).save_pretrained(str(vision))
  with pytest.raises(ValueError, match="language model"):
    peft_io.import_peft_adapter(str(vision), config, params)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft_io.import_peft_adapter(str(tmp_path), config, params)
  with pytest.raises(ValueError, match="no LoRA adapter"):
    peft_io.export_peft_adapter(config.with_runtime(lora=LoraConfig(rank=2)), params, str(tmp_path / "x"))


def test_modules_to_save_round_trip_with_peft(base, tmp_path):
  """modules_to_save=['lm_head', 'embed_tokens'] (fully trained next to the adapters): PEFT's adapter imports
  onto our params with PEFT's logits, and ours, exported, loads into PeftModel with ours; keys as PEFT writes them."""
  import torch
  config, params = base
  pm = peft_model(modules_to_save=["lm_head", "embed_tokens"])
  with torch.no_grad():  # trained copies that differ from the base model's
    torch.manual_seed(3)
    for name, module in pm.named_modules():
      if name.endswith("modules_to_save.default"):
        module.weight.add_(torch.randn_like(module.weight) * 0.1)
  pm.save_pretrained(str(tmp_path / "theirs"))
  theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
  assert set(peft_io.PEFT_SAVED_KEYS.values()) <= set(theirs)
  lconfig, lparams = peft_io.import_peft_adapter(str(tmp_path / "theirs"), config, params)
  assert lconfig.runtime.lora.modules_to_save == ("lm_head", "embed_tokens")
  ids, mask, pixels = H.inputs(config.num_image_tokens)
  ref = H.reference_logits(pm, ids, mask, pixels)
  H.assert_logits_close(H.our_logits(lconfig, lparams, ids, mask, pixels), ref, mask)
  out = peft_io.export_peft_adapter(lconfig, lparams, str(tmp_path / "ours"))
  ours = load_file(os.path.join(out, "adapter_model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  loaded = peft.PeftModel.from_pretrained(H.tiny_llava(seed=SEED), out).eval()
  H.assert_logits_close(H.reference_logits(loaded, ids, mask, pixels), ref, mask)
  # declared but missing, and modules we cannot train, are refused
  bad = tmp_path / "bad"
  bad.mkdir()
  cfg = json.load(open(os.path.join(out, "adapter_config.json")))
  json.dump({**cfg, "modules_to_save": ["lm_head", "embed_tokens", "multi_modal_projector"]}, open(bad / "adapter_config.json", "w"))
  os.symlink(os.path.join(out, "adapter_model.safetensors"), bad / "adapter_model.safetensors")
  with pytest.raises(ValueError, match="modules_to_save"):
    peft_io.import_peft_adapter(str(bad), config, params)
  json.dump({**cfg, "modules_to_save": None}, open(bad / "adapter_config.json", "w"))
  with pytest.raises(ValueError, match="modules_to_save"):
    peft_io.import_peft_adapter(str(bad), config, params)
