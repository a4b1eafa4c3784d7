"""Shared by the chat, server and page tests: a tiny llava-hf checkpoint directory (random transformers weights +
the tiny tokenizer) that `--checkpoint` loads, and the reference's side of every comparison — the prompt as
the original LLaVA renders it (`Conversation.get_prompt`, vicuna_v1), its `tokenizer_image_token` (one copy, in
tests/fixtures.py), the CLIP pixels from transformers' image processor and the answer from transformers'
`generate`."""
import functools
import io
import os

import numpy as np

from tests import fixtures

VOCAB = 512  # the tiny tokenizer's, so generated ids decode to text
IMAGE_TOKEN = 511
EOS = 2
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")


BYTE_IDS = range(3, 259)  # the tiny SentencePiece model's <0x00>..<0xFF> pieces (checked in test_chat)
IMAGE_GAIN = 8.0


@functools.lru_cache(maxsize=None)
def hf_model():
  """The tiny random LLaVA, made a little more like a trained one: byte-fallback pieces get zero output
  weights (greedy answers are word pieces, readable in the page's screenshot) and the projector's output is
  amplified so that answers depend on the image."""
  import torch
  model = fixtures.tiny_hf_llava(seed=5, text=dict(vocab_size=VOCAB), image_token_index=IMAGE_TOKEN)
  with torch.no_grad():
    model.lm_head.weight[BYTE_IDS.start:BYTE_IDS.stop] = 0.0
    proj = model.model.multi_modal_projector
    proj.linear_2.weight.mul_(IMAGE_GAIN)
    proj.linear_2.bias.mul_(IMAGE_GAIN)
  return model


def write_checkpoint(out_dir: str, tokenizer_dir: str) -> str:
  """save_pretrained of the tiny model and tokenizer into `out_dir` (a llava-hf directory)."""
  from transformers import LlamaTokenizer
  if not os.path.exists(os.path.join(out_dir, "config.json")):
    hf_model().save_pretrained(out_dir)
    LlamaTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True).save_pretrained(out_dir)
  return out_dir


def image_png(kind: str) -> bytes:
  """A small PNG: 'red' (solid, 40x30), or a real photo shrunk ('astronaut' 64x64, 'coffee' 60x40)."""
  from PIL import Image
  if kind == "red":
    image = Image.fromarray(np.full((30, 40, 3), (220, 30, 30), np.uint8))
  else:
    image = Image.fromarray(fixtures.photo(kind)).resize({"astronaut": (64, 64), "coffee": (60, 40)}[kind])
  buf = io.BytesIO()
  image.save(buf, "PNG")
  return buf.getvalue()


def write_image(path: str, kind: str) -> str:
  with open(path, "wb") as f:
    f.write(image_png(kind))
  return path


def reference_prompt(rounds, system=SYSTEM_V1) -> str:
  """The original LLaVA's vicuna_v1 / llava_v1 prompt (SeparatorStyle.TWO): `system + " "`, then per message
  `role + ": " + message + sep` with seps (" ", "</s>") alternating, the open answer as `"ASSISTANT:"`.
  rounds: [(question, answer or None)]; the first question already holds `<image>\\n` when there is an image."""
  seps = (" ", "</s>")
  out = system + seps[0]
  messages = []
  for q, a in rounds:
    messages += [("USER", q), ("ASSISTANT", a)]
  for i, (role, message) in enumerate(messages):
    out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
  return out


def hf_pixels(image_path_or_bytes, size: int = 28):
  """transformers' CLIP image processor (PIL backend) → NCHW torch pixels [1, 3, S, S]."""
  from PIL import Image
  from transformers import CLIPImageProcessorPil
  src = image_path_or_bytes
  image = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src).convert("RGB")
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  return proc(images=[image], return_tensors="pt")["pixel_values"]


def hf_generate(tokenizer, prompt: str, image=None, max_new_tokens: int = 12):
  """transformers' greedy generate on the reference prompt → (prompt ids, new ids incl. a final EOS)."""
  import torch
  model = hf_model()
  k = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
  ids = torch.tensor([fixtures.tokenizer_image_token(tokenizer, prompt, IMAGE_TOKEN, k)])
  args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
              eos_token_id=EOS, max_new_tokens=max_new_tokens)
  if image is not None:
    args["pixel_values"] = hf_pixels(image, model.config.vision_config.image_size)
  with torch.no_grad():
    out = model.generate(**args)
  return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def hf_answer(tokenizer, prompt: str, image=None, max_new_tokens: int = 12) -> str:
  """transformers' greedy answer on the reference prompt, decoded (special tokens skipped)."""
  return tokenizer.decode(hf_generate(tokenizer, prompt, image, max_new_tokens)[1], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------
# HTTP (stdlib client, bounded timeouts, 127.0.0.1 only)

def load_tiny_config():
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(root, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def data_uri(png: bytes) -> str:
  import base64
  return "data:image/png;base64," + base64.b64encode(png).decode()


def user_message(text: str, png: bytes = None) -> dict:
  if png is None:
    return {"role": "user", "content": text}
  return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png)}},
                                      {"type": "text", "text": text}]}


def call(url: str, method: str, path: str, body=None, headers=None, timeout: float = 120.0):
  """→ (status, headers dict (lower-case names), body bytes). A dict/list body is sent as JSON."""
  import http.client
  import json
  import urllib.parse
  u = urllib.parse.urlparse(url)
  headers = dict(headers or {})
  if isinstance(body, (dict, list)):
    body = json.dumps(body).encode()
    headers.setdefault("Content-Type", "application/json")
  conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
  try:
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
  finally:
    conn.close()


def post_json(url: str, body, **kw):
  import json
  status, headers, data = call(url, "POST", "/v1/chat/completions", body, **kw)
  return status, headers, json.loads(data)


def sse_data(raw: bytes):
  """Server-sent events → the `data:` payloads in order (strings)."""
  events = raw.decode("utf-8").split("\n\n")
  assert events[-1] == "", "a stream ends with a blank line"
  out = []
  for event in events[:-1]:
    lines = event.split("\n")
    assert all(line.startswith("data: ") for line in lines), event
    out.append("\n".join(line[len("data: "):] for line in lines))
  return out
