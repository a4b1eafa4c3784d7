"""Reading an image file from a path that may be hostile: never blocking, never raising an OS error.

`read_image_file(path, max_bytes=...)` returns the bytes of a regular file or raises SampleError
('missing_file' | 'unreadable_image') naming the OS error, so a data pipeline can count it as a skip. It is what
`image.load_image` uses for paths (PIL then decodes the bytes from memory).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional, Union

from llava_jax.data.errors import SampleError
from llava_jax.limits import MAX_IMAGE_BYTES


# OS errors that mean "there is no such file" (a path component that is a regular file, `a.png/x.png`, is
# ENOTDIR); every other OS error is 'unreadable_image'.
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_CHUNK = 1 << 20


def read_image_file(path: Union[str, os.PathLike], *, max_bytes: Optional[int] = MAX_IMAGE_BYTES,
                    sample_id=None) -> bytes:
  """The bytes of the regular file at `path`, read without blocking and with a bound.

  The path is stat'ed first (following symlinks) and only a regular file is opened (O_NONBLOCK, O_NOCTTY), so a
  FIFO, socket, device or directory is refused without touching it; the opened file is fstat'ed again (it may
  have been replaced meanwhile), its size checked against `max_bytes`, and at most `max_bytes` bytes are read
  (a file that grows past it while being read is refused too).
  Raises SampleError('missing_file') when the file does not exist (ENOENT, ENOTDIR: `a.png/x.png` with a.png a
  file), SampleError('unreadable_image') for every other failure (name too long, symlink loop, NUL byte in the
  path or one the file system cannot encode, permission, not a regular file, too large, I/O error). Never an
  OSError.
  """
  try:
    path = os.fspath(path)
  except TypeError:
    raise TypeError(f"read_image_file: expected a path, got {type(path).__name__}") from None
  shown = show_path(path)
  if ("\0" if isinstance(path, str) else b"\0") in path:
    raise SampleError("unreadable_image", f"image path {shown} contains a NUL byte", sample_id)
  try:
    _check_regular_file(os.stat(path), shown, max_bytes, sample_id)
    fd = os.open(path, _OPEN_FLAGS)
  except OSError as e:
    raise _os_error(e, shown, sample_id) from None
  except ValueError as e:  # e.g. a lone surrogate that the file system encoding cannot encode
    raise SampleError("unreadable_image", f"image path {shown} is not a valid file name: {e}", sample_id) from None
  try:
    _check_regular_file(os.fstat(fd), shown, max_bytes, sample_id)
    limit = None if max_bytes is None else int(max_bytes)
    chunks, total = [], 0
    while True:
      chunk = os.read(fd, _READ_CHUNK if limit is None else min(_READ_CHUNK, limit + 1 - total))
      if not chunk:
        break
      chunks.append(chunk)
      total += len(chunk)
      if limit is not None and total > limit:
        raise SampleError("unreadable_image", f"image file {shown} grew above max_bytes={limit} while being read",
                          sample_id)
    return b"".join(chunks)
  except OSError as e:
    raise _os_error(e, shown, sample_id) from None
  finally:
    os.close(fd)


def _check_regular_file(st: os.stat_result, shown: str, max_bytes: Optional[int], sample_id) -> int:
  """st.st_size, or SampleError('unreadable_image') when st is not a regular file or is above max_bytes."""
  if not stat.S_ISREG(st.st_mode):
    raise SampleError("unreadable_image", f"image path {shown} is not a regular file ({_file_kind(st.st_mode)})",
                      sample_id)
  if max_bytes is not None and st.st_size > max_bytes:
    raise SampleError("unreadable_image", f"image file {shown} is {st.st_size} bytes, above max_bytes={max_bytes}",
                      sample_id)
  return int(st.st_size)


def _file_kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
    if test(mode):
      return name
  return f"file type {stat.S_IFMT(mode):#o}"


def _os_error(e: OSError, shown: str, sample_id) -> SampleError:
  code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
  if e.errno == errno.ENOENT:
    return SampleError("missing_file", f"image file not found: {shown}", sample_id)
  if e.errno in _MISSING_ERRNOS:
    return SampleError("missing_file", f"image file not found: {shown} ({code}: {e.strerror})", sample_id)
  return SampleError("unreadable_image", f"cannot read image file {shown}: {code}: {e.strerror or e}", sample_id)


def show_path(path, limit: int = 200) -> str:
  """The path for a message: repr'd (NUL bytes and control characters visible), long ones cut in the middle."""
  text = repr(path)
  return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(path)} chars)"
