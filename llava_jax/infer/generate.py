"""Batched generation: prefill the prompts (image features spliced in) into a KV cache, then decode.

Design (the choices and why):
- Cache: an explicit `KVCache` pytree (k / v [L, B, Hkv, S, hd] + valid [B, S]; `models/llama.py`), passed
  in and out of jitted functions. It needs no mutable flax collection, is a plain `while_loop` carry, works
  unchanged with `scan_layers` (the layer axis is scanned with the params) and shards by logical
  constraints like any activation, so params sharded on a mesh just work.
- Padding: prompts are LEFT-padded to a common length Tb, with per-row positions cumsum(mask) - 1 and the
  padding slots invalid in the cache, so every row's last prompt token sits in slot Tb - 1 and decode step
  i writes slot Tb + i - 1 for all rows (one dynamic index, no scatter). Each row sees exactly the tokens
  and positions it would see alone, so a batch gives the same tokens as its rows one by one.
- Shape buckets: batch (power of two, times the mesh's data × fsdp), prompt length (`PROMPT_BUCKETS`: powers
  of two from 16 up to 256, then multiples of 64) and max_new_tokens (`bucket_size`: powers of two from 16 up
  to 512, then multiples of 256), image count (power of two;
  padding images are masked out by `image_valid`) and the stop-id list (power of two ≥ 4). The real
  max_new_tokens, sampling settings, seeds and stop ids are traced values, so calls inside one bucket reuse
  one compilation of `_prefill` and one of `_decode`.
- Decoding runs in chunks: `_decode` is a `lax.while_loop` that stops when every row is done or at a traced
  step limit. The host calls it with limit = step + steps_per_chunk, and between chunks it reads the new
  tokens, checks stop strings on the decoded text (a row that hits one is marked done for the next chunk),
  and calls `stream_callback`. Chunks (not `jax.debug.callback` inside the loop) keep the callback out of
  compiled code — ordered, on the host thread, no effect on sharding — at the cost of up to
  steps_per_chunk - 1 wasted steps per stop-string row. Without a callback or stop strings the whole
  generation is a single `_decode` call.
- Per-row stopping: a stop token id ends a row on device; rows that stopped emit pad_id, and the loop ends
  when all rows are done or at max_new_tokens. Returned tokens include the stop token (as transformers'
  `generate`) or, for a stop string, end with the token that completes it; `texts` hold the answer without
  the stop token / string.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import parallel
from llava_jax.config import LlavaConfig
from llava_jax.infer import cpu_weights, inputs, sampling
from llava_jax.infer.streaming import AnswerStream
from llava_jax.models.llama import KVCache, constrain_kv_cache, init_kv_cache
from llava_jax.models.llava import LlavaModel, param_shardings

DEFAULT_STREAM_CHUNK = 8
# Prompt lengths: powers of two up to 256, then multiples of 64. An image prompt is 256 / 576 placeholders + text,
# so power-of-two buckets padded a 304-token LLaVA prompt to 512 (68 % more prefill work; bench/README.md).
PROMPT_BUCKETS = dict(linear_above=256, linear_step=64)


# ---------------------------------------------------------------------------------------------------------
# Shape buckets


def bucket_size(n: int, minimum: int = 16, linear_above: int = 512, linear_step: int = 256) -> int:
  """Bucketed length ≥ n: the next power of two (at least `minimum`) up to `linear_above`, then the next
  multiple of `linear_step`."""
  if n < 1:
    raise ValueError(f"bucket_size needs n >= 1, got {n}")
  if n <= linear_above:
    return max(minimum, 1 << (n - 1).bit_length())
  return -(-n // linear_step) * linear_step


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _batch_bucket(b: int, multiple: int) -> int:
  p = _pow2(b)
  return -(-p // multiple) * multiple


# ---------------------------------------------------------------------------------------------------------
# Compiled pieces


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries. B = bucketed batch, N = bucketed max_new_tokens, Tb = prompt slots.

  cache: KVCache with Tb + N slots; tokens [B, N] int32 (pad_id after a row stops); scores [B, N, V]
  float32 raw logits (only with output_scores, else None); step () int32 = tokens generated so far;
  done [B] bool; prompt_lens [B] int32; row_keys [B, 2] uint32 key data; temperature / top_p [B] float32;
  top_k [B] int32; stop_ids [K] int32 (-1 = unused slot); pad_id () int32.
  """
  cache: KVCache
  tokens: jax.Array
  scores: Optional[jax.Array]
  step: jax.Array
  done: jax.Array
  prompt_lens: jax.Array
  row_keys: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array
  stop_ids: jax.Array
  pad_id: jax.Array


