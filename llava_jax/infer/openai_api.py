"""The OpenAI chat-completions protocol: validate a request body into a generation request, and build the
response / stream-chunk / error bodies in OpenAI's shapes. No HTTP here (see server.py).

Accepted: `messages` with roles system / developer (first only), user and assistant; content a string or a
list of parts `{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url"}}` (user turns only).
Image URLs are `data:image/...;base64,...`; http(s) URLs and local paths (`file://` or plain) only when the
server enables them. Each image goes where LLaVA puts it: `<image>\\n` at the front of its message.
Parameters: temperature [0, 2], top_p [0, 1], top_k ≥ 0 (extension), max_tokens / max_completion_tokens,
stop (a string or up to 4), seed, stream, stream_options.include_usage, n (1 only); `model` must be the
served model's id when given (else 404 `model_not_found`, as OpenAI answers). Unknown fields are ignored, as
OpenAI-compatible servers commonly do. Every problem raises `APIError` (4xx, OpenAI's error body).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import math
import os
import secrets
import urllib.parse
import urllib.request
from typing import Any, List, Optional, Tuple

import numpy as np

from llava_jax.data import conversation as conv_lib
from llava_jax.limits import MAX_IMAGE_PIXELS
from llava_jax.data.errors import SampleError
from llava_jax.infer.engine import Request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
MAX_CHARS_PER_TOKEN = 32  # messages longer than this many characters per prompt token are refused untokenized


class APIError(Exception):
  """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Limits:
  """What one request may ask for. max_prompt_tokens None = the model's context minus one answer token."""
  max_request_bytes: int = 20 * 1024 * 1024
  max_image_pixels: int = MAX_IMAGE_PIXELS
  max_images: int = 4
  max_messages: int = 256
  max_prompt_tokens: Optional[int] = None
  max_output_tokens: int = 1024
  default_max_tokens: int = 512
  default_temperature: float = 0.2
  default_top_p: float = 1.0
  allow_remote_images: bool = False
  local_image_root: Optional[str] = None
  remote_timeout_s: float = 10.0


@dataclasses.dataclass
class ChatRequest:
  """A validated request: what the engine runs, plus how to answer."""
  request: Request
  stream: bool
  include_usage: bool
  prompt_tokens: int


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400) -> APIError:
  return APIError(status, message, param=param, code=code)


# ------------------------------------------------------------------------------------------------ params

def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
  value = body.get(name)
  if value is None:
    return float(default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise bad(f"{name} must be a number, got {value!r}", name)
  if not lo <= value <= hi:
    raise bad(f"{name} must be between {lo} and {hi}, got {value}", name)
  return float(value)


def _integer(body: dict, name: str) -> Optional[int]:
  value = body.get(name)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad(f"{name} must be an integer, got {value!r}", name)
  return value


def _stops(value) -> Tuple[str, ...]:
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s
                                                                          for s in stops):
    raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
  return tuple(stops)


# ------------------------------------------------------------------------------------------------ images

def image_bytes(url: Any, limits: Limits, where: str) -> bytes:
  """The encoded bytes an image_url names (data: URI; http(s) / local paths only when enabled)."""
  if not isinstance(url, str) or not url:
    raise bad(f"{where}: image_url.url must be a non-empty string", "messages")
  if url[:5].lower() == "data:":
    header, sep, data = url[5:].partition(",")
    if not sep:
      raise bad(f"{where}: malformed data URI (no ',')", "messages")
    fields = [f.strip().lower() for f in header.split(";")]
    if "base64" not in fields[1:]:
      raise bad(f"{where}: data URIs must be base64 encoded (data:image/png;base64,...)", "messages")
    if fields[0] and not fields[0].startswith("image/") and fields[0] != "application/octet-stream":
      raise bad(f"{where}: data URI media type {fields[0]!r} is not an image", "messages")
    try:
      return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
      raise bad(f"{where}: the data URI is not valid base64 ({e})", "messages") from None
  try:
    parsed = urllib.parse.urlparse(url)
  except ValueError as e:  # e.g. "Invalid IPv6 URL"
    raise bad(f"{where}: malformed image URL ({e})", "messages") from None
  scheme = parsed.scheme.lower()
  if scheme in ("http", "https"):
    if not limits.allow_remote_images:
      raise bad(f"{where}: remote image URLs are disabled on this server; send the image as a data: URI "
                "(or start the server with --allow_remote_images)", "messages", "remote_images_disabled")
    return _fetch(url, limits, where)
  if scheme in ("file", ""):
    if not limits.local_image_root:
      raise bad(f"{where}: local image paths are disabled on this server; send the image as a data: URI "
                "(or start the server with --local_image_root=DIR)", "messages", "local_images_disabled")
    return _read_local(urllib.parse.unquote(parsed.path) if scheme == "file" else url, limits, where)
  raise bad(f"{where}: unsupported image URL scheme {scheme!r} (use a data: URI)", "messages")


