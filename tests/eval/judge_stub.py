"""A stand-in OpenAI-compatible chat endpoint on 127.0.0.1 for the tests (stdlib http.server, one thread per
request), with deterministic replies chosen by a test-supplied function.

  with JudgeStub(reply_fn) as stub:      # stub.base_url = 'http://127.0.0.1:<port>/v1'
    ...                                  # stub.requests: every request body received (dicts), in order

reply_fn(body: dict, attempt: int) -> Reply, where attempt counts earlier requests with the same messages
(0 on the first), so a test can fail a request a few times and then answer it. A Reply is either text (a
normal completion with usage), or a Reply(status=..., raw=...) for errors and malformed bodies.
"""
from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import sys
import threading
from typing import Callable, Dict, Optional, Union


@dataclasses.dataclass
class Reply:
  """text: the completion (status 200, a well-formed body with usage); or status + raw body (bytes / str) for
  anything else; headers: extra response headers; finish_reason; usage (prompt, completion) or None;
  cut_short: announce a longer body than is sent, then hang up (the client sees an incomplete read)."""
  text: Optional[str] = None
  status: int = 200
  raw: Optional[Union[bytes, str]] = None
  headers: Dict[str, str] = dataclasses.field(default_factory=dict)
  finish_reason: str = "stop"
  usage: Optional[tuple] = (11, 7)
  cut_short: bool = False


def completion_body(text: str, model: str, finish_reason: str = "stop", usage=(11, 7)) -> dict:
  body = {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish_reason}]}
  if usage is not None:
    body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                     "total_tokens": usage[0] + usage[1]}
  return body


class JudgeStub:
  def __init__(self, reply_fn: Callable[[dict, int], Union[str, Reply]]):
    self.reply_fn = reply_fn
    self.requests = []
    self.auth_headers = []
    self._attempts = collections.Counter()
    self._lock = threading.Lock()
    stub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # quiet
        pass

      def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
          self._send(404, b'{"error": "not found"}')
          return
        try:
          body = json.loads(raw)
        except ValueError:
          self._send(400, b'{"error": "bad json"}')
          return
        key = json.dumps(body.get("messages"), sort_keys=True)
        with stub._lock:
          stub.requests.append(body)
          stub.auth_headers.append(self.headers.get("Authorization"))
          attempt = stub._attempts[key]
          stub._attempts[key] += 1
        reply = stub.reply_fn(body, attempt)
        if isinstance(reply, str):
          reply = Reply(text=reply)
        if reply.raw is not None or reply.status != 200:
          data = reply.raw if reply.raw is not None else b'{"error": {"message": "stub error"}}'
          self._send(reply.status, data.encode() if isinstance(data, str) else data, reply.headers)
          return
        out = completion_body(reply.text, body.get("model", ""), reply.finish_reason, reply.usage)
        self._send(200, json.dumps(out).encode(), reply.headers, extra_length=100 if reply.cut_short else 0)

      def _send(self, status, data: bytes, headers=None, extra_length=0):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) + extra_length))
        for k, v in (headers or {}).items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    class Server(http.server.ThreadingHTTPServer):
      def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
          return  # a client that timed out and hung up
        super().handle_error(request, client_address)

    self._server = Server(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.port = self._server.server_address[1]
    self.base_url = f"http://127.0.0.1:{self.port}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                    daemon=True)

  def __enter__(self) -> "JudgeStub":
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=5)
    return False

  def user_messages(self):
    """The last user message of every request received, in order."""
    return [b["messages"][-1]["content"] for b in self.requests]
