"""Weight-only int8 / int4 / nf4 inference (runtime.quantize, `--quantize`) on a TRAINED tiny LLaVA: logit drift
and greedy-token agreement against the float model, int8 tighter than 4-bit; then chat (the CLI with
--quantize), serve and generate actually running on quantized weights.

The tiny model is trained here for a few hundred optax steps on a deterministic task (each symbol followed by
its fixed successor), so its next-token distributions are peaked as a trained LM's are, not
the near-uniform ones of a random init where any perturbation flips the argmax.
"""
import functools
import os
import subprocess
import sys

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from llava_jax.config import QUANTIZE_MODES, LlavaConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.infer import generate as gen
from llava_jax.infer.loading import load_for_inference
from llava_jax.models import quant
from llava_jax.models.llava import LlavaModel, init_params
from llava_jax.recipes import with_quantize
from tests.infer import chat_fixtures as cf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SYMBOLS, IMAGE = 64, 48, 63  # tokens 3..50 carry the task; 63 is the image placeholder
VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                      patch_size=8)
TEXT = TextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SEQ, STEPS = 24, 120


def config(quantize=None):
  return LlavaConfig(vision=VISION, text=TEXT, image_token_index=IMAGE, runtime=RuntimeOptions(quantize=quantize))


NEXT = 3 + np.random.RandomState(7).permutation(SYMBOLS)  # the successor of symbol 3 + i


def sequences(n, seed):
  """[n, SEQ] int32: BOS, two random symbols, then each symbol's fixed successor x[t] = NEXT[x[t-1] - 3]."""
  rs = np.random.RandomState(seed)
  x = np.zeros((n, SEQ), np.int32)
  x[:, 0] = 1
  x[:, 1:3] = 3 + rs.randint(0, SYMBOLS, (n, 2))
  for t in range(3, SEQ):
    x[:, t] = NEXT[x[:, t - 1] - 3]
  return x


@functools.lru_cache(maxsize=None)
def trained():
  """Float params after STEPS Adam steps on `sequences` (text-only batches), and the final training loss."""
  model = LlavaModel(config())
  params = init_params(config(), jax.random.key(0))
  opt = optax.adam(3e-3)
  state = opt.init(params)

  def loss_fn(p, ids):
    logits = model.apply({"params": p}, ids)[:, 2:-1]  # predict x[3:] (the first two symbols are random)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 3:]).mean()

  @jax.jit
  def step(p, s, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  for i in range(STEPS):
    params, state, loss = step(params, state, jnp.asarray(sequences(32, seed=i)))
  return jax.tree.map(np.asarray, params), float(loss)


@functools.lru_cache(maxsize=None)
def quantized(mode):
  return quant.quantize_params(jax.tree.map(np.copy, trained()[0]), mode)


HELD_OUT = sequences(16, seed=10_000)


@functools.lru_cache(maxsize=None)
def held_out_logits(mode):
  params = trained()[0] if mode is None else quantized(mode)
  return np.asarray(jax.jit(LlavaModel(config(mode)).apply)({"params": params}, jnp.asarray(HELD_OUT)))[:, 2:-1]


def generated(mode, pixels):
  """Greedy answers (16 tokens) to 8 held-out prompts, the first four after an image."""
  params = trained()[0] if mode is None else quantized(mode)
  k = config().num_image_tokens
  prompts = [([1] + [IMAGE] * k + list(row[1:5])) if i < 4 else list(row[:6])
             for i, row in enumerate(sequences(8, seed=20_000))]
  images = [pixels[i] if i < 4 else None for i in range(8)]
  out = gen.generate(config(mode), params, input_ids=prompts, pixel_values=images, max_new_tokens=16,
                     stop_token_ids=[VOCAB + 1])  # no stop: always 16 tokens
  return np.asarray(out.token_ids)


def drift(mode):
  fl, q = held_out_logits(None), held_out_logits(mode)
  max_abs = float(np.abs(q - fl).max())
  return dict(max_abs=max_abs, relative=max_abs / float(np.abs(fl).max()),
              rms_relative=float(np.sqrt(np.mean((q - fl) ** 2) / np.mean(fl ** 2))),
              argmax_agreement=float(np.mean(q.argmax(-1) == fl.argmax(-1))))


def test_the_tiny_model_is_trained():
  params, loss = trained()
  labels = HELD_OUT[:, 3:]
  assert loss < 0.02, loss
  assert np.mean(held_out_logits(None).argmax(-1) == labels) > 0.99


def test_logit_drift_and_greedy_agreement_vs_float(capsys):
  pixels = np.random.RandomState(1).randn(4, 16, 16, 3).astype(np.float32)
  want = generated(None, pixels)
  report = {}
  for mode in QUANTIZE_MODES:
    d = drift(mode)
    d["greedy_agreement"] = float(np.mean(generated(mode, pixels) == want))
    report[mode] = d
  with capsys.disabled():
    print("\nquantized vs float logits on the trained tiny model:")
    for mode, d in report.items():
      print(f"  {mode:5s} " + "  ".join(f"{k}={v:.4g}" for k, v in d.items()))
  i8, i4, n4 = report["int8"], report["int4"], report["nf4"]
  assert i8["relative"] < 0.01 and i8["rms_relative"] < 0.01
  assert i4["relative"] < 0.15 and n4["relative"] < 0.15
  assert i8["max_abs"] < 0.5 * min(i4["max_abs"], n4["max_abs"])  # int8 clearly tighter than 4-bit
  assert i8["rms_relative"] < 0.5 * min(i4["rms_relative"], n4["rms_relative"])
  assert i8["argmax_agreement"] == 1.0 and i8["greedy_agreement"] == 1.0
  for d in (i4, n4):
    assert d["argmax_agreement"] >= 0.97 and d["greedy_agreement"] >= 0.9
  assert all(d["max_abs"] > 0 for d in report.values())


def test_device_bytes_per_parameter_of_the_decoder_linears():
  """Measured on the placed arrays: int8 ≈ 1 byte (+ a float32 scale per output column), 4-bit ≈ 0.5 byte
  (+ a float32 scale per 64 weights), against 4 bytes for the float32 kernels."""
  flat_float = traverse_util.flatten_dict(trained()[0])
  n = sum(v.size for p, v in flat_float.items() if quant.is_quantized_path(p))
  for mode, per_param in (("int8", 1 + 4 / 128), ("int4", 0.5 + 4 / 64), ("nf4", 0.5 + 4 / 64)):
    placed = jax.device_put(quantized(mode))
    nbytes = sum(v.nbytes for p, v in traverse_util.flatten_dict(placed).items()
                 if p[-1] in (quant.KERNEL_Q, quant.KERNEL_SCALE))
    # in = 128 for every kernel but down_proj (in = 256: a smaller int8 scale share)
    assert nbytes / n <= per_param + 1e-9 and nbytes / n > (1.0 if mode == "int8" else 0.5)


# ---------------------------------------------------------------------------------------------------------
# the entry points with --quantize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
  return cf.write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tiny_tokenizer_dir)


