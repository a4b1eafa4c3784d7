"""The OpenAI-compatible server on the tiny llava-hf checkpoint, over HTTP on 127.0.0.1.

Answers are checked against transformers' greedy `generate` on the prompt the original LLaVA renders (system
override and multi-turn included), the stream against the plain answer, concurrent requests against their own
oracles, and every bad input against a 4xx in OpenAI's error shape with the server still healthy after."""
import concurrent.futures
import functools
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from llava_jax.infer.loading import load_for_inference
from llava_jax.infer.openai_api import Limits
from llava_jax.infer.server import ServerOptions, ServerThread
from tests.fixtures import chat as cf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 12
LIMITS = dict(max_request_bytes=1 << 20, max_image_pixels=200_000, max_images=2, max_output_tokens=64,
              default_max_tokens=MAX_NEW)
Q = "What is in the image?"
NAME = "tiny-llava"  # the checkpoint directory's name: the served model id


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
  return cf.write_checkpoint(str(tmp_path_factory.mktemp(NAME) / NAME), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(checkpoint):
  return load_for_inference(cf.load_tiny_config(), checkpoint=checkpoint, mesh=None)


@pytest.fixture(scope="module")
def server(model):
  options = ServerOptions(port=0, limits=Limits(**LIMITS), max_batch_size=2, batch_window_s=0.3, steps_per_chunk=2)
  with ServerThread(model, options) as srv:
    yield srv


@functools.lru_cache(maxsize=None)
def png(kind):
  return cf.image_png(kind)


def oracle(tokenizer, rounds, image_kind, system=cf.SYSTEM_V1, max_new=MAX_NEW):
  """(answer text as served, prompt tokens, completion tokens, finish reason) from transformers."""
  prompt_ids, new = cf.hf_generate(tokenizer, cf.reference_prompt(rounds, system),
                                   png(image_kind) if image_kind else None, max_new)
  text = tokenizer.decode(new, skip_special_tokens=True).lstrip()
  return text, len(prompt_ids), len(new), "stop" if new[-1] == cf.EOS else "length"


def completion(body):
  return dict({"model": NAME, "temperature": 0, "max_tokens": MAX_NEW}, **body)


def answer_of(response):
  assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
  choice = response["choices"][0]
  assert choice["message"]["role"] == "assistant" and choice["index"] == 0
  return choice["message"]["content"], choice["finish_reason"], response["usage"]


def test_health_models_and_page(server):
  status, _, body = cf.call(server.url, "GET", "/health")
  health = json.loads(body)
  assert status == 200 and health["status"] == "ok" and health["model"] == NAME
  assert health["limits"]["max_output_tokens"] == 64 and health["limits"]["context_tokens"] == 512
  status, _, body = cf.call(server.url, "GET", "/v1/models")
  assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [NAME]
  assert cf.call(server.url, "GET", f"/v1/models/{NAME}")[0] == 200
  status, _, body = cf.call(server.url, "GET", "/v1/models/gpt-4")
  assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
  status, _, body = cf.call(server.url, "POST", "/v1/chat/completions", dict(completion(OK), model="gpt-4"))
  _assert_error(status, body, 404, "model", "model_not_found")
  status, headers, body = cf.call(server.url, "GET", "/")
  assert status == 200 and headers["content-type"].startswith("text/html")
  assert b'id="image-input"' in body and b'id="regenerate"' in body
  assert "connect-src 'self'" in headers["content-security-policy"]


def test_completion_equals_transformers(server, tiny_tokenizer):
  status, _, response = cf.post_json(server.url, completion({"messages": [cf.user_message(Q, png("red"))]}))
  assert status == 200, response
  text, finish, usage = answer_of(response)
  want, prompt_tokens, completion_tokens, want_finish = oracle(tiny_tokenizer, [("<image>\n" + Q, None)], "red")
  assert text == want and finish == want_finish
  assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens}