def _fetch(url: str, limits: Limits, where: str) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as resp:  # redirects stay http(s)
      data = resp.read(limits.max_request_bytes + 1)
  except Exception as e:  # URLError, HTTPError, timeouts, bad hosts
    raise bad(f"{where}: cannot fetch {url}: {type(e).__name__}: {e}", "messages") from None
  if len(data) > limits.max_request_bytes:
    raise bad(f"{where}: the image at {url} is larger than {limits.max_request_bytes} bytes", "messages")
  return data


def _read_local(path: str, limits: Limits, where: str) -> bytes:
  """A file under limits.local_image_root; every path that names no readable file there is a 400."""
  if not path or "\x00" in path:  # os functions raise ValueError on a NUL byte
    raise bad(f"{where}: an image path must be non-empty and hold no NUL byte", "messages", "invalid_image_path")
  root = os.path.realpath(limits.local_image_root)
  try:
    real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root here
  except (OSError, ValueError) as e:
    raise bad(f"{where}: bad image path {path!r} ({e})", "messages", "invalid_image_path") from None
  if os.path.commonpath([root, real]) != root:
    raise bad(f"{where}: {path} is outside the server's --local_image_root", "messages", "invalid_image_path")
  if not os.path.isfile(real):  # missing, a directory, or a device / FIFO that could block the read
    raise bad(f"{where}: {path} is not a file under the server's --local_image_root", "messages",
              "invalid_image_path")
  try:
    with open(real, "rb") as f:
      data = f.read(limits.max_request_bytes + 1)
  except (OSError, ValueError) as e:  # not readable, gone meanwhile
    raise bad(f"{where}: cannot read {path}: {getattr(e, 'strerror', None) or e}", "messages",
              "invalid_image_path") from None
  if len(data) > limits.max_request_bytes:
    raise bad(f"{where}: {path} is larger than {limits.max_request_bytes} bytes", "messages")
  return data


# ------------------------------------------------------------------------------------------------ messages

def _message_text(content, where: str, role: str) -> Tuple[str, List[Any]]:
  """content → (text with one `<image>` per image part, [image urls])."""
  if isinstance(content, str):
    pieces, urls = [content], []
  elif isinstance(content, list):
    pieces, urls = [], []
    for j, part in enumerate(content):
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text":
        if not isinstance(part.get("text"), str):
          raise bad(f"{where}.content[{j}].text must be a string", "messages")
        pieces.append(part["text"])
      elif kind == "image_url":
        if role != "user":
          raise bad(f"{where}: only user messages may hold images", "messages")
        image = part.get("image_url")
        urls.append(image.get("url") if isinstance(image, dict) else image)
        pieces.append(conv_lib.IMAGE_TOKEN)
      else:
        raise bad(f"{where}.content[{j}] must be a text or image_url part, got type {kind!r}", "messages")
  else:
    raise bad(f"{where}.content must be a string or a list of parts", "messages")
  for piece in pieces:
    if piece != conv_lib.IMAGE_TOKEN and conv_lib.IMAGE_TOKEN in piece:
      raise bad(f"{where}: message text cannot contain {conv_lib.IMAGE_TOKEN}; send images as image_url parts",
                "messages")
  return "\n".join(pieces), urls


def conversation(messages: Any, limits: Limits) -> Tuple[List[dict], List[Any]]:
  """OpenAI messages → (LLaVA turns, image urls in placeholder order)."""
  if not isinstance(messages, list) or not messages:
    raise bad("messages must be a non-empty list", "messages")
  if len(messages) > limits.max_messages:
    raise bad(f"at most {limits.max_messages} messages per request, got {len(messages)}", "messages")
  turns, urls = [], []
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise bad(f"{where} must be an object with role and content", "messages")
    role = ROLES.get(message.get("role"))
    if role is None:
      raise bad(f"{where}.role must be one of {sorted(ROLES)}, got {message.get('role')!r}", "messages")
    text, image_urls = _message_text(message.get("content"), where, role)
    turns.append({"from": role, "value": text})
    urls += image_urls
  if len(urls) > limits.max_images:
    raise bad(f"at most {limits.max_images} image(s) per request, got {len(urls)}", "messages")
  return turns, urls


