"""How the command line reports a user's mistake: one line `error: ...` on stderr, exit status 2, no traceback.

`run(main)` replaces `absl.app.run(main)`. User errors are `errors.UserError` (raised anywhere below), a
`--config` file that cannot be loaded (ml_collections defers that error until the config is first used), and
a `--config.a.b` override naming no field (ml_collections raises it, with its "Did you mean", while absl
parses the flags). `--verbose` prints the traceback before the line. absl's own flag and usage errors keep
absl's format; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import app, flags

from llava_jax import config_files
from llava_jax.errors import UserError

EXIT_USER_ERROR = 2

_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the full traceback (not only its one line).")


def _verbose(argv: Sequence[str]) -> bool:
  if flags.FLAGS.is_parsed():
    return bool(_VERBOSE.value)
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)  # parsing failed


def fail(message: str, argv: Sequence[str] = ()) -> NoReturn:
  """Print `error: message` (one line) and exit with EXIT_USER_ERROR; the current traceback first if --verbose."""
  if _verbose(argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _override_error(error: Exception, argv: Sequence[str]) -> str:
  """ml_collections' KeyError for `--config.a.tpyo` (wrapped in an AttributeError) → a readable message."""
  inner = error.args[0] if error.args else error
  text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
  text = " ".join(str(text).split())
  key = text.split("'")[1] if text.count("'") >= 2 else ""
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and "." in a and
               key and key in a.split("=", 1)[0].split(".")), None)
  where = f"{flag}: " if flag else ""
  if not key:
    return f"{where}{text}"
  hint = text[text.index("'", 1) + 1:].strip()  # 'Did you mean "template" instead of "tmplate"?', when close
  return f"{where}the config has no field {key!r}" + (f"; {hint[0].lower()}{hint[1:]}" if hint else "")


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, with a `--config.a.b` override that names no field as a one-line user error."""
  argv = config_files.resolve_argv(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: a KeyError, or an AttributeError wrapping one
    from_override = isinstance(e, KeyError) or (e.args and isinstance(e.args[0], KeyError))
    if not from_override or not any(a.startswith("--") and "." in a.split("=", 1)[0] for a in argv[1:]):
      raise
    fail(_override_error(e, argv), argv)


def loaded_config(flag_name: str = "config"):
  """The value of a config-file flag, raising UserError when the file could not be loaded."""
  holder = flags.FLAGS[flag_name]
  config = holder.value
  if config is None or isinstance(config, ml_collections.ConfigDict):
    return config
  try:
    config.get  # ml_collections' stand-in for a config that failed to load raises on any attribute
  except OSError as e:
    filename = getattr(holder, "config_filename", None) or "?"
    path = filename.split(":", 1)[0]
    cause = e.__cause__ or e
    if not os.path.exists(path):
      raise UserError(f"--{flag_name}={filename}: no such file") from e
    reason = str(cause).strip().splitlines()[-1].strip()
    raise UserError(f"--{flag_name}={filename}: cannot load it ({reason})") from e
  return config


def run(main: Callable[[Sequence[str]], object]) -> None:
  """`absl.app.run(main)` reporting UserError as one line (see the module docstring)."""

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      fail(str(e), argv)

  app.run(guarded, flags_parser=parse_flags)