def _constrain(state: DecodeState) -> DecodeState:
  """Pin every leaf's sharding (no-op without a mesh) so prefill and decode outputs agree and the decode
  loop never recompiles for a new input sharding."""
  c = nn.with_logical_constraint
  row = ("batch",)
  return state.replace(
      cache=constrain_kv_cache(state.cache), tokens=c(state.tokens, ("batch", None)),
      scores=None if state.scores is None else c(state.scores, ("batch", None, "act_vocab")),
      step=c(state.step, ()), done=c(state.done, row), prompt_lens=c(state.prompt_lens, row),
      row_keys=c(state.row_keys, ("batch", None)), temperature=c(state.temperature, row),
      top_p=c(state.top_p, row), top_k=c(state.top_k, row), stop_ids=c(state.stop_ids, (None,)),
      pad_id=c(state.pad_id, ()))


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _prefill_impl(params, input_ids, prompt_mask, pixel_values, image_valid, row_active, seeds, salts,
                  temperature, top_p, top_k, stop_ids, pad_id, *, config: LlavaConfig, max_new: int,
                  output_scores: bool) -> DecodeState:
  """Left-padded prompts [B, Tb] (+ images) → cache filled, first token chosen; step = 1."""
  b, t = input_ids.shape
  model = LlavaModel(config)
  mask = prompt_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
  cache = init_kv_cache(config.text, b, t + max_new, config.runtime.jnp_dtype)
  logits, cache = model.apply({"params": params}, input_ids, pixel_values, cache, index=0, positions=positions,
                              token_mask=mask, image_valid=image_valid, last_only=True, method=LlavaModel.extend)
  row_keys = sampling.make_row_keys(seeds, salts)
  tok = sampling.choose_tokens(logits, row_keys, 0, temperature, top_k, top_p)
  done = ~row_active
  tok = jnp.where(done, pad_id, tok)
  tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  scores = None
  if output_scores:
    scores = jnp.zeros((b, max_new, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
  state = DecodeState(cache=cache, tokens=tokens, scores=scores, step=jnp.int32(1), done=done | _is_stop(tok, stop_ids),
                      prompt_lens=jnp.sum(mask, axis=-1).astype(jnp.int32), row_keys=row_keys,
                      temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop_ids,
                      pad_id=jnp.asarray(pad_id, jnp.int32))
  return _constrain(state)


def _decode_impl(params, state: DecodeState, stop_now, limit, *, config: LlavaConfig) -> DecodeState:
  """Decode one token per row per step until every row is done or `step == limit` (traced)."""
  model = LlavaModel(config)
  n = state.tokens.shape[1]
  prompt_slots = state.cache.max_length - n

  def cond(s: DecodeState):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    prev = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
    positions = (s.prompt_lens + s.step - 1)[:, None]
    logits, cache = model.apply({"params": params}, prev, None, s.cache, index=prompt_slots + s.step - 1,
                                positions=positions, last_only=True, method=LlavaModel.extend)
    tok = sampling.choose_tokens(logits, s.row_keys, s.step, s.temperature, s.top_k, s.top_p)
    tok = jnp.where(s.done, s.pad_id, tok)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    scores = s.scores
    if scores is not None:
      scores = jax.lax.dynamic_update_slice(scores, logits[:, None], (0, s.step, 0))
    return _constrain(s.replace(cache=cache, tokens=tokens, scores=scores, step=s.step + 1,
                                done=s.done | _is_stop(tok, s.stop_ids)))

  state = _constrain(state.replace(done=state.done | stop_now))
  return _constrain(jax.lax.while_loop(cond, body, state))


_prefill = jax.jit(_prefill_impl, static_argnames=("config", "max_new", "output_scores"))
_decode = jax.jit(_decode_impl, static_argnames=("config",), donate_argnames=("state",))


def compile_counts() -> Tuple[int, int]:
  """(prefill, decode) compilations cached so far (for tests and monitoring)."""
  return _prefill._cache_size(), _decode._cache_size()


# ---------------------------------------------------------------------------------------------------------
# Host side: inputs, stop strings, streaming


@dataclasses.dataclass(frozen=True)
class StreamEvent:
  """What `stream_callback` receives, in order, per row: the tokens (and text) new since that row's
  previous event. `text` is None without a tokenizer; it never contains (part of) a stop string and holds
  back incomplete characters until they complete. `finish_reason` is None until the row's last event,
  then 'stop' (stop token or string) or 'length'. Concatenating a row's events gives its final
  `token_ids` and `texts` entry."""
  row: int
  token_ids: Tuple[int, ...]
  text: Optional[str]
  finish_reason: Optional[str] = None


@dataclasses.dataclass
class GenerationResult:
  """token_ids: per row, the generated ids (ending with the stop token / the token completing a stop
  string when the row stopped). texts: per row, the decoded answer without the stop (tokenizer given).
  finish_reasons: 'stop' | 'length'. scores: per row [n, V] float32 raw logits (output_scores).
  prompt_lengths: tokens per prompt (image placeholders included)."""
  token_ids: List[List[int]]
  finish_reasons: List[str]
  texts: Optional[List[str]] = None
  scores: Optional[List[np.ndarray]] = None
  prompt_lengths: Optional[List[int]] = None


def shard_params(config: LlavaConfig, params, mesh):
  """Place params on `mesh` by the logical axis rules (what a sharded checkpoint load produces)."""
  return jax.device_put(params, param_shardings(config, mesh))


# ---------------------------------------------------------------------------------------------------------
# Entry point


def generate(config: LlavaConfig, params, input_ids=None, pixel_values=None, *, prompts=None,
             attention_mask=None, tokenizer=None, max_new_tokens: int = 64,
             temperature: Union[float, Sequence[float]] = 0.0, top_p: Union[float, Sequence[float]] = 1.0,
             top_k: Union[int, Sequence[int]] = 0, stop_token_ids: Optional[Sequence[int]] = None,
             stop_strings: Sequence[str] = (), seed: Union[int, Sequence[int]] = 0, pad_id: Optional[int] = None,
             stream_callback: Optional[Callable[[StreamEvent], None]] = None, mesh=None,
             steps_per_chunk: Optional[int] = None, output_scores: bool = False) -> GenerationResult:
  """Generate up to `max_new_tokens` tokens after each prompt.

  Prompts: `input_ids` — a list of 1-D id sequences of any lengths (image placeholder runs of
  `config.num_image_tokens` × `config.image_token_index`), or a [B, T] array (+ `attention_mask` [B, T],
  1 = token, to drop padding on either side) — or `prompts`, strings with literal `<image>`s, tokenized by
  `tokenizer` as LLaVA does (one BOS). pixel_values: CLIP-normalized NHWC images, [N, S, S, 3] in the
  row-major order of the placeholder runs, or a per-row list of None / [S, S, 3] / [n, S, S, 3].
  Sampling: temperature 0 = greedy; else temperature → top_k (0 = off) → top_p (1 = off), HF's rules
  (`infer/sampling.py`); each may be a scalar or one value per prompt. seed: an int (row r uses
  fold_in(key(seed), r)) or one seed per prompt (row r uses fold_in(key(seed[r]), 0)); same seed, same tokens.
  Stops: `stop_token_ids` (default: the tokenizer's EOS, else config.text.eos_token_id) and `stop_strings`
  (matched on the decoded text; need `tokenizer`). stream_callback(StreamEvent) gets each row's new tokens
  / text every `steps_per_chunk` steps (default 8 when streaming or using stop strings; else one chunk).
  mesh: run on this mesh (params already placed on it, e.g. by `shard_params`); the batch is split over
  (data, fsdp). output_scores: also return each step's raw logits.
  """
  rows = inputs.prompt_rows(input_ids, attention_mask, prompts, tokenizer, config)
  if not rows:
    raise ValueError("no prompts given")
  images = inputs.image_array(pixel_values, config)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)
  num_images = 0 if images is None else images.shape[0]
  inputs.check_rows(rows, num_images, config, max_new_tokens)
  stop_strings = tuple(s for s in ([stop_strings] if isinstance(stop_strings, str) else stop_strings))
  if any(not isinstance(s, str) or not s for s in stop_strings):
    raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings are matched on decoded text: pass a tokenizer")
  if stop_token_ids is None:
    eos = tokenizer.eos_token_id if tokenizer is not None else config.text.eos_token_id
    stop_token_ids = () if eos is None else (int(eos),)
  stop_token_ids = tuple(int(t) for t in ([stop_token_ids] if np.ndim(stop_token_ids) == 0 else stop_token_ids))
  if pad_id is None:
    pad_id = config.text.pad_token_id if config.text.pad_token_id is not None else 0
  pad_id = int(pad_id)
  if pad_id == config.image_token_index or not 0 <= pad_id < config.text.vocab_size:
    raise ValueError(f"pad_id {pad_id} must be an in-vocabulary id other than the image token")
  if steps_per_chunk is not None and steps_per_chunk < 1:
    raise ValueError(f"steps_per_chunk must be >= 1, got {steps_per_chunk}")

  b = len(rows)
  temperature = inputs.per_row("temperature", temperature, b, np.float32, 0.0, np.inf)
  top_p = inputs.per_row("top_p", top_p, b, np.float32, 0.0, 1.0)
  top_k = inputs.per_row("top_k", top_k, b, np.int64, 0, np.iinfo(np.int32).max).astype(np.int32)
  if np.ndim(seed) == 0:
    seeds, salts = np.full((b,), int(seed) % 2**32, np.uint32), np.arange(b, dtype=np.int32)
  else:
    seeds, salts = np.asarray([int(s) % 2**32 for s in seed], np.uint32), np.zeros((b,), np.int32)
    if seeds.shape != (b,):
      raise ValueError(f"seed must be an int or one per prompt ({b}), got {len(seeds)}")

  # bucketed, left-padded arrays
  batch_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  bb = _batch_bucket(b, batch_multiple)
  tb = bucket_size(max(len(r) for r in rows), **PROMPT_BUCKETS)
  nb = bucket_size(max_new_tokens)
  ids = np.full((bb, tb), pad_id, np.int32)
  mask = np.zeros((bb, tb), np.int32)
  for r, row in enumerate(rows):
    ids[r, tb - len(row):] = row
    mask[r, tb - len(row):] = 1
  active = np.arange(bb) < b

  def pad_rows(x, fill):
    return np.concatenate([x, np.full((bb - b,) + x.shape[1:], fill, x.dtype)])

  image_valid = None
  if images is not None:
    nimg = _pow2(images.shape[0])
    image_valid = np.arange(nimg) < images.shape[0]
    images = np.concatenate([images, np.zeros((nimg - images.shape[0],) + images.shape[1:], np.float32)])
  n_stop = max(4, _pow2(len(stop_token_ids)))
  stop_arr = np.full((n_stop,), -1, np.int32)
  stop_arr[:len(stop_token_ids)] = stop_token_ids

  batch_args = [ids, mask, active, pad_rows(seeds, 0), pad_rows(salts, 0), pad_rows(temperature, 0),
                pad_rows(top_p, 1), pad_rows(top_k, 0)]
  if mesh is not None:
    put_batch = lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))
    put_rep = lambda x: None if x is None else jax.device_put(x, parallel.replicated(mesh))
  else:
    put_batch = put_rep = lambda x: None if x is None else jnp.asarray(x)
  ids_d, mask_d, active_d, seeds_d, salts_d, temp_d, top_p_d, top_k_d = [put_batch(x) for x in batch_args]

  chunk = steps_per_chunk or (DEFAULT_STREAM_CHUNK if (stream_callback or stop_strings) else nb)
  answers = [AnswerStream(tokenizer, stop_token_ids, stop_strings, strip=False) for _ in range(b)]
  events = [_RowEvents(r, a) for r, a in enumerate(answers)]
  params = cpu_weights.bit_views(params)  # XLA:CPU: bf16 layer stacks sliced as integers (no float32 copy)
  with parallel.mesh_context(mesh):
    state = _prefill(params, ids_d, mask_d, put_rep(images), put_rep(image_valid), active_d, seeds_d, salts_d,
                     temp_d, top_p_d, top_k_d, put_rep(stop_arr), put_rep(np.int32(pad_id)), config=config,
                     max_new=nb, output_scores=output_scores)
    seen, last_step = 0, -1
    while True:
      step, tokens = host_values((state.step, state.tokens))
      step = int(step)
      for e in events:
        e.pending += e.answer.add(tokens[e.row, seen:step])
        if step >= max_new_tokens:
          e.pending += e.answer.finish()
      seen = step
      if stream_callback is not None:
        for e in events:
          event = e.take()
          if event is not None:
            stream_callback(event)
      if all(a.finished for a in answers):
        break
      if step == last_step:  # the device stopped every row but the host saw no stop: never expected
        raise RuntimeError(f"decoding made no progress at step {step} with unfinished rows")
      last_step = step
      stop_now = np.array([r < b and answers[r].finished for r in range(bb)])
      limit = min(step + chunk, max_new_tokens)
      state = _decode(params, state, put_batch(stop_now), put_rep(np.int32(limit)), config=config)

    scores = None
    if output_scores:
      all_scores = np.asarray(host_values(state.scores))
      scores = [all_scores[r, :len(a.tokens)] for r, a in enumerate(answers)]
  return GenerationResult(token_ids=[a.tokens for a in answers], finish_reasons=[a.finish_reason for a in answers],
                          texts=None if tokenizer is None else [a.text for a in answers], scores=scores,
                          prompt_lengths=[len(r) for r in rows])


class _RowEvents:
  """One row's `StreamEvent`s: the tokens and text (`streaming.AnswerStream`'s pieces) not yet handed out."""

  def __init__(self, row: int, answer: AnswerStream):
    self.row, self.answer, self.pending, self.sent_tokens, self.closed = row, answer, "", 0, False

  def take(self) -> Optional[StreamEvent]:
    """The delta since the last event (None when there is nothing new, or the row's last event was sent)."""
    if self.closed:
      return None
    new_tokens = tuple(self.answer.tokens[self.sent_tokens:])
    finished = self.answer.finished
    if not new_tokens and not self.pending and not finished:
      return None
    text = None if self.answer.tokenizer is None else self.pending
    self.pending, self.sent_tokens, self.closed = "", len(self.answer.tokens), finished
    return StreamEvent(self.row, new_tokens, text, self.answer.finish_reason)


def host_values(tree):
  """`jax.device_get` that also works on arrays spanning other processes' devices (a multi-process mesh: the
  batch rows live on every host). Those are all-gathered (`multihost_utils.process_allgather`, a collective:
  every process must call this in the same order, as every process runs the same `generate`)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)