def test_system_message_multi_turn_and_part_order(server, tiny_tokenizer):
  """A system message replaces the template's; the image part after the text still goes to the front."""
  system = "You describe images for a blind user."
  first = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                       {"type": "image_url", "image_url": {"url": cf.data_uri(png("astronaut"))}}]}
  messages = [{"role": "system", "content": system}, first, {"role": "assistant", "content": "A person in a suit."},
              {"role": "user", "content": [{"type": "text", "text": "What color is the suit?"}]}]
  status, _, response = cf.post_json(server.url, completion({"messages": messages}))
  assert status == 200, response
  want = oracle(tiny_tokenizer, [("<image>\nWhat is this?", "A person in a suit."), ("What color is the suit?", None)],
                "astronaut", system=system)
  assert answer_of(response)[0] == want[0] and response["usage"]["prompt_tokens"] == want[1]


def test_stream_concatenates_to_the_plain_answer(server):
  body = completion({"messages": [cf.user_message(Q, png("astronaut"))]})
  status, _, plain = cf.post_json(server.url, body)
  assert status == 200
  text, finish, usage = answer_of(plain)
  status, headers, raw = cf.call(server.url, "POST", "/v1/chat/completions",
                                 dict(body, stream=True, stream_options={"include_usage": True}))
  assert status == 200 and headers["content-type"].startswith("text/event-stream")
  data = cf.sse_data(raw)
  assert data[-1] == "[DONE]"
  chunks = [json.loads(d) for d in data[:-1]]
  assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
  assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
  pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
  assert len(pieces) >= 2 and all(pieces)  # streamed in several pieces
  assert "".join(pieces) == text
  assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_stop_strings_and_seeded_sampling(server, tiny_tokenizer):
  want = oracle(tiny_tokenizer, [("<image>\n" + Q, None)], "red")[0]
  stop = want[len(want) // 2:len(want) // 2 + 2]
  assert len(want) > 6 and stop.strip()
  status, _, response = cf.post_json(server.url, completion({"messages": [cf.user_message(Q, png("red"))],
                                                             "stop": ["@@", stop]}))
  text, finish, _ = answer_of(response)
  assert status == 200 and text == want[:want.find(stop)] and finish == "stop"
  sampled = []
  for seed in (11, 11, 12, 13):
    status, _, response = cf.post_json(server.url, completion({"messages": [cf.user_message(Q, png("red"))],
                                                               "temperature": 1.0, "top_p": 0.9, "seed": seed}))
    assert status == 200
    sampled.append(answer_of(response)[0])
  assert sampled[0] == sampled[1] and len(set(sampled)) > 1  # reproducible per seed, and actually sampled


def test_concurrent_requests_are_batched_and_all_complete(server, tiny_tokenizer):
  engine = server.server.config.app.state.engine
  before = len(engine.batch_sizes)
  cases = [("Describe the picture.", "astronaut", MAX_NEW), ("Is it day or night?", "coffee", 4),
           ("What shape is it?", "red", 7), ("Describe the picture.", "coffee", MAX_NEW)]

  def ask(case):
    q, kind, max_tokens = case
    return cf.post_json(server.url, completion({"messages": [cf.user_message(q, png(kind))], "max_tokens": max_tokens}),
                        timeout=180)

  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    results = list(pool.map(ask, cases))
  for (q, kind, max_tokens), (status, _, response) in zip(cases, results):
    assert status == 200, response
    want_text, _, want_tokens, want_finish = oracle(tiny_tokenizer, [("<image>\n" + q, None)], kind, max_new=max_tokens)
    text, finish, usage = answer_of(response)
    assert (text, finish, usage["completion_tokens"]) == (want_text, want_finish, want_tokens), q
  sizes = engine.batch_sizes[before:]
  assert sum(sizes) == len(cases) and max(sizes) == 2  # batched, at most max_batch_size, the rest queued


# ------------------------------------------------------------------------------------------ bad input

def _image_message(url):
  return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "Hi"}]}]}


def _big_png():
  from PIL import Image
  import io
  buf = io.BytesIO()
  Image.new("RGB", (600, 400)).save(buf, "PNG")  # 240,000 pixels > max_image_pixels (a few KB of PNG)
  return buf.getvalue()


def _messages(*messages):
  return {"messages": list(messages)}


