"""Image loading (hostile-file safe) and CLIP preprocessing in numpy/PIL.

`load_image` turns a path, encoded bytes, PIL image or uint8 array into an RGB `PIL.Image`, raising
`SampleError` ('missing_file' | 'unreadable_image') for anything that cannot be used. A path is read by
`read_image_file`, which never blocks and never raises an OS error: it opens regular files only (a FIFO, a
directory or a device is refused from its stat, without being opened), checks the size against `max_bytes`
before reading and reads at most that much; PIL then decodes the bytes from memory.

`preprocess` reproduces transformers' PIL-backend `CLIPImageProcessorPil` (the "slow" CLIPImageProcessor the
original LLaVA used; transformers 5 names the torchvision one `CLIPImageProcessor` and falls back to the PIL one
when torchvision is absent) value for value: shortest-edge bicubic resize with PIL (new long edge
`int(size * long / short)`), centre crop at `(H - size) // 2`, rescale in float64 then cast to float32, then
`(x - mean) / std` in float32. With `aspect_ratio='pad'` it first applies LLaVA v1.5's `expand2square`
(a square canvas of the background colour `tuple(int(m * 255) for m in mean)` = (122, 116, 104), image pasted
at offset `(long - short) // 2`). Output is NHWC float32 `[image_size, image_size, 3]`.

The two halves are public so the input pipeline can split them: `preprocess_uint8` (resize / crop / pad, the
per-sample work, uint8 `[S, S, 3]`, what the data workers ship) and `normalize` (rescale + normalize). For
batches, `normalize_batch` gives the same float32 values bit for bit through a 256-entry table per channel
built with `normalize` itself (one gather per channel instead of five float passes).

RGB conversion follows the reference: LLaVA does `Image.open(path).convert('RGB')`, which drops alpha (the
colour under transparent pixels is kept). transformers 5 instead composites transparency onto white; pass
`alpha_background=(255, 255, 255)` for that. 16-bit grayscale ('I;16', 'I') is scaled to 8 bits (v / 257),
where PIL's `convert` would clip every value above 255 to white.
"""
from __future__ import annotations

import functools
import io
import math
import os
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from llava_jax.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from llava_jax.data.errors import SampleError
from llava_jax.data.image_file import read_image_file, show_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_RATIOS = ("square", "pad")

# Images above `limits.MAX_IMAGE_PIXELS` (by default; `max_pixels` per call) are rejected before their pixel data
# is decoded. PIL's own guard (Image.MAX_IMAGE_PIXELS) also applies to larger limits: above 2x it PIL raises,
# which we report the same way.

# Largest intermediate (resized or padded) image `preprocess` materialises in full. Above it (only for
# extreme aspect ratios, e.g. 1 x 100000, or pad canvases of very large photos) a bounded path is taken whose
# values may differ from the reference by one 8-bit level at a few pixels ('square') or by a pre-shrink
# ('pad'); everything else is exact.
MAX_WORK_PIXELS = 1 << 26

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def pad_background(mean: Sequence[float] = CLIP_MEAN) -> Tuple[int, int, int]:
  """LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)` -> (122, 116, 104) for CLIP."""
  return tuple(int(x * 255) for x in mean)