# ------------------------------------------------------------------------------------------------ request

def parse_chat_request(body: Any, model, limits: Limits, work_lock=None) -> ChatRequest:
  """A decoded JSON body → ChatRequest (prompt encoded, images decoded and preprocessed). Raises APIError.

  model: an `infer.loading.InferenceModel`. work_lock: held while images are decoded and the prompt is
  tokenized (a threading.Lock shared by the server's request threads; fetching remote images is outside it).
  """
  work_lock = work_lock if work_lock is not None else contextlib.nullcontext()
  if not isinstance(body, dict):
    raise bad("the request body must be a JSON object")
  requested = body.get("model")
  if requested is not None and not isinstance(requested, str):
    raise bad(f"model must be a string, got {requested!r}", "model")
  if requested is not None and requested != model.name:  # as OpenAI answers an unknown model (absent: this one)
    raise APIError(404, f"The model {requested!r} does not exist (this server serves {model.name!r})",
                   param="model", code="model_not_found")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise bad("stream must be a boolean", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
    raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
  n = _integer(body, "n")
  if n not in (None, 1):
    raise bad("only n=1 is supported", "n")
  temperature = _number(body, "temperature", limits.default_temperature, 0.0, 2.0)
  top_p = _number(body, "top_p", limits.default_top_p, 0.0, 1.0)
  top_k = _integer(body, "top_k") or 0
  if not 0 <= top_k <= model.config.text.vocab_size:
    raise bad(f"top_k must be between 0 and {model.config.text.vocab_size}", "top_k")
  seed = _integer(body, "seed")
  stops = _stops(body.get("stop"))
  max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _integer(body, max_name)
  if max_tokens is not None and not 1 <= max_tokens <= limits.max_output_tokens:
    raise bad(f"{max_name} must be between 1 and {limits.max_output_tokens}, got {max_tokens}", max_name)

  turns, urls = conversation(body.get("messages"), limits)
  context = model.max_positions
  max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
  chars = sum(len(t["value"]) for t in turns)
  if chars > MAX_CHARS_PER_TOKEN * max_prompt:  # surely too long: refuse before tokenizing
    raise bad(f"the messages hold {chars} characters, far above this server's prompt limit of {max_prompt} "
              "tokens", "messages", "context_length_exceeded")
  encoded = [image_bytes(url, limits, f"image {j}") for j, url in enumerate(urls)]
  with work_lock:  # decoding and tokenizing one request at a time bounds memory and shares the tokenizer
    pixels = []
    for j, data in enumerate(encoded):
      try:
        pixels.append(model.image_pixels(data, max_pixels=limits.max_image_pixels))
      except SampleError as e:
        raise bad(f"image {j}: {e}", "messages", "invalid_image") from None
    del encoded
    try:
      ids = model.encode(turns, num_images=len(urls))
    except SampleError as e:
      raise bad(str(e), "messages") from None

  if len(ids) > max_prompt:
    raise bad(f"the prompt is {len(ids)} tokens (images included), above this server's limit of {max_prompt}",
              "messages", "context_length_exceeded")
  if max_tokens is None:
    max_tokens = min(limits.default_max_tokens, limits.max_output_tokens, context - len(ids))
  elif len(ids) + max_tokens > context:
    raise bad(f"the prompt ({len(ids)} tokens) plus {max_name}={max_tokens} exceed the model's context of "
              f"{context} tokens", max_name, "context_length_exceeded")
  request = Request(input_ids=ids, pixel_values=np.stack(pixels) if pixels else None, max_tokens=int(max_tokens),
                    temperature=temperature, top_p=top_p, top_k=int(top_k),
                    seed=int(seed) % 2**32 if seed is not None else secrets.randbits(32), stop=stops)
  return ChatRequest(request=request, stream=stream, include_usage=bool(options.get("include_usage", False)),
                     prompt_tokens=int(len(ids)))


# ------------------------------------------------------------------------------------------------ bodies

def completion_body(cid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
  return {"id": cid, "object": "chat.completion", "created": created, "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": finish_reason}],
          "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, created: int, model: str, delta: dict, finish_reason: Optional[str] = None) -> dict:
  return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk_body(cid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
  return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
          "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}