OK = _messages({"role": "user", "content": "Hi"})
BAD_JSON_BODIES = {
    "malformed json": (b'{"messages": [', 400, "invalid_json"),
    "not utf-8": (b'\xff\xfe{"messages"', 400, "invalid_json"),
    "json array": (b"[1, 2]", 400, None),
    "deeply nested": (b"[" * 100000 + b"]" * 100000, 400, "invalid_json"),
}
BAD_BODIES = {
    "bad base64": (_image_message("data:image/png;base64,@@@not base64@@@"), "messages", None),
    "not base64 encoded": (_image_message("data:image/png,rawbytes"), "messages", None),
    "not an image": (_image_message(cf.data_uri(b"hello, I am not a picture")), "messages", "invalid_image"),
    "truncated png": (_image_message(cf.data_uri(cf.image_png("astronaut")[:80])), "messages", "invalid_image"),
    "text media type": (_image_message("data:text/html;base64,PGgxPg=="), "messages", None),
    "too many pixels": (_image_message(cf.data_uri(_big_png())), "messages", "invalid_image"),
    "remote url": (_image_message("http://127.0.0.1:9/x.png"), "messages", "remote_images_disabled"),
    "local path": (_image_message("/etc/hostname"), "messages", "local_images_disabled"),
    "file url": (_image_message("file:///etc/hostname"), "messages", "local_images_disabled"),
    "other scheme": (_image_message("ftp://127.0.0.1/x.png"), "messages", None),
    "too many images": (_messages({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": cf.data_uri(cf.image_png("red"))}}] * 3}), "messages", None),
    "temperature too high": (dict(OK, temperature=2.5), "temperature", None),
    "temperature not a number": (dict(OK, temperature="hot"), "temperature", None),
    "temperature nan": (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "temperature", None),
    "top_p above 1": (dict(OK, top_p=1.5), "top_p", None),
    "top_k negative": (dict(OK, top_k=-1), "top_k", None),
    "max_tokens zero": (dict(OK, max_tokens=0), "max_tokens", None),
    "max_tokens above the limit": (dict(OK, max_tokens=65), "max_tokens", None),
    "max_tokens boolean": (dict(OK, max_tokens=True), "max_tokens", None),
    "max_completion_tokens float": (dict(OK, max_completion_tokens=3.5), "max_completion_tokens", None),
    "n of 2": (dict(OK, n=2), "n", None),
    "five stops": (dict(OK, stop=["a", "b", "c", "d", "e"]), "stop", None),
    "empty stop": (dict(OK, stop=""), "stop", None),
    "stream not boolean": (dict(OK, stream="yes"), "stream", None),
    "seed not an integer": (dict(OK, seed="x"), "seed", None),
    "no messages": (_messages(), "messages", None),
    "messages not a list": ({"messages": "Hi"}, "messages", None),
    "unknown role": (_messages({"role": "robot", "content": "Hi"}), "messages", None),
    "content not text": (_messages({"role": "user", "content": 42}), "messages", None),
    "unknown part": (_messages({"role": "user", "content": [{"type": "audio", "audio": "x"}]}), "messages", None),
    "assistant image": (_messages({"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": cf.data_uri(cf.image_png("red"))}}]},
        {"role": "user", "content": "and?"}), "messages", None),
    "literal image tag": (_messages({"role": "user", "content": "what is <image> here"}), "messages", None),
    "ends with assistant": (_messages({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}),
                            "messages", None),
    "empty message": (_messages({"role": "user", "content": " "}), "messages", None),
    "system not first": (_messages({"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                                   {"role": "user", "content": "Hi"}), "messages", None),
}


def _assert_error(status, body, want_status, param=None, code=None):
  assert status == want_status, body
  error = json.loads(body)["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  if param is not None:
    assert error["param"] == param, error
  if code is not None:
    assert error["code"] == code, error


def _healthy(server):
  status, _, body = cf.call(server.url, "GET", "/health", timeout=30)
  assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("name", sorted(BAD_JSON_BODIES))
def test_malformed_json_is_400(server, name):
  raw, want_status, code = BAD_JSON_BODIES[name]
  status, _, body = cf.call(server.url, "POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
  _assert_error(status, body, want_status, code=code)
  _healthy(server)


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_request_is_400(server, name):
  body, param, code = BAD_BODIES[name]
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
  _assert_error(status, raw, 400, param, code)
  _healthy(server)


def test_context_limits(server, model):
  """A prompt beyond the context, and max_tokens that do not fit after the prompt: 400 context_length_exceeded."""
  long_text = "the quick brown fox " * 200
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions", _messages({"role": "user", "content": long_text}))
  _assert_error(status, raw, 400, "messages", "context_length_exceeded")
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions",  # refused before tokenizing
                           _messages({"role": "user", "content": "x" * 600_000}))
  _assert_error(status, raw, 400, "messages", "context_length_exceeded")
  n = next(n for n in range(20, 2000, 5) if len(model.encode([{"from": "human", "value": "cat " * n}], 0)) > 460)
  body = dict(_messages({"role": "user", "content": "cat " * n}), max_tokens=64)
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions", body)
  _assert_error(status, raw, 400, "max_tokens", "context_length_exceeded")
  _healthy(server)


def test_http_level_errors(server):
  big = json.dumps(dict(OK, padding="x" * (1 << 20))).encode()
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions", big, {"Content-Type": "application/json"})
  _assert_error(status, raw, 413, code="request_too_large")

  def chunked():  # no Content-Length: the limit applies while reading
    for _ in range(40):
      yield b" " * 32768
  import http.client
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
  try:
    conn.request("POST", "/v1/chat/completions", body=chunked(), headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    _assert_error(resp.status, resp.read(), 413, code="request_too_large")
  finally:
    conn.close()
  status, _, raw = cf.call(server.url, "POST", "/v1/chat/completions", json.dumps(OK).encode(),
                           {"Content-Type": "text/plain"})
  _assert_error(status, raw, 415)
  status, _, raw = cf.call(server.url, "GET", "/v1/chat/completions")
  _assert_error(status, raw, 405)
  status, _, raw = cf.call(server.url, "GET", "/v2/nothing")
  _assert_error(status, raw, 404)
  status, _, raw = cf.call(server.url, "GET", "/health", headers={"Host": "attacker.example:80"})
  _assert_error(status, raw, 421, code="invalid_host")
  for host in ("localhost:1", "127.0.0.1", f"[::1]:{server.port}"):
    assert cf.call(server.url, "GET", "/health", headers={"Host": host})[0] == 200
  _healthy(server)
  status, _, response = cf.post_json(server.url, completion({"messages": [cf.user_message(Q, png("red"))]}))
  assert status == 200 and answer_of(response)[0]


# ------------------------------------------------------------------------------------------ image sources

class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def test_remote_and_local_images_when_enabled(model, tmp_path, tiny_tokenizer):
  root = tmp_path / "images"
  root.mkdir()
  (root / "red.png").write_bytes(png("red"))
  (tmp_path / "outside.png").write_bytes(png("red"))
  files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
  threading.Thread(target=files.serve_forever, daemon=True).start()
  options = ServerOptions(port=0, limits=Limits(**dict(LIMITS, allow_remote_images=True,
                                                       local_image_root=str(root))))
  want = oracle(tiny_tokenizer, [("<image>\n" + Q, None)], "red")[0]
  try:
    with ServerThread(model, options) as srv:
      for url in (f"http://127.0.0.1:{files.server_address[1]}/red.png", "red.png", f"file://{root}/red.png"):
        status, _, response = cf.post_json(srv.url, completion({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q}]}]}))
        assert status == 200 and answer_of(response)[0] == want, (url, response)
      for url in ("../outside.png", str(tmp_path / "outside.png"), f"http://127.0.0.1:{files.server_address[1]}/x.png"):
        status, _, raw = cf.call(srv.url, "POST", "/v1/chat/completions", completion(_image_message(url)))
        _assert_error(status, raw, 400, "messages")
      os.mkfifo(root / "fifo.png")  # opening it would block the request thread forever
      for url in ("red.png\x00.txt", "file://" + str(root) + "/red.png%00", "nothing.png", ".", "fifo.png",
                  "x" * 5000 + ".png", "file:///" + "../" * 40 + "etc/hostname", "http://[::1/x.png"):
        status, _, raw = cf.call(srv.url, "POST", "/v1/chat/completions", completion(_image_message(url)))
        _assert_error(status, raw, 400, "messages")
      _healthy(srv)
  finally:
    files.shutdown()
    files.server_close()


# ------------------------------------------------------------------------------------------ slow clients

class _Records(logging.Handler):
  """Collects the records of the server's loggers (uvicorn's do not propagate to the root logger)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


def _raw(port, data: bytes):
  sock = socket.create_connection(("127.0.0.1", port), timeout=60)
  sock.sendall(data)
  return sock


def _read_until_closed(sock) -> bytes:
  """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
  out = b""
  while True:
    piece = sock.recv(65536)
    if not piece:
      return out
    out += piece


def test_half_sent_requests_are_closed_without_tracebacks(model):
  """A head that never completes and a body that stalls are closed after read_timeout_s (the body with a 408);
  a client leaving mid-body is counted; the server's loggers record no traceback, and it keeps serving."""
  handler = _Records()
  loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "llava_jax")]
  for lg in loggers:
    lg.addHandler(handler)
  head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
          b"Content-Length: 100\r\n\r\n")
  try:
    with ServerThread(model, ServerOptions(port=0, limits=Limits(**LIMITS), read_timeout_s=1.0)) as srv:
      with _raw(srv.port, head[:40]) as sock:  # half a head, then nothing: closed, nothing answered
        assert _read_until_closed(sock) == b""
      with _raw(srv.port, head + b'{"messages": [') as sock:  # half a body, then nothing
        response = _read_until_closed(sock)
      status_line, _, rest = response.partition(b"\r\n")
      assert status_line == b"HTTP/1.1 408 Request Timeout" and b"connection: close" in rest.lower()
      error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
      assert error["code"] == "request_timeout" and "did not arrive within 1 s" in error["message"]
      app = srv.server.config.app
      with _raw(srv.port, head + b'{"messages": [') as sock:  # half a body, then the client leaves
        time.sleep(0.2)
      deadline = time.monotonic() + 60
      while app.state.client_disconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
      assert app.state.client_disconnects == 1
      _healthy(srv)
  finally:
    for lg in loggers:
      lg.removeHandler(handler)
  tracebacks = [r for r in handler.records if r.exc_info or "Traceback" in r.getMessage()]
  assert not tracebacks, [r.getMessage() for r in tracebacks]