def load_image(source: ImageSource, *, max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
               max_bytes: Optional[int] = MAX_IMAGE_BYTES, exif_transpose: bool = True,
               alpha_background: Optional[Tuple[int, int, int]] = None, sample_id=None) -> Image.Image:
  """Decode `source` into an RGB PIL image.

  source: file path, encoded bytes (or a binary file object), a PIL image, or a uint8 array `[H, W]`,
    `[H, W, 1]` (gray), `[H, W, 2]` (gray + alpha), `[H, W, 3]` (RGB) or `[H, W, 4]` (RGBA); uint16 `[H, W]`
    is 16-bit grayscale.
  max_pixels: reject images with more pixels (checked from the header, before decoding); None disables our
    check (PIL's own bomb guard still applies).
  max_bytes: largest image file read from a path (`read_image_file`); None: no limit.
  exif_transpose: apply the EXIF orientation tag (as transformers' `load_image` does).
  alpha_background: None drops alpha like `convert('RGB')` (the reference); an RGB tuple composites onto it.
  sample_id: only used in error messages.
  Raises SampleError('missing_file') for a path that does not exist, SampleError('unreadable_image') for
  any other failure to read the file (see `read_image_file`), truncated / non-image data, too many pixels or
  an unsupported mode. Other input types raise TypeError.
  """
  if isinstance(source, (str, os.PathLike)):
    data = read_image_file(source, max_bytes=max_bytes, sample_id=sample_id)
    image = _open_and_load(io.BytesIO(data), max_pixels, sample_id, what=show_path(os.fspath(source)))
  elif isinstance(source, (bytes, bytearray, memoryview)):
    image = _open_and_load(io.BytesIO(bytes(source)), max_pixels, sample_id, what="image bytes")
  elif hasattr(source, "read"):
    image = _open_and_load(source, max_pixels, sample_id, what="image stream")
  elif isinstance(source, Image.Image):
    _check_pixels(source.size, max_pixels, sample_id, "PIL image")
    try:
      source.load()
    except Exception as e:  # a lazily opened image can still fail here
      raise SampleError("unreadable_image", f"cannot decode PIL image: {type(e).__name__}: {e}",
                        sample_id) from None
    image = source
  elif isinstance(source, np.ndarray):
    image = _from_array(source, sample_id)
    _check_pixels(image.size, max_pixels, sample_id, "array image")
  else:
    raise TypeError(f"load_image: unsupported source type {type(source).__name__}; expected a path, bytes, "
                    "a PIL image or a uint8 array")
  if exif_transpose:
    try:
      image = ImageOps.exif_transpose(image)
    except Exception as e:  # malformed EXIF block
      raise SampleError("unreadable_image", f"bad EXIF data: {type(e).__name__}: {e}", sample_id) from None
  return to_rgb(image, alpha_background=alpha_background, sample_id=sample_id)


