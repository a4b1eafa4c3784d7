"""The one exception type for a bad sample, with a reason from a fixed set so skips can be counted."""

REASONS = (
    "missing_file",            # image path does not exist
    "unreadable_image",        # truncated, not an image, decompression bomb, unsupported mode
    "malformed_conversation",  # empty, one-sided, non-alternating, unknown role, non-string value
    "image_mismatch",          # number of images != number of <image> placeholders
    "too_long",                # cannot be truncated without cutting an image run / losing all answers
    "no_supervised_tokens",    # nothing left for the loss after truncation
    "caption_without_image",   # a captions-only ('plain') template on a row without an image
)


class SampleError(ValueError):
  """A sample that cannot be used. `reason` is one of REASONS; `sample_id` names it when known."""

  def __init__(self, reason: str, message: str, sample_id=None):
    if reason not in REASONS:
      raise ValueError(f"unknown SampleError reason {reason!r}; add it to REASONS")
    self.reason = reason
    self.sample_id = sample_id
    super().__init__(f"[{reason}]" + (f" sample {sample_id!r}:" if sample_id is not None else "") + f" {message}")