# ------------------------------------------------------------------------------------------ precompiling

def test_precompiled_server_compiles_nothing_while_serving(model, tiny_tokenizer):
  """With precompile, start-up compiles one _prefill per shape `precompile.shapes` lists (so its buckets are
  generate's), and requests of shapes no request had before then compile nothing."""
  from llava_jax.infer import generate as gen
  from llava_jax.infer import precompile
  limits = Limits(**dict(LIMITS, max_images=1, max_output_tokens=16, max_prompt_tokens=127))
  options = ServerOptions(port=0, limits=limits, max_batch_size=1, precompile=True)
  gen._prefill.clear_cache()
  gen._decode.clear_cache()
  lines = []
  with ServerThread(model, options, progress=lines.append) as srv:
    shapes = precompile.shapes(model, limits, 1)
    assert gen.compile_counts()[0] == len(shapes) == len({s.key for s in shapes})
    assert lines[0].startswith(f"precompiling 1/{len(shapes)}: ") and lines[-1].startswith(f"precompiled {len(shapes)}")
    counts = gen.compile_counts()
    for q, kind, max_tokens in ((Q, "red", 16), ("Hi", None, 3), ("Describe the picture in detail.", "coffee", 9)):
      message = cf.user_message(q, png(kind) if kind else None)
      status, _, response = cf.post_json(srv.url, completion({"messages": [message], "max_tokens": max_tokens}))
      assert status == 200, response
      if kind == "red":
        assert answer_of(response)[0] == oracle(tiny_tokenizer, [("<image>\n" + q, None)], kind, max_new=16)[0]
    assert gen.compile_counts() == counts and srv.server.config.app.state.engine.compiles_off_path == 0