def to_rgb(image: Image.Image, *, alpha_background: Optional[Tuple[int, int, int]] = None,
           sample_id=None) -> Image.Image:
  """Convert a PIL image of any supported mode to 'RGB' (see the module docstring for the rules)."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.float64)
    gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
  if mode == "F":
    raise SampleError("unreadable_image", "floating-point images (mode 'F') are not supported", sample_id)
  has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
  try:
    if alpha_background is not None and has_alpha:
      rgba = image.convert("RGBA")
      canvas = Image.new("RGBA", rgba.size, tuple(alpha_background) + (255,))
      return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
  except (ValueError, OSError) as e:
    raise SampleError("unreadable_image", f"cannot convert mode {mode!r} to RGB: {e}", sample_id) from None


def expand2square(image: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
  """LLaVA v1.5 pad-to-square: the image centred (offset (long - short) // 2) on a square of `background`."""
  image = to_rgb(image)
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = np.empty((side, side, 3), np.uint8)
  canvas[...] = np.asarray(background, np.uint8)
  pixels = np.asarray(image)
  if width > height:
    top = (width - height) // 2
    canvas[top:top + height] = pixels
  else:
    left = (height - width) // 2
    canvas[:, left:left + width] = pixels
  return Image.fromarray(canvas)


def preprocess(image: Union[Image.Image, np.ndarray], *, image_size: int, aspect_ratio: str = "square",
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """CLIP pixels for one image: float32 `[image_size, image_size, 3]` (NHWC without the batch axis).

  image: PIL image (any mode, converted with `to_rgb`) or uint8 array accepted by `load_image`.
  aspect_ratio: 'square' (CLIPImageProcessor as is: shortest-edge resize + centre crop) or 'pad'
    (LLaVA v1.5: `expand2square` with `pad_background(mean)` first).
  Equal to `normalize(preprocess_uint8(image, ...), mean, std)`.
  """
  pixels = preprocess_uint8(image, image_size=image_size, aspect_ratio=aspect_ratio, mean=mean)
  return normalize(pixels, mean, std)


def preprocess_uint8(image: Union[Image.Image, np.ndarray], *, image_size: int, aspect_ratio: str = "square",
                     mean: Sequence[float] = CLIP_MEAN) -> np.ndarray:
  """The image as CLIPImageProcessor has it just before rescale + normalize: uint8 `[image_size, image_size, 3]`.

  Same arguments as `preprocess` (`mean` only sets the 'pad' background colour).
  """
  if aspect_ratio not in ASPECT_RATIOS:
    raise ValueError(f"aspect_ratio={aspect_ratio!r}; choose one of {ASPECT_RATIOS}")
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if isinstance(image, np.ndarray):
    image = load_image(image, max_pixels=None)
  elif isinstance(image, Image.Image):
    image = to_rgb(image)
  else:
    raise TypeError(f"preprocess: expected a PIL image or uint8 array, got {type(image).__name__}")
  if aspect_ratio == "pad":
    side = max(image.size)
    if side * side > MAX_WORK_PIXELS:
      image = _shrink_long_side(image, math.isqrt(MAX_WORK_PIXELS))
    image = expand2square(image, pad_background(mean))
  return _resize_shortest_and_crop(image, int(image_size))


def preprocess_batch(images: Iterable[Union[Image.Image, np.ndarray]], *, image_size: int,
                     aspect_ratio: str = "square", mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """`preprocess` over several images, stacked: float32 `[N, image_size, image_size, 3]` (N may be 0).

  Resizes each image, then normalizes the stack once (`normalize_batch`); values equal `preprocess`'s.
  """
  out = [preprocess_uint8(im, image_size=image_size, aspect_ratio=aspect_ratio, mean=mean) for im in images]
  if not out:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return normalize_batch(np.stack(out), mean, std)


def normalize(pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 `[..., 3]` -> float32 `(pixels / 255 - mean) / std`, rounding exactly as transformers does."""
  scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: Tuple[float, ...], std: Tuple[float, ...]) -> np.ndarray:
  """float32 `[3, 256]`: row c holds `normalize` of the values 0..255 in channel c (read-only)."""
  levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  table = np.ascontiguousarray(normalize(levels, mean, std).T)
  table.setflags(write=False)
  return table


def normalize_batch(pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
  """`normalize` for uint8 `[..., 3]` (e.g. a batch `[N, S, S, 3]`), bit-identical, through a lookup table.

  out: optional float32 array of the same shape to write into (returned).
  """
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim < 1 or pixels.shape[-1] != 3:
    raise ValueError(f"normalize_batch expects uint8 [..., 3] pixels, got {pixels.dtype} {pixels.shape}")
  if out is None:
    out = np.empty(pixels.shape, np.float32)
  elif out.shape != pixels.shape or out.dtype != np.float32:
    raise ValueError(f"out must be float32 {pixels.shape}, got {out.dtype} {out.shape}")
  table = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
  for c in range(3):
    out[..., c] = table[c][pixels[..., c]]
  return out


# Formats PIL hands to an external program instead of decoding itself: EPS runs Ghostscript on the file's
# PostScript (arbitrary code in a data set's "image"). Never opened, whether or not Ghostscript is installed.
EXTERNAL_PROGRAM_FORMATS = frozenset({"EPS"})


@functools.lru_cache(maxsize=None)
def decodable_formats() -> Tuple[str, ...]:
  """PIL's registered formats minus EXTERNAL_PROGRAM_FORMATS: what `Image.open` may identify a file as."""
  Image.init()
  return tuple(f for f in Image.ID if f not in EXTERNAL_PROGRAM_FORMATS)


def _open_and_load(fileobj, max_pixels, sample_id, what: str) -> Image.Image:
  try:
    image = Image.open(fileobj, formats=decodable_formats())
  except Image.DecompressionBombError as e:
    raise SampleError("unreadable_image", f"{what}: decompression bomb rejected by PIL: {e}", sample_id) from None
  except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error, ... from broken headers
    raise SampleError("unreadable_image", f"{what} is not a readable image: {type(e).__name__}: {e}",
                      sample_id) from None
  _check_pixels(image.size, max_pixels, sample_id, what)
  try:
    image.load()
  except Exception as e:  # truncated data, corrupt streams, decoder errors
    raise SampleError("unreadable_image", f"{what} cannot be decoded (truncated or corrupt?): "
                      f"{type(e).__name__}: {e}", sample_id) from None
  return image


def _check_pixels(size, max_pixels, sample_id, what: str):
  width, height = size
  if width <= 0 or height <= 0:
    raise SampleError("unreadable_image", f"{what} has an empty size {width}x{height}", sample_id)
  if max_pixels is not None and width * height > max_pixels:
    raise SampleError("unreadable_image", f"{what} is {width}x{height} = {width * height} pixels, above "
                      f"max_pixels={max_pixels} (decompression-bomb guard)", sample_id)


def _from_array(array: np.ndarray, sample_id) -> Image.Image:
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype == np.uint16 and array.ndim == 2:
    return Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))  # mode 'I;16'
  if array.dtype == np.bool_ and array.ndim == 2:
    array = array.astype(np.uint8) * 255
  if array.dtype != np.uint8:
    raise SampleError("unreadable_image", f"array images must be uint8 (or uint16 grayscale), got {array.dtype}",
                      sample_id)
  channels = 1 if array.ndim == 2 else (array.shape[-1] if array.ndim == 3 else None)
  if channels not in (1, 2, 3, 4):
    raise SampleError("unreadable_image", f"array image shape {array.shape} is not [H, W] or [H, W, 1|2|3|4]",
                      sample_id)
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise SampleError("unreadable_image", f"array image has an empty shape {array.shape}", sample_id)
  image = Image.fromarray(np.ascontiguousarray(array))  # L, LA, RGB or RGBA
  return image


def _shrink_long_side(image: Image.Image, long_side: int) -> Image.Image:
  width, height = image.size
  scale = long_side / max(width, height)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return image.resize(size, Image.Resampling.BICUBIC)


def _resize_shortest_and_crop(image: Image.Image, size: int) -> np.ndarray:
  """uint8 `[size, size, 3]`: PIL bicubic resize of the shortest edge to `size`, then the centre crop.

  Output size and crop offsets follow transformers' `get_resize_output_image_size(default_to_square=False)`
  and `center_crop`.
  """
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if width <= height else (new_long, size)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  if new_w * new_h <= MAX_WORK_PIXELS:
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    return resized[top:top + size, left:left + size]
  return _resize_crop_bounded(image, size, new_w, new_h, top, left)


def _resize_crop_bounded(image, size, new_w, new_h, top, left) -> np.ndarray:
  """The crop of a huge resize without materialising it: PIL's two separable passes (horizontal, then
  vertical, as PIL orders them) restricted with `box` to the source region the crop reads from."""
  width, height = image.size
  sx, sy = width / new_w, height / new_h
  x0, x1 = left * sx, (left + size) * sx
  y0, y1 = top * sy, (top + size) * sy
  # bicubic support is 2 output pixels, i.e. 2 * max(scale, 1) source pixels; keep a safety margin.
  mx, my = 2 * max(sx, 1.0) + 2, 2 * max(sy, 1.0) + 2
  cx0, cx1 = max(0, int(math.floor(x0 - mx))), min(width, int(math.ceil(x1 + mx)))
  cy0, cy1 = max(0, int(math.floor(y0 - my))), min(height, int(math.ceil(y1 + my)))
  strip = image.crop((cx0, cy0, cx1, cy1))
  rows = strip.height
  strip = strip.resize((size, rows), Image.Resampling.BICUBIC, box=(x0 - cx0, 0, x1 - cx0, rows))
  out = strip.resize((size, size), Image.Resampling.BICUBIC, box=(0, y0 - cy0, size, y1 - cy0))
  return np.asarray(out)
