"""A generation worker for concurrent callers: one thread owns the model and serves a FIFO queue in batches.

Requests that wait together (up to `max_batch_size`, gathered for `batch_window_s` after the first) run as
one batched `generate` call, each with its own prompt, images, temperature, top-p, top-k, seed, stop strings
and token limit. The queue is strictly first in, first out, and a batch never skips a waiting request, so no
request can starve: one waits at most for the batches ahead of it. A request whose own limit or stop comes
first is answered at once, while its batch goes on for the others.

Per-request limits and stop strings are applied on the host to each row's token stream
(`streaming.AnswerStream`); the template's stop tokens stop rows on the device, and the batch's generation
ends as soon as every answer has finished. A batch runs to its largest max_tokens after its longest prompt, so
a request that would push that past the context waits for the next batch (still first in line).

Compiling off the serving path: a batch whose shape `generate` has not compiled yet (`precompile.shape_key`)
is set aside while a second thread compiles that shape on a dummy batch (`precompile.compile_shape`); the
worker goes on with the requests behind it, and runs the set-aside batch first once its compilation is done.
So a new shape delays only its own requests, never the others (one compile can take tens of seconds).
`compiled` holds the shapes known compiled (those `precompile.run` compiled at start-up, and each one run).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from llava_jax.infer import generate as gen
from llava_jax.infer import precompile
from llava_jax.infer.streaming import AnswerStream

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
  """The engine already holds `max_queue` waiting requests."""


_WAKE = object()  # put on the queue when a set-aside batch is ready to run


@dataclasses.dataclass
class Request:
  """One generation request. input_ids int [T] (image placeholder runs included); pixel_values float32
  [n, S, S, 3] CLIP pixels for the n runs (or None); max_tokens ≥ 1; temperature 0 = greedy."""
  input_ids: np.ndarray
  pixel_values: Optional[np.ndarray] = None
  max_tokens: int = 512
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
  """What a request's callback receives, in order: new answer text (see streaming.AnswerStream), and on
  the last delta finish_reason 'stop' | 'length' (or 'error' with `error` set).
  completion_tokens: tokens generated so far (stop token included)."""
  text: str
  finish_reason: Optional[str]
  completion_tokens: int
  error: Optional[str] = None


class Job:
  """A submitted request: `cancel()` drops it (a queued job never runs; a running one stops reporting)."""

  def __init__(self, request: Request, callback: Callable[[Delta], None]):
    self.request, self._callback = request, callback
    self.cancelled = False
    self.done = threading.Event()
    self.submitted = time.monotonic()

  def cancel(self) -> None:
    self.cancelled = True

  def _emit(self, text: str, finish_reason: Optional[str], tokens: int, error: Optional[str] = None) -> None:
    if self.done.is_set():
      return
    if finish_reason is not None:
      self.done.set()
    if not text and finish_reason is None:
      return
    if not self.cancelled:
      try:
        self._callback(Delta(text, finish_reason, tokens, error))
      except Exception:  # a broken callback must not take the batch down
        logger.exception("request callback failed")


class Engine:
  """Owns `model` (an `infer.loading.InferenceModel`) on a worker thread; `submit` is thread-safe."""

  def __init__(self, model, *, max_batch_size: int = 8, batch_window_s: float = 0.01, max_queue: int = 64,
               steps_per_chunk: int = gen.DEFAULT_STREAM_CHUNK, compile_off_path: bool = True):
    if max_batch_size < 1 or max_queue < 1 or steps_per_chunk < 1:
      raise ValueError("max_batch_size, max_queue and steps_per_chunk must be >= 1")
    self.model = model
    self.max_batch_size, self.batch_window_s, self.max_queue = max_batch_size, batch_window_s, max_queue
    self.steps_per_chunk = steps_per_chunk
    self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
    self._lock = threading.Lock()
    self._pending = 0
    self.batches_run = 0
    self.batch_sizes: List[int] = []
    self._held: Optional[Job] = None  # taken from the queue but left for the next batch (it did not fit)
    self.compile_off_path = compile_off_path
    self.compiled: Set[precompile.Key] = set()
    self.compiles_off_path = 0
    self._compiling: Dict[precompile.Key, List[List[Job]]] = {}  # shape → batches waiting for it
    self._ready: Deque[List[Job]] = collections.deque()  # set-aside batches whose shape is now compiled
    self._compile_queue: "queue.Queue[Optional[Tuple[precompile.Key, precompile.Shape]]]" = queue.Queue()
    self._compiler = threading.Thread(target=self._compile_loop, name="llava-compile", daemon=True)
    self._compiler.start()
    self._thread = threading.Thread(target=self._loop, name="llava-engine", daemon=True)
    self._thread.start()

  @property
  def pending(self) -> int:
    """Requests queued or running."""
    return self._pending

  def submit(self, request: Request, callback: Callable[[Delta], None]) -> Job:
    """Queue `request`; `callback(Delta)` is called on the worker thread. Raises QueueFull."""
    with self._lock:
      if self._pending >= self.max_queue:
        raise QueueFull(f"{self._pending} requests are already waiting (max_queue={self.max_queue})")
      self._pending += 1
    job = Job(request, callback)
    self._queue.put(job)
    return job

  def close(self, timeout: float = 30.0) -> None:
    self._queue.put(None)
    self._compile_queue.put(None)
    self._thread.join(timeout)

  # ------------------------------------------------------------------------------------------- worker

  def _fits(self, batch: List[Job], job: Job) -> bool:
    """Whether `job` can join `batch`: generate runs every row to the batch's largest max_tokens."""
    longest = max(len(j.request.input_ids) for j in batch + [job])
    return longest + max(j.request.max_tokens for j in batch + [job]) <= self.model.max_positions

  def _take_batch(self) -> Optional[List[Job]]:
    """The next batch ([] when woken for a ready set-aside batch; None to stop)."""
    first, self._held = self._held or self._queue.get(), None
    if first is None:
      return None
    if first is _WAKE:
      return []
    batch = [first]
    deadline = time.monotonic() + self.batch_window_s
    while len(batch) < self.max_batch_size:
      try:
        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if job is None:
        self._queue.put(None)  # stop after this batch
        break
      if job is _WAKE:
        continue
      if not self._fits(batch, job):
        self._held = job  # first of the next batch
        break
      batch.append(job)
    return batch

  def _finish(self, jobs: Sequence[Job]) -> None:
    with self._lock:
      self._pending -= len(jobs)

  def _next_batch(self) -> Optional[List[Job]]:
    with self._lock:
      if self._ready:
        return self._ready.popleft()
    return self._take_batch()

  def _loop(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      live = [j for j in batch if not j.cancelled]
      for j in batch:
        if j.cancelled:
          j.done.set()
      if live and self.compile_off_path and self._set_aside(batch, live):
        continue
      try:
        if live:
          self._run(live)
      except Exception as e:  # report to every unanswered request; the worker stays up
        logger.exception("generation failed")
        for j in live:
          j._emit("", "error", 0, error=f"generation failed: {type(e).__name__}: {e}")
      finally:
        self._finish(batch)

  # ------------------------------------------------------------------------------------------- compiling

  def _set_aside(self, batch: List[Job], live: List[Job]) -> bool:
    """If `live`'s shape is not compiled, queue its compilation, keep `batch` until then, and return True."""
    reqs = [j.request for j in live]
    lengths = [len(r.input_ids) for r in reqs]
    images = sum(0 if r.pixel_values is None else len(r.pixel_values) for r in reqs)
    max_tokens = max(r.max_tokens for r in reqs)
    key = precompile.shape_key(self.model, lengths, images, max_tokens)
    with self._lock:
      if key in self.compiled:
        return False
      waiting = self._compiling.setdefault(key, [])
      waiting.append(batch)
      if len(waiting) > 1:
        return True
    # ≥ 2 new tokens (same bucket) where the context allows, so the decode loop compiles too
    new = max(max_tokens, min(2, self.model.max_positions - max(lengths)))
    logger.info("compiling batch shape %s off the serving path", key)
    self._compile_queue.put((key, precompile.Shape(len(reqs), max(lengths), images, new, key)))
    return True

  def _compile_loop(self) -> None:
    while True:
      item = self._compile_queue.get()
      if item is None:
        return
      key, shape = item
      try:
        precompile.compile_shape(self.model, shape)
      except Exception:  # the batch then compiles when it runs, and reports its own error
        logger.exception("compiling batch shape %s failed", key)
      with self._lock:
        self.compiled.add(key)
        self.compiles_off_path += 1
        self._ready.extend(self._compiling.pop(key, []))
      self._queue.put(_WAKE)

  # ------------------------------------------------------------------------------------------- running

  def _run(self, jobs: List[Job]) -> None:
    model = self.model
    reqs = [j.request for j in jobs]
    answers = [AnswerStream(model.tokenizer, model.stop_token_ids, tuple(model.stop_strings) + tuple(r.stop),
                            r.max_tokens) for r in reqs]

    def on_event(event: gen.StreamEvent) -> None:
      job, answer = jobs[event.row], answers[event.row]
      if answer.finished:
        return
      piece = answer.add(event.token_ids)
      if not answer.finished and event.finish_reason is not None:  # generate's limit is the batch's largest
        piece += answer.finish()
      job._emit(piece, answer.finish_reason, len(answer.tokens))
      if all(a.finished or j.cancelled for a, j in zip(answers, jobs)):
        raise _BatchDone

    self.batches_run += 1
    self.batch_sizes.append(len(jobs))
    pixels = [r.pixel_values for r in reqs]
    try:
      gen.generate(model.config, model.params, [np.asarray(r.input_ids) for r in reqs],
                   pixels if any(p is not None for p in pixels) else None, max_new_tokens=max(r.max_tokens for r in reqs),
                   temperature=[r.temperature for r in reqs], top_p=[r.top_p for r in reqs],
                   top_k=[r.top_k for r in reqs], seed=[r.seed for r in reqs], stop_token_ids=model.stop_token_ids,
                   stream_callback=on_event, mesh=model.mesh, steps_per_chunk=self.steps_per_chunk)
    except _BatchDone:
      pass
    for job, answer in zip(jobs, answers):  # normally every answer has finished; this is a safety net
      if not answer.finished:
        job._emit(answer.finish(), answer.finish_reason, len(answer.tokens))


class _BatchDone(Exception):
  """Raised from the stream callback when every answer of the batch has finished (stop strings and
  per-request limits end answers on the host): it ends the batch's generation early."""