def test_chat_cli_with_quantize_runs_the_quantized_model(checkpoint, tmp_path):
  image = cf.write_image(str(tmp_path / "red.png"), "red")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user's CPU run
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", "--mode=chat", "--config=configs/tiny.py",
                         f"--checkpoint={checkpoint}", f"--image={image}", "--temperature=0", "--max_new_tokens=8",
                         "--quantize=nf4"], cwd=ROOT, env=env, input="What is in the image?\n", capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = load_for_inference(with_quantize(cf.load_tiny_config(), "nf4"), checkpoint=checkpoint, mesh=None)
  kinds = {p[-1] for p in traverse_util.flatten_dict(model.params)}
  assert quant.KERNEL_Q in kinds and model.config.runtime.quantize == "nf4"
  prompt = model.encode([{"from": "human", "value": "<image>\nWhat is in the image?"}], num_images=1)
  out = gen.generate(model.config, model.params, input_ids=[prompt], pixel_values=[model.image_pixels(image)],
                     tokenizer=model.tokenizer, max_new_tokens=8, stop_token_ids=model.stop_token_ids,
                     stop_strings=model.stop_strings)
  assert out.texts[0].strip() and proc.stdout == out.texts[0].lstrip() + "\n"


def test_quantize_flag_is_only_for_inference_modes(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "llava_jax.main", "--mode=train", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}", "--quantize=int8"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0 and "--quantize is for --mode=eval|chat|serve" in proc.stderr
  with pytest.raises(ValueError, match="choose one of"):
    with_quantize(cf.load_tiny_config(), "int2")


def test_serve_answers_from_quantized_weights(checkpoint):
  from llava_jax.infer.openai_api import Limits
  from llava_jax.infer.server import ServerOptions, ServerThread
  model = load_for_inference(with_quantize(cf.load_tiny_config(), "int8"), checkpoint=checkpoint, mesh=None)
  assert model.params["language_model"]["layers"]["mlp"]["down_proj"][quant.KERNEL_Q].dtype == jnp.int8
  png = cf.image_png("red")
  body = {"model": model.name, "temperature": 0, "max_tokens": 6,
          "messages": [cf.user_message("What is in the image?", png)]}
  with ServerThread(model, ServerOptions(port=0, limits=Limits(), max_batch_size=1)) as srv:
    status, _, response = cf.post_json(srv.url, body)
  assert status == 200, response
  prompt = model.encode([{"from": "human", "value": "<image>\nWhat is in the image?"}], num_images=1)
  want = gen.generate(model.config, model.params, input_ids=[prompt], pixel_values=[model.image_pixels(png)],
                      tokenizer=model.tokenizer, max_new_tokens=6, stop_token_ids=model.stop_token_ids,
                      stop_strings=model.stop_strings)
  assert response["choices"][0]["message"]["content"] == want.texts[0].lstrip()