def test_a_new_shape_compiles_off_the_serving_path(model, monkeypatch):
  """While one request's new shape compiles (held here until released), a request of a compiled shape is
  answered; then the held one is, with the tokens generate gives it alone."""
  from llava_jax.infer import generate as gen
  from llava_jax.infer import precompile
  from llava_jax.infer.engine import Engine, Request
  entered, release = threading.Event(), threading.Event()
  real = precompile.compile_shape

  def held(m, shape):
    if shape.prompt_tokens > 100:
      entered.set()
      assert release.wait(300)
    real(m, shape)

  monkeypatch.setattr(precompile, "compile_shape", held)
  short = model.encode([{"from": "human", "value": "Hi"}], 0)
  long = model.encode([{"from": "human", "value": "Describe the picture in great detail, please. " * 6}], 0)
  assert len(short) <= 64 < 100 < len(long)

  def ask(engine, ids):
    deltas = []
    job = engine.submit(Request(input_ids=ids, max_tokens=5), deltas.append)
    return job, deltas

  engine = Engine(model, max_batch_size=1)
  try:
    job, _ = ask(engine, short)
    assert job.done.wait(300)
    long_job, long_deltas = ask(engine, long)
    assert entered.wait(300)  # the long prompt's shape is compiling
    job, deltas = ask(engine, short)
    assert job.done.wait(300) and deltas[-1].finish_reason is not None
    assert not long_job.done.is_set()  # still waiting for its compile, and it did not hold the short one up
    release.set()
    assert long_job.done.wait(300)
    want = gen.generate(model.config, model.params, [long], max_new_tokens=5, stop_token_ids=model.stop_token_ids)
    assert long_deltas[-1].completion_tokens == len(want.token_ids[0])
    assert "".join(d.text for d in long_deltas) == model.tokenizer.decode(
        want.token_ids[0], skip_special_tokens=True).strip()
    assert engine.compiles_off_path == 2 and engine.batch_sizes == [1, 1, 1]
  finally:
    release.set()
    engine.close()


