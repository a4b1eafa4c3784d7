"""Workdir paths: local directories and etils.epath URLs (gs://, s3://, ...) alike. Imports nothing from the
package, so every layer (data, checkpoints, train) may use it."""
from __future__ import annotations

import os

from etils import epath


def is_url(path) -> bool:
  """True for an epath URL (gs://bucket/run, s3://...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve_dir(path) -> epath.Path:
  """`path` as an epath.Path: URLs as they are, local paths made absolute (orbax needs absolute local paths)."""
  return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(os.fspath(path)))


def join(path, *parts) -> str:
  """`path`/parts as a string, for local paths and URLs alike (os.path.join would not do for gs://)."""
  return os.fspath(epath.Path(path).joinpath(*parts))
