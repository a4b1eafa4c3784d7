"""A small client for OpenAI-compatible chat endpoints (`POST {base_url}/chat/completions`), stdlib only.

Used by the LLaVA-Bench judge, the ScienceQA judge ensemble and the instruction-data generator. Any server that
speaks the chat-completions protocol works: OpenAI, vLLM, llama.cpp, a local stand-in in the tests.

- Concurrency: `ChatClient.map` runs requests on a thread pool (`concurrency` at a time) and hands each result
  to a callback as it arrives (callbacks run one at a time, so they may append to a file without locking).
- Retries: connection errors, timeouts, HTTP 408 / 409 / 429 / 5xx and malformed reply bodies are retried up
  to `max_retries` times with exponential backoff (base · 2^attempt, capped, with jitter; a `Retry-After`
  header is honoured up to the cap). Other HTTP errors (400, 401, 403, 404, ...) fail at once: retrying a bad
  request or a bad key only burns quota.
- Usage: `client.usage` accumulates requests, retries, failures and the reply's `usage` token counts
  (thread-safe); `Usage.cost(prices)` turns tokens into money.
- Configuration: base URL, model and key come from the arguments, else the environment (`OPENAI_BASE_URL`,
  `OPENAI_API_KEY`). The key is sent as `Authorization: Bearer ...` and never logged or stored.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
RETRYABLE_STATUS = (408, 409, 429, 500, 502, 503, 504)

Messages = List[Dict[str, str]]


class ChatError(RuntimeError):
  """A request that failed: `status` (HTTP status or None for transport errors), `retryable`, `attempts`."""

  def __init__(self, message: str, *, status: Optional[int] = None, retryable: bool = False, attempts: int = 1,
               retry_after: Optional[float] = None):
    super().__init__(message)
    self.status, self.retryable, self.attempts, self.retry_after = status, retryable, attempts, retry_after


@dataclasses.dataclass
class ChatResult:
  """One completion: `text` (choices[0].message.content), `finish_reason`, `model` (as the server reports it),
  `prompt_tokens` / `completion_tokens` (None when the server sends no usage), `attempts` (1 = no retry)."""
  text: str
  finish_reason: Optional[str]
  model: Optional[str]
  prompt_tokens: Optional[int]
  completion_tokens: Optional[int]
  attempts: int = 1


@dataclasses.dataclass
class Usage:
  """Totals over a client's lifetime. requests: successful completions; failures: requests given up on;
  retries: extra attempts; usage_missing: completions whose reply carried no token counts."""
  requests: int = 0
  failures: int = 0
  retries: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  usage_missing: int = 0

  @property
  def total_tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens

  def cost(self, prompt_per_1m: float = 0.0, completion_per_1m: float = 0.0) -> float:
    """Money spent at the given prices per million prompt / completion tokens."""
    return (self.prompt_tokens * prompt_per_1m + self.completion_tokens * completion_per_1m) / 1e6

  def to_dict(self, prompt_per_1m: float = 0.0, completion_per_1m: float = 0.0) -> dict:
    d = dataclasses.asdict(self)
    d["total_tokens"] = self.total_tokens
    d["cost"] = self.cost(prompt_per_1m, completion_per_1m)
    d["prices_per_1m"] = {"prompt": prompt_per_1m, "completion": completion_per_1m}
    return d


def parse_completion(body: Union[bytes, str]) -> ChatResult:
  """A chat-completions reply body → ChatResult; ChatError(retryable=True) when it is not one."""
  try:
    data = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise ChatError(f"reply is not JSON: {e}; body starts {_preview(body)!r}", retryable=True) from None
  try:
    choice = data["choices"][0]
    text = choice["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise ChatError(f"reply has no choices[0].message.content: {_preview(body)!r}", retryable=True) from None
  if not isinstance(text, str):
    raise ChatError(f"reply has choices[0].message.content of type {type(text).__name__}, expected a string",
                    retryable=True)
  usage = data.get("usage") if isinstance(data, dict) else None
  usage = usage if isinstance(usage, dict) else {}
  return ChatResult(text=text, finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
                    model=data.get("model"), prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                    completion_tokens=_int_or_none(usage.get("completion_tokens")))


def _int_or_none(x) -> Optional[int]:
  return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 else None


def _preview(body, n: int = 200) -> str:
  if isinstance(body, bytes):
    body = body.decode("utf-8", "replace")
  return str(body)[:n]


class ChatClient:
  """Chat completions against one endpoint and model.

  base_url: e.g. 'https://api.openai.com/v1', 'http://127.0.0.1:8000/v1' (None: $OPENAI_BASE_URL, else OpenAI).
  model: the model name sent with each request (required).
  api_key: sent as a bearer token (None: $OPENAI_API_KEY; '' or unset: no Authorization header, for local
    servers).
  timeout: seconds per attempt (connect + read). max_retries: extra attempts after the first.
  backoff_base / backoff_max: seconds; attempt k (0-based) waits min(max, base · 2^k) · U(0.5, 1).
  concurrency: parallel requests in `map`.
  default_params: merged into every request body (temperature, max_tokens, ...); per-call params win.
  """

  def __init__(self, base_url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
               *, timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 30.0,
               concurrency: int = 4, default_params: Optional[Mapping[str, Any]] = None,
               sleep: Callable[[float], None] = time.sleep, seed: Optional[int] = None):
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
      raise ValueError(f"base_url {base_url!r} must be an http(s) URL such as 'https://api.openai.com/v1'")
    if not model:
      raise ValueError("a model name is required (e.g. --judge_model=gpt-4o)")
    if timeout <= 0 or max_retries < 0 or concurrency < 1 or backoff_base < 0 or backoff_max < 0:
      raise ValueError(f"bad client settings: timeout={timeout}, max_retries={max_retries}, "
                       f"concurrency={concurrency}, backoff=({backoff_base}, {backoff_max})")
    self.base_url = base_url.rstrip("/")
    self.url = self.base_url + "/chat/completions"
    self.model = model
    self._api_key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    self.timeout, self.max_retries = float(timeout), int(max_retries)
    self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
    self.concurrency = int(concurrency)
    self.default_params = dict(default_params or {})
    self.usage = Usage()
    # a local server (a stand-in judge, a vLLM on this host) is reached directly, never through a proxy
    local = parsed.hostname in ("127.0.0.1", "localhost", "::1")
    self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else \
        urllib.request.build_opener()
    self._lock = threading.Lock()
    self._sleep = sleep
    self._rng = random.Random(seed)

  def __repr__(self) -> str:  # never shows the key
    return f"ChatClient({self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

  # ------------------------------------------------------------------------------------------ one request

  def chat(self, messages: Messages, **params) -> ChatResult:
    """One completion for `messages` ([{"role", "content"}, ...]); retries as described; raises ChatError."""
    _check_messages(messages)
    body = {**self.default_params, **params, "model": self.model, "messages": list(messages)}
    data = json.dumps(body).encode("utf-8")
    attempt = 0
    while True:
      try:
        result = self._post(data)
      except ChatError as e:
        e.attempts = attempt + 1
        if not e.retryable or attempt >= self.max_retries:
          with self._lock:
            self.usage.failures += 1
            self.usage.retries += attempt
          raise
        delay = self._delay(attempt, e.retry_after)
        logger.info("chat request failed (%s), retry %d/%d in %.2fs", e, attempt + 1, self.max_retries, delay)
        self._sleep(delay)
        attempt += 1
        continue
      result.attempts = attempt + 1
      with self._lock:
        self.usage.requests += 1
        self.usage.retries += attempt
        if result.prompt_tokens is None and result.completion_tokens is None:
          self.usage.usage_missing += 1
        self.usage.prompt_tokens += result.prompt_tokens or 0
        self.usage.completion_tokens += result.completion_tokens or 0
      return result

  def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
    if retry_after is not None and retry_after >= 0:
      return min(self.backoff_max, retry_after)
    with self._lock:
      jitter = 0.5 + 0.5 * self._rng.random()
    return min(self.backoff_max, self.backoff_base * (2 ** attempt)) * jitter

  def _post(self, data: bytes) -> ChatResult:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
    try:
      with self._opener.open(request, timeout=self.timeout) as response:
        body = response.read()
    except urllib.error.HTTPError as e:
      status = e.code
      try:
        detail = _preview(e.read())
      except Exception:  # noqa: BLE001 — the body of an error reply is only informative
        detail = ""
      retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
      raise ChatError(f"HTTP {status} from {self.url}: {detail}", status=status,
                      retryable=status in RETRYABLE_STATUS or status >= 500, retry_after=retry_after) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError,
            http.client.HTTPException) as e:  # refused, reset, timed out, cut short (IncompleteRead)
      reason = getattr(e, "reason", e)
      raise ChatError(f"cannot reach {self.url}: {reason}", retryable=True) from None
    return parse_completion(body)

  # ------------------------------------------------------------------------------------------ many requests

  def map(self, requests: Sequence[Union[Messages, tuple]],
          on_result: Optional[Callable[[int, Union[ChatResult, ChatError]], None]] = None,
          **params) -> List[Union[ChatResult, ChatError]]:
    """Run `requests` (each a message list, or a (messages, params dict) pair) `concurrency` at a time.

    Returns one entry per request, in order: its ChatResult, or the ChatError it finally failed with (a failed
    request does not stop the others). `on_result(index, result_or_error)` is called as each finishes, one
    call at a time (serialized by a lock), so it can write results to a file as they arrive.
    """
    out: List[Any] = [None] * len(requests)
    callback_lock = threading.Lock()

    def run(i):
      req = requests[i]
      messages, extra = (req[0], dict(req[1])) if isinstance(req, tuple) else (req, {})
      try:
        res: Union[ChatResult, ChatError] = self.chat(messages, **{**params, **extra})
      except ChatError as e:
        res = e
      out[i] = res
      if on_result is not None:
        with callback_lock:
          on_result(i, res)

    if not requests:
      return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
      futures = [pool.submit(run, i) for i in range(len(requests))]
      for f in futures:
        f.result()  # re-raise bugs in callbacks (ChatErrors are caught in run)
    return out


def _retry_after(value) -> Optional[float]:
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    return None


def _check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
        or not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r:.120}")


def judge_settings(**overrides) -> dict:
  """The default judge / teacher section of a config (`config.eval.judge`, datagen's flags).

  base_url / model / api_key_env: where to send requests ('' base_url: $OPENAI_BASE_URL, else OpenAI);
  the key is read from the environment variable named by api_key_env, never from the config itself.
  """
  d = dict(base_url="", model="", api_key_env=API_KEY_ENV, concurrency=4, timeout=120.0, max_retries=6,
           backoff_base=1.0, backoff_max=60.0, temperature=0.2, max_tokens=1024,
           price_prompt_per_1m=0.0, price_completion_per_1m=0.0)
  unknown = set(overrides) - set(d)
  if unknown:
    raise ValueError(f"unknown judge settings {sorted(unknown)}; known: {sorted(d)}")
  d.update(overrides)
  return d


def client_from_settings(settings: Mapping[str, Any], *, what: str = "judge") -> ChatClient:
  """A ChatClient from a `judge_settings()`-shaped mapping (a ConfigDict works)."""
  get = settings.get if hasattr(settings, "get") else (lambda k, d=None: getattr(settings, k, d))
  model = get("model", "")
  if not model:
    raise ValueError(f"no {what} model: set --judge_model (or config.eval.judge.model)")
  key_env = get("api_key_env", API_KEY_ENV) or API_KEY_ENV
  return ChatClient(get("base_url", "") or None, model, os.environ.get(key_env, ""),
                    timeout=float(get("timeout", 120.0)), max_retries=int(get("max_retries", 6)),
                    backoff_base=float(get("backoff_base", 1.0)), backoff_max=float(get("backoff_max", 60.0)),
                    concurrency=int(get("concurrency", 4)),
                    default_params={"temperature": float(get("temperature", 0.2)),
                                    "max_tokens": int(get("max_tokens", 1024))})


# ---------------------------------------------------------------------------------------------------------
# Resumable batches of requests


@dataclasses.dataclass(frozen=True)
class Job:
  """One request of a resumable batch: `key` names it in the output file (unique), `messages` is the request,
  `record` holds extra fields written with the reply."""
  key: str
  messages: Messages
  record: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def prompt_sha1(model: str, messages: Messages) -> str:
  """Fingerprint of (model, messages): a stored reply is reused only for the same request to the same model."""
  import hashlib
  blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
  return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def run_resumable(client: ChatClient, jobs: Sequence[Job], path: str, *, key_field: str = "key",
                  annotate: Optional[Callable[[dict], Mapping[str, Any]]] = None,
                  print_fn: Optional[Callable[[str], None]] = None, **params):
  """Ask every job, keeping replies in the JSON-lines file `path`; a rerun asks only what is missing.

  Each reply becomes one line `{key_field: job.key, **job.record, "content": reply text, "prompt_sha1",
  "model", "finish_reason", "usage": {...}}`, appended as it arrives (job.record may hold key_field in its
  original type, e.g. an int question_id, as long as its str() is job.key). On start the file is read: lines whose
  key is a current job with the same prompt_sha1 (same model and messages) are kept and not asked again;
  stale or foreign lines are dropped (the file is rewritten without them). Requests that fail after all
  retries are not written, so a rerun retries them. annotate(line) may return extra fields to store with
  each new line (e.g. parsed scores).

  Returns (records {key: line} for every answered job, failures {key: error message}).
  """
  keys = [j.key for j in jobs]
  if len(set(keys)) != len(keys):
    raise ValueError("job keys must be unique")
  wanted = {j.key: prompt_sha1(client.model, list(j.messages)) for j in jobs}
  kept: Dict[str, dict] = {}
  dropped = 0
  if os.path.exists(path):
    with open(path, "r", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          key = str(rec[key_field])
        except (ValueError, KeyError, TypeError):
          dropped += 1
          continue
        if wanted.get(key) == rec.get("prompt_sha1") and isinstance(rec.get("content"), str):
          kept[key] = rec
        else:
          dropped += 1
    if dropped:
      logger.warning("%s: dropping %d stale or unreadable line(s) (other prompts or model)", path, dropped)
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        for rec in kept.values():
          f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      os.replace(tmp, path)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  todo = [j for j in jobs if j.key not in kept]
  if print_fn and kept:
    print_fn(f"{path}: {len(kept)} replies on disk, {len(todo)} to ask")
  failures: Dict[str, str] = {}
  records = dict(kept)
  with open(path, "a", encoding="utf-8") as out:
    def on_result(i, res):
      job = todo[i]
      if isinstance(res, ChatError):
        failures[job.key] = str(res)
        logger.warning("request %s failed: %s", job.key, res)
        return
      rec = {key_field: job.key, **job.record, "content": res.text, "prompt_sha1": wanted[job.key],
             "model": client.model, "finish_reason": res.finish_reason,
             "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}}
      if annotate is not None:
        rec.update(annotate(rec))
      out.write(json.dumps(rec, ensure_ascii=False) + "\n")
      out.flush()
      records[job.key] = rec

    client.map([(list(j.messages), {}) for j in todo], on_result=on_result, **params)
  return records, failures