def test_engine_batches_only_requests_that_fit_the_context(model):
  """A long prompt with few tokens and a short one with many arrive together: they would overflow the context as
  one batch (generate runs every row to the batch's largest max_tokens), so they run as two, both answered."""
  from llava_jax.infer.engine import Engine, Request
  n = next(n for n in range(50, 2000, 5) if len(model.encode([{"from": "human", "value": "cat " * n}], 0)) > 490)
  long = model.encode([{"from": "human", "value": "cat " * n}], 0)
  short = model.encode([{"from": "human", "value": "Hi"}], 0)
  assert len(long) + 30 > model.max_positions >= len(long) + 4
  engine = Engine(model, max_batch_size=2, batch_window_s=5.0)
  try:
    results = [[], []]
    jobs = [engine.submit(Request(input_ids=ids, max_tokens=k), results[i].append)
            for i, (ids, k) in enumerate(((long, 4), (short, 30)))]
    assert all(job.done.wait(300) for job in jobs)
    assert [r[-1].error for r in results] == [None, None] and engine.batch_sizes == [1, 1]
  finally:
    engine.close()


# ------------------------------------------------------------------------------------------ the CLI

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_cli_binds_loopback_and_stops_on_sigint(checkpoint):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "llava_jax.main", "--mode=serve", "--config=configs/tiny.py",
                           f"--checkpoint={checkpoint}", f"--port={port}", "--max_batch_size=1", "--max_images=1",
                           "--max_prompt_tokens=30", "--max_output_tokens=16", "--precompile"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300  # loading and precompiling 3 shapes on a shared CPU
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "the server did not come up in 300 s"
      try:
        if cf.call(f"http://127.0.0.1:{port}", "GET", "/health", timeout=5)[0] == 200:
          break
      except OSError:
        time.sleep(0.5)
    status, _, body = cf.call(f"http://127.0.0.1:{port}", "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == NAME
    assert _listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0 / ::
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "precompiling 1/" in out
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)


def _listening_addresses(port: int) -> set:
  """Local addresses of the sockets listening on `port`, from /proc/net/tcp{,6} (no traffic needed)."""
  import ipaddress
  out = set()
  for name, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
    if not os.path.exists(name):
      continue
    with open(name) as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:  # LISTEN
          raw = bytes.fromhex(address)
          raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
          out.add(str(ipaddress.ip_address(raw)))
  return out
