"""The one convention for a user's mistake (a wrong path, a typo in a flag, a missing file): raise `UserError`.

The command line (`llava_jax.main`, via `cli_errors`) prints its message as one line on stderr and exits with
status 2, without a traceback (`--verbose` shows it). Anything else that escapes is a bug and keeps its
traceback. This module imports nothing from the package, so any layer (data, checkpoints, infer) may raise it.
"""
from __future__ import annotations

import os


class UserError(Exception):
  """A mistake the person running the command can fix; the message says what is wrong and what to do."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or a run should hold) does not exist. Still a FileNotFoundError."""


def require_path(path, what: str) -> None:
  """Raise MissingFileError unless `path` exists. what: how the user named it, e.g. '--config.data.json_path'."""
  if path and not os.path.exists(path):
    raise MissingFileError(f"{what}={path}: no such file or directory")


class ConfigError(UserError, ValueError):
  """A flag or config value that cannot work as given (a missing required flag, a config that does not fit the
  checkpoint). Still a ValueError."""
