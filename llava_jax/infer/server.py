"""`--mode=serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a chat page.

Routes:
  POST /v1/chat/completions   OpenAI chat completions, plain or `stream: true` (server-sent events ending with
                              `data: [DONE]`); see openai_api.py for what a request may hold
  GET  /v1/models             the served model;  GET /health: status, queue and limits
  GET  /                      the chat page (infer/static/index.html: upload, chat, controls, streaming)

Why FastAPI + uvicorn rather than the standard library: a production HTTP/1.1 parser (h11) with
keep-alive and timeouts, asyncio streaming that holds no thread per waiting client, and graceful shutdown;
http.server is documented as unfit for that. The model lives on one worker thread (engine.py) that batches
requests waiting together and serves them first in, first out.

Slow clients: a request head must arrive within `read_timeout_s` of connecting (or of the previous response),
and its body within `read_timeout_s` again (else 408); either way the connection is then closed. A client that
leaves mid-body is counted (`app.state.client_disconnects`), not logged as an error.

Safety by default: binds 127.0.0.1 (and then only answers Host headers naming the loopback, against DNS
rebinding); POSTs must be `Content-Type: application/json` (so a web page cannot send one without a CORS
preflight, which is never granted); bodies, images, prompt and output tokens are bounded (`Limits`);
remote image URLs and local paths are refused unless enabled. Every error is a JSON body in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from typing import Optional, Sequence

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from llava_jax.infer import precompile
from llava_jax.infer.engine import Delta, Engine, QueueFull
from llava_jax.infer.openai_api import (APIError, Limits, chunk_body, completion_body, parse_chat_request,
                                        usage_chunk_body)

logger = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclasses.dataclass
class ServerOptions:
  """host / port: where to listen (127.0.0.1 unless told otherwise). allowed_hosts: Host header names
  accepted (None: the loopback names when bound to a loopback address, else any). Engine: max_batch_size
  requests per batch, gathered for batch_window_s; max_queue waiting at most (then 503); steps_per_chunk
  decode steps between streamed pieces. read_timeout_s: a client's time to send a request head (from
  connecting, or from the previous response) and, again, its body; then the connection is closed (408 for a
  body). precompile: compile every shape the limits allow before listening (`precompile.py`, --precompile);
  without it each new shape compiles off the serving path as it first comes (engine.py)."""
  host: str = "127.0.0.1"
  port: int = 8000
  limits: Limits = dataclasses.field(default_factory=Limits)
  allowed_hosts: Optional[Sequence[str]] = None
  max_batch_size: int = 8
  batch_window_s: float = 0.01
  max_queue: int = 64
  steps_per_chunk: int = 4
  read_timeout_s: float = 30.0
  precompile: bool = False


def _is_loopback(host: str) -> bool:
  return host in LOOPBACK_NAMES or host.startswith("127.")


def _host_name(header: str) -> str:
  """'localhost:8000' → 'localhost', '[::1]:8000' → '::1'."""
  header = header.strip().lower()
  if header.startswith("["):
    return header[1:header.find("]")] if "]" in header else header
  return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _json_error(status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None):
  return JSONResponse(APIError(status, message, type=type, code=code).body(), status_code=status)


class _ClosingError(APIError):
  """An APIError answered with `Connection: close` (the rest of the request will not be read)."""


class _ClientGone(Exception):
  """The client closed the connection before its request body was complete: nothing to answer."""


class _HostGuard:
  """ASGI middleware: refuse requests whose Host header is not allowed (DNS-rebinding protection)."""

  def __init__(self, app, allowed: Optional[Sequence[str]]):
    self.app, self.allowed = app, None if allowed is None else {h.lower() for h in allowed}

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and self.allowed is not None:
      host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
      if _host_name(host) not in self.allowed:
        response = _json_error(421, f"Host header {host!r} is not served here (allowed: "
                                    f"{', '.join(sorted(self.allowed))}; see --host)", code="invalid_host")
        await response(scope, receive, send)
        return
    await self.app(scope, receive, send)


def create_app(model, options: Optional[ServerOptions] = None, engine: Optional[Engine] = None):
  """The FastAPI app serving `model` (an `infer.loading.InferenceModel`). Without `engine`, one is made
  (and closed when the app shuts down)."""
  options = options or ServerOptions()
  limits = options.limits
  own_engine = engine is None
  engine = engine or Engine(model, max_batch_size=options.max_batch_size, batch_window_s=options.batch_window_s,
                            max_queue=options.max_queue, steps_per_chunk=options.steps_per_chunk)
  work_lock = threading.Lock()  # image decoding and tokenizing: one request at a time

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    if own_engine:
      engine.close()

  app = FastAPI(title="llava_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.engine = engine
  allowed = options.allowed_hosts
  if allowed is None and _is_loopback(options.host):
    allowed = LOOPBACK_NAMES
  if allowed is not None and "*" not in allowed:
    app.add_middleware(_HostGuard, allowed=list(allowed))

  app.state.client_disconnects = 0  # requests whose client left before sending the whole body

  @app.exception_handler(APIError)
  async def api_error(request, exc: APIError):
    headers = {"Connection": "close"} if isinstance(exc, _ClosingError) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

  @app.exception_handler(_ClientGone)
  async def client_gone(request, exc: _ClientGone):
    app.state.client_disconnects += 1
    logger.info("%s left before sending the whole request body", request.client)
    return Response(status_code=400)  # never reaches the client; uvicorn drops it

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, exc: StarletteHTTPException):
    return _json_error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

  @app.exception_handler(Exception)
  async def internal_error(request, exc: Exception):
    logger.exception("unhandled error")
    return _json_error(500, f"internal error: {type(exc).__name__}", type="server_error")

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model.name, "pending": engine.pending,
            "limits": {"max_output_tokens": limits.max_output_tokens, "default_max_tokens": limits.default_max_tokens,
                       "max_images": limits.max_images, "max_request_bytes": limits.max_request_bytes,
                       "max_image_pixels": limits.max_image_pixels, "context_tokens": model.max_positions}}

  created = int(time.time())

  def model_card():
    return {"id": model.name, "object": "model", "created": created, "owned_by": "llava_jax"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def model_info(model_id: str):
    if model_id != model.name:
      raise APIError(404, f"the model {model_id!r} does not exist (this server serves {model.name!r})",
                     param="model", code="model_not_found")
    return model_card()

  @app.get("/")
  async def page():
    with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
      html = f.read()
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-store"})

  def prepare(raw: bytes):
    try:
      body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
      raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    return parse_chat_request(body, model, limits, work_lock)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
      raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    raw = await _read_body(request, limits.max_request_bytes, options.read_timeout_s)
    parsed = await run_in_threadpool(prepare, raw)
    loop = asyncio.get_running_loop()
    deltas: "asyncio.Queue[Delta]" = asyncio.Queue()

    def on_delta(delta: Delta) -> None:
      try:
        loop.call_soon_threadsafe(deltas.put_nowait, delta)
      except RuntimeError:  # the loop is gone (shutdown)
        pass

    try:
      job = engine.submit(parsed.request, on_delta)
    except QueueFull as e:
      raise APIError(503, f"the server is busy ({e}); retry shortly", type="server_error", code="overloaded")
    cid, stamp = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    if not parsed.stream:
      try:
        pieces, last = [], None
        while last is None or last.finish_reason is None:
          last = await deltas.get()
          pieces.append(last.text)
      finally:
        job.cancel()
      if last.error:
        raise APIError(500, last.error, type="server_error")
      return completion_body(cid, stamp, model.name, "".join(pieces), last.finish_reason, parsed.prompt_tokens,
                             last.completion_tokens)

    def sse(obj) -> str:
      return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    async def events():
      try:
        yield sse(chunk_body(cid, stamp, model.name, {"role": "assistant", "content": ""}))
        while True:
          delta = await deltas.get()
          if delta.error:
            yield sse(APIError(500, delta.error, type="server_error").body())
            break
          if delta.text:
            yield sse(chunk_body(cid, stamp, model.name, {"content": delta.text}))
          if delta.finish_reason is not None:
            yield sse(chunk_body(cid, stamp, model.name, {}, delta.finish_reason))
            if parsed.include_usage:
              yield sse(usage_chunk_body(cid, stamp, model.name, parsed.prompt_tokens, delta.completion_tokens))
            break
        yield "data: [DONE]\n\n"
      finally:
        job.cancel()  # client gone or done: stop reporting

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  return app


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
  """The request body, refusing (413) more than `limit` bytes without reading past it, and (408, closing the
  connection) a body that has not fully arrived within `timeout_s`. Raises _ClientGone if the client leaves."""
  length = request.headers.get("content-length")
  if length is not None:
    if not length.strip().isdigit():
      raise APIError(400, "bad Content-Length header")
    if int(length) > limit:
      raise APIError(413, f"the body is {int(length)} bytes, above this server's limit of {limit}",
                     code="request_too_large")
  chunks, size = [], 0
  try:
    async with asyncio.timeout(timeout_s):
      async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
          raise APIError(413, f"the body is above this server's limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
  except TimeoutError:
    raise _ClosingError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)",
                        code="request_timeout") from None
  except ClientDisconnect:
    raise _ClientGone() from None
  return b"".join(chunks)


def _timed_h11_protocol(read_timeout_s: float):
  """uvicorn's h11 protocol, also closing a connection whose request head has not fully arrived within
  `read_timeout_s` of connecting or of the previous response (uvicorn itself only closes idle keep-alive
  connections, so a client trickling a head in would hold its connection forever)."""
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class TimedH11Protocol(H11Protocol):

    def connection_made(self, transport):
      super().connection_made(transport)
      self._arm_head_timer()

    def on_response_complete(self):
      super().on_response_complete()
      self._arm_head_timer()

    def connection_lost(self, exc):
      self._cancel_head_timer()
      super().connection_lost(exc)

    def _arm_head_timer(self):
      self._cancel_head_timer()
      self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout)

    def _cancel_head_timer(self):
      timer = getattr(self, "_head_timer", None)
      if timer is not None:
        timer.cancel()
      self._head_timer = None

    def _head_timeout(self):
      self._head_timer = None
      waiting_for_head = self.cycle is None or self.cycle.response_complete
      if waiting_for_head and not self.transport.is_closing():
        self.transport.close()

  return TimedH11Protocol


def make_server(model, options: ServerOptions, *, log_level: str = "info", progress=print):
  """A `uvicorn.Server` for the app (not started); with options.precompile, every shape compiled first
  (reported on `progress`)."""
  import uvicorn
  compiled = precompile.run(model, options.limits, options.max_batch_size, progress) if options.precompile else None
  app = create_app(model, options)
  if compiled is not None:
    app.state.engine.compiled.update(shape.key for shape in compiled)
  config = uvicorn.Config(app, host=options.host, port=options.port, log_level=log_level, access_log=True,
                          http=_timed_h11_protocol(options.read_timeout_s),
                          timeout_keep_alive=min(5, options.read_timeout_s), timeout_graceful_shutdown=10,
                          server_header=False)
  return uvicorn.Server(config)


def serve(model, options: ServerOptions) -> None:
  """Run the server until interrupted (`--mode=serve`)."""
  if not _is_loopback(options.host):
    logger.warning("listening on %s: anyone who can reach this address can use the model", options.host)
  server = make_server(model, options, progress=lambda line: print(line, flush=True))
  print(f"serving {model.name} on http://{options.host}:{options.port}/  (chat page at /, API at /v1)",
        flush=True)
  try:
    server.run()
  except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
    print("server stopped", flush=True)


class ServerThread:
  """A server running on a background thread (tests, notebooks): `url`, `stop()`; a context manager."""

  def __init__(self, model, options: ServerOptions, *, startup_timeout_s: float = 60.0, progress=None):
    self.server = make_server(model, options, log_level="warning", progress=progress)
    self.thread = threading.Thread(target=self.server.run, name="llava-server", daemon=True)
    self.thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start on {options.host}:{options.port}")
      time.sleep(0.02)
    host = options.host if ":" not in options.host else f"[{options.host}]"
    self.url = f"http://{host}:{self.port}"

  @property
  def port(self) -> int:
    return self.server.servers[0].sockets[0].getsockname()[1]

  def stop(self, timeout_s: float = 30.0) -> None:
    self.server.should_exit = True
    self.thread.join(timeout_s)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
    return False
