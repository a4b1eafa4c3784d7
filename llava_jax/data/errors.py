"""The one exception type for a bad sample, with a reason from a fixed set so skips can be counted."""

REASONS = (
    "missing_file",            # image path does not exist (ENOENT, or a path component is a file: ENOTDIR)
    "unreadable_image",        # exists but unusable: not a regular file (directory, FIFO, device), over the byte
                               # limit, symlink loop, name too long, no permission, I/O error, truncated, not an
                               # image, decompression bomb, unsupported mode
    "malformed_conversation",  # empty, one-sided, non-alternating, unknown role, non-string value; an "image" that
                               # is not a non-empty path string without NUL bytes (or a list of them)
    "image_mismatch",          # number of images != number of <image> placeholders
    "too_long",                # cannot be truncated without cutting an image run / losing all answers, or more
                               # images than max_images_per_sample
    "no_supervised_tokens",    # nothing left for the loss after truncation
)


class SampleError(ValueError):
  """A sample that cannot be used.

  reason: one of REASONS. sample_id: the record's id when known. origin: where the record sits in its source
  when known (e.g. "data.jsonl line 13", "index 7"). detail: the message without the prefix.
  """

  def __init__(self, reason: str, message: str, sample_id=None, origin=None):
    if reason not in REASONS:
      raise ValueError(f"unknown SampleError reason {reason!r}; add it to REASONS")
    self.reason = reason
    self.sample_id = sample_id
    self.origin = origin
    self.detail = message
    where = "" if origin is None else f" ({origin})"
    named = f" sample {sample_id!r}{where}:" if sample_id is not None else (f" {origin}:" if origin else "")
    super().__init__(f"[{reason}]{named} {message}")
