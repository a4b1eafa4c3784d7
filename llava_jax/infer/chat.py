"""`--mode=chat`: a multi-turn conversation about an image in the terminal, answers streamed as generated.

As the reference CLI (llava/serve/cli.py): one image per conversation, the first message carries it
(`<image>\\n` + text), each answer is kept (stripped) in the history, temperature 0.2 and 512 new tokens by
default. Commands:
  /image PATH   load a new image (`~` is expanded) and start a new conversation about it
  /reset        start a new conversation (same image)
  /help, /quit  (EOF or Ctrl-D quits too)
From a terminal it prompts `USER: ` / `ASSISTANT: `; from a pipe it reads lines until EOF and writes only the
answers, each followed by a newline (an empty line for a message that cannot be answered; notes and errors
go to stderr).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, TextIO

import numpy as np

from llava_jax.data import conversation as conv_lib
from llava_jax.data.errors import SampleError
from llava_jax.infer import generate as gen
from llava_jax.infer.streaming import AnswerStream

HELP = ("commands: /image PATH (new conversation about that image), /reset (new conversation, same image), "
        "/quit")


class _Done(Exception):
  """Ends generation from the stream callback once the answer has finished."""


class ChatError(ValueError):
  """A message that cannot be answered (conversation too long, bad image, ...); the session goes on."""


class ChatSession:
  """The conversation state: history, the current image, and how to answer the next message.

  model: an `infer.loading.InferenceModel`. temperature / top_p / max_new_tokens as in generate (0 = greedy);
  the seed of turn i is seed + i, so a session is reproducible.
  """

  def __init__(self, model, *, temperature: float = 0.2, top_p: float = 1.0, max_new_tokens: int = 512,
               seed: int = 0, steps_per_chunk: int = 4):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 <= top_p <= 1:
      raise ValueError(f"temperature must be >= 0 and top_p in [0, 1], got {temperature}, {top_p}")
    self.model = model
    self.temperature, self.top_p, self.max_new_tokens = float(temperature), float(top_p), int(max_new_tokens)
    self.seed, self.steps_per_chunk = int(seed), int(steps_per_chunk)
    self.pixels: Optional[np.ndarray] = None  # [S, S, 3]
    self.image_path: Optional[str] = None
    self.turns: List[dict] = []
    self.asked = 0

  def set_image(self, path: str) -> None:
    """Load `path` (`~` expanded) and start a new conversation about it (the current one stays if the image is
    bad)."""
    path = os.path.expanduser(path)
    try:
      pixels = self.model.image_pixels(path)
    except SampleError as e:
      raise ChatError(str(e)) from None
    self.pixels, self.image_path = pixels, path
    self.reset()

  def reset(self) -> None:
    self.turns = []

  def prompt_ids(self, text: str) -> np.ndarray:
    """Prompt ids for the history plus the user message `text`."""
    if conv_lib.IMAGE_TOKEN in text:
      raise ChatError(f"messages cannot contain {conv_lib.IMAGE_TOKEN}; load images with /image PATH")
    value = text if self.turns or self.pixels is None else conv_lib.IMAGE_TOKEN + "\n" + text
    turns = self.turns + [{"from": "human", "value": value}]
    try:
      return self.model.encode(turns, num_images=0 if self.pixels is None else 1)
    except SampleError as e:
      raise ChatError(str(e)) from None

  def ask(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
    """Answer `text` (streaming pieces to `on_text`), add the exchange to the history, return the answer."""
    text = text.strip()
    if not text:
      raise ChatError("empty message")
    ids = self.prompt_ids(text)
    room = self.model.max_positions - len(ids)
    if room < 1:
      raise ChatError(f"the conversation is {len(ids)} tokens long, the model takes {self.model.max_positions}: "
                      "/reset to start over")
    out = AnswerStream(self.model.tokenizer, self.model.stop_token_ids, self.model.stop_strings,
                       min(self.max_new_tokens, room))

    def stream(event: gen.StreamEvent) -> None:
      piece = out.add(event.token_ids)
      if not out.finished and event.finish_reason is not None:
        piece += out.finish()
      if piece and on_text is not None:
        on_text(piece)
      if out.finished:
        raise _Done  # a stop string ends generation here (stop tokens end it on the device)

    try:
      gen.generate(self.model.config, self.model.params, [ids], None if self.pixels is None else self.pixels[None],
                   max_new_tokens=out.max_tokens, temperature=self.temperature, top_p=self.top_p,
                   stop_token_ids=self.model.stop_token_ids, seed=self.seed + self.asked, stream_callback=stream,
                   mesh=self.model.mesh, steps_per_chunk=self.steps_per_chunk)
    except _Done:
      pass
    if not out.finished:
      piece = out.finish()
      if piece and on_text is not None:
        on_text(piece)
    self.asked += 1
    answer = out.text.strip()
    if answer:  # an empty answer cannot be a turn of the history: the exchange is not kept
      first = not self.turns and self.pixels is not None
      self.turns += [{"from": "human", "value": conv_lib.IMAGE_TOKEN + "\n" + text if first else text},
                     {"from": "gpt", "value": answer}]
    return answer


def run_chat(model, *, image: Optional[str] = None, temperature: float = 0.2, top_p: float = 1.0,
             max_new_tokens: int = 512, seed: int = 0, stdin: TextIO = None, stdout: TextIO = None,
             stderr: TextIO = None, interactive: Optional[bool] = None) -> int:
  """The chat loop; returns the process exit code (0; 1 when --image cannot be loaded).

  interactive: prompt and echo roles (default: whether stdin and stdout are terminals).
  """
  stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
  if interactive is None:
    interactive = stdin.isatty() and stdout.isatty()
  session = ChatSession(model, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

  def say(msg: str) -> None:
    print(msg, file=stderr, flush=True)

  if image:
    try:
      session.set_image(image)
    except ChatError as e:
      say(f"error: {e}")
      return 1
  if interactive:
    say(f"{model.name} ({model.template.name} template){', image ' + image if image else ''}. {HELP}")
    if interactive and stdin is sys.stdin:
      try:
        import readline  # noqa: F401  (line editing and history for input())
      except ImportError:
        pass

  def read_line() -> Optional[str]:
    if interactive:
      try:
        return input("USER: ") if stdin is sys.stdin else _prompted_readline(stdin, stdout, "USER: ")
      except EOFError:
        return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")

  while True:
    try:
      line = read_line()
    except KeyboardInterrupt:
      line = None
    if line is None:
      if interactive:
        stdout.write("\n")
      return 0
    text = line.strip()
    if not text:
      continue
    if text.startswith("/"):
      command, _, arg = text.partition(" ")
      arg = arg.strip()
      if command in ("/quit", "/exit"):
        return 0
      if command == "/help":
        say(HELP)
      elif command == "/reset":
        session.reset()
        say("new conversation" + (f" about {session.image_path}" if session.image_path else ""))
      elif command == "/image":
        if not arg:
          say("usage: /image PATH")
          continue
        try:
          session.set_image(arg)
          say(f"new conversation about {arg}")
        except ChatError as e:
          say(f"error: {e}")
      else:
        say(f"unknown command {command}; {HELP}")
      continue
    if interactive:
      stdout.write("ASSISTANT: ")
      stdout.flush()

    def write(piece: str) -> None:
      stdout.write(piece)
      stdout.flush()

    try:
      session.ask(text, write)
    except ChatError as e:
      stdout.write("\n")  # piped: an empty answer line keeps answers aligned with messages
      stdout.flush()
      say(f"error: {e}")
      continue
    except KeyboardInterrupt:
      stdout.write("\n")
      say("[interrupted; the message was dropped]")
      continue
    stdout.write("\n")
    stdout.flush()


def _prompted_readline(stdin: TextIO, stdout: TextIO, prompt: str) -> str:
  stdout.write(prompt)
  stdout.flush()
  line = stdin.readline()
  if line == "":
    raise EOFError
  return line.rstrip("\n")
