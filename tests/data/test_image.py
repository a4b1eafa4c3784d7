"""Image loading and CLIP preprocessing against transformers' CLIPImageProcessorPil and the reference's rules."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import image as image_lib
from llava_jax.data.errors import SampleError
from tests import fixtures

PHOTOS = ("astronaut", "chelsea", "coffee")


def _hf_processor(size):
  """transformers' PIL-backend CLIP processor (the one LLaVA used; the torchvision one is a different resize)."""
  from transformers import CLIPImageProcessorPil
  return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _hf_pixels(processor, pil_image):
  out = processor(images=pil_image, return_tensors="np")["pixel_values"]
  assert out.shape[0] == 1
  return out[0].transpose(1, 2, 0)  # CHW -> HWC


def _reference_expand2square(pil_img, background_color):
  """LLaVA v1.5 (llava/mm_utils.py) pad rule, written with PIL paste as the reference does."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  if width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  result = Image.new(pil_img.mode, (height, height), background_color)
  result.paste(pil_img, ((height - width) // 2, 0))
  return result


def _crops(photo):
  h, w = photo.shape[:2]
  return {
      "full": photo,
      "wide": photo[: h // 3, :],            # landscape strip
      "tall": photo[:, : w // 4 + 1],        # portrait strip, odd width
      "odd": photo[3: 3 + 101, 7: 7 + 263],  # odd sizes both ways
      "tiny": photo[:2, :3],
      "1x1": photo[:1, :1],
  }


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name", PHOTOS)
def test_square_matches_clip_image_processor(name, size):
  processor = _hf_processor(size)
  for crop_name, crop in _crops(fixtures.photo(name)).items():
    pil = Image.fromarray(np.ascontiguousarray(crop))
    ours = image_lib.preprocess(pil, image_size=size, aspect_ratio="square")
    ref = _hf_pixels(processor, pil)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=f"{name}/{crop_name}")
    # the array input path gives the same values
    np.testing.assert_array_equal(image_lib.preprocess(np.ascontiguousarray(crop), image_size=size), ours)


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name", PHOTOS)
def test_pad_matches_reference_expand2square_then_processor(name, size):
  processor = _hf_processor(size)
  background = tuple(int(x * 255) for x in processor.image_mean)
  assert background == (122, 116, 104) == image_lib.pad_background()
  for crop_name, crop in _crops(fixtures.photo(name)).items():
    pil = Image.fromarray(np.ascontiguousarray(crop))
    ours = image_lib.preprocess(pil, image_size=size, aspect_ratio="pad")
    ref = _hf_pixels(processor, _reference_expand2square(pil, background))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=f"{name}/{crop_name}")


def test_pad_differs_from_square_on_non_square_and_shows_background():
  photo = fixtures.photo("coffee")[:100, :300]  # 3:1 landscape -> 100 rows of pad above and below
  pad = image_lib.preprocess(Image.fromarray(photo), image_size=224, aspect_ratio="pad")
  square = image_lib.preprocess(Image.fromarray(photo), image_size=224, aspect_ratio="square")
  assert np.abs(pad - square).max() > 0.5
  mean, std = np.array(image_lib.CLIP_MEAN, np.float32), np.array(image_lib.CLIP_STD, np.float32)
  expected_bg = (np.float32(np.array([122, 116, 104]) / 255) - mean) / std
  np.testing.assert_allclose(pad[0], np.broadcast_to(expected_bg, (224, 3)), atol=1e-6)
  np.testing.assert_allclose(pad[-1], np.broadcast_to(expected_bg, (224, 3)), atol=1e-6)


def test_preprocess_rejects_bad_arguments():
  pil = Image.new("RGB", (4, 4))
  with pytest.raises(ValueError, match="aspect_ratio"):
    image_lib.preprocess(pil, image_size=224, aspect_ratio="crop")
  with pytest.raises(ValueError, match="image_size"):
    image_lib.preprocess(pil, image_size=0)
  with pytest.raises(TypeError):
    image_lib.preprocess("not an image", image_size=224)


def test_preprocess_batch_stacks():
  photos = [Image.fromarray(fixtures.photo(n)) for n in PHOTOS]
  batch = image_lib.preprocess_batch(photos, image_size=56, aspect_ratio="pad")
  assert batch.shape == (3, 56, 56, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[1], image_lib.preprocess(photos[1], image_size=56, aspect_ratio="pad"))
  assert image_lib.preprocess_batch([], image_size=56).shape == (0, 56, 56, 3)


def _hf_uint8_processor(size):
  """The same PIL processor with rescale and normalize off: the resized + cropped image, uint8."""
  from transformers import CLIPImageProcessorPil
  return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               do_rescale=False, do_normalize=False)


@pytest.mark.parametrize("aspect_ratio", ["square", "pad"])
def test_uint8_half_then_batch_normalize_matches_clip_image_processor(aspect_ratio):
  """What the data workers ship (`preprocess_uint8`) is the processor's image before rescale + normalize,
  and `normalize_batch` over the stacked batch gives the processor's float32 pixels."""
  size = 56
  processor, processor_uint8 = _hf_processor(size), _hf_uint8_processor(size)
  background = image_lib.pad_background()
  images, want, want_uint8 = [], [], []
  for name in PHOTOS:
    for crop_name, crop in _crops(fixtures.photo(name)).items():
      if crop_name in ("tiny", "1x1"):
        continue
      pil = Image.fromarray(np.ascontiguousarray(crop))
      ref_input = _reference_expand2square(pil, background) if aspect_ratio == "pad" else pil
      ours = image_lib.preprocess_uint8(pil, image_size=size, aspect_ratio=aspect_ratio)
      ref_uint8 = _hf_pixels(processor_uint8, ref_input)
      assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
      assert ref_uint8.dtype == np.uint8
      np.testing.assert_array_equal(ours, ref_uint8, err_msg=f"{name}/{crop_name}")
      images.append(ours)
      want.append(_hf_pixels(processor, ref_input))
  batch = image_lib.normalize_batch(np.stack(images))
  assert batch.dtype == np.float32 and batch.shape == (len(images), size, size, 3)
  np.testing.assert_allclose(batch, np.stack(want), atol=1e-5, rtol=0)


def test_normalize_batch_is_normalize_bit_for_bit():
  """Every uint8 level in every channel (the table is exhaustive), a photo batch, custom mean/std, `out=`."""
  a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  levels = np.stack([a, b, (a + 3 * b) % 256], -1).astype(np.uint8)  # [256, 256, 3]: every level, every channel
  assert all(len(np.unique(levels[..., c])) == 256 for c in range(3))
  np.testing.assert_array_equal(image_lib.normalize_batch(levels), image_lib.normalize(levels))
  # the formula written out as transformers' rescale (float64 multiply, cast) then normalize in float32
  x = levels.astype(np.float64) * (1 / 255)
  want = (x.astype(np.float32) - np.float32(image_lib.CLIP_MEAN)) / np.float32(image_lib.CLIP_STD)
  np.testing.assert_array_equal(image_lib.normalize_batch(levels), want)
  photos = np.stack([fixtures.photo(n)[:300, :400] for n in PHOTOS])
  mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
  out = np.full(photos.shape, np.nan, np.float32)
  assert image_lib.normalize_batch(photos, mean, std, out=out) is out
  np.testing.assert_array_equal(out, image_lib.normalize(photos, mean, std))
  assert image_lib.normalize_batch(photos[:0]).shape == (0, 300, 400, 3)
  with pytest.raises(ValueError, match="uint8"):
    image_lib.normalize_batch(photos.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    image_lib.normalize_batch(photos[..., :2])
  with pytest.raises(ValueError, match="out must be"):
    image_lib.normalize_batch(photos, out=np.zeros(photos.shape, np.float64))


def test_bounded_resize_stays_within_one_level(monkeypatch):
  """Extreme aspect ratios take a bounded path; it must agree with the reference to one 8-bit level."""
  processor = _hf_processor(224)
  photo = fixtures.photo("chelsea")
  monkeypatch.setattr(image_lib, "MAX_WORK_PIXELS", 1000)  # force the bounded path on ordinary crops
  one_level = 1 / 255 / min(image_lib.CLIP_STD) + 1e-5
  for crop in (photo[:20, :], photo[:, :17], photo[:250, :40]):
    pil = Image.fromarray(np.ascontiguousarray(crop))
    diff = np.abs(image_lib.preprocess(pil, image_size=224) - _hf_pixels(processor, pil))
    assert diff.max() <= one_level
    assert (diff > 1e-5).mean() < 0.01


def test_extreme_aspect_ratio_is_bounded():
  # 1 x 100000: the reference would build a 224 x 22.4M intermediate (or a 100000^2 pad canvas).
  row = np.tile(np.arange(256, dtype=np.uint8), 391)[:100000]
  wide = Image.fromarray(np.ascontiguousarray(np.repeat(row[None, :, None], 3, axis=-1)))
  assert wide.size == (100000, 1)
  for aspect in ("square", "pad"):
    out = image_lib.preprocess(wide, image_size=56, aspect_ratio=aspect)
    assert out.shape == (56, 56, 3) and np.isfinite(out).all()
  tall = wide.transpose(Image.Transpose.TRANSPOSE)
  assert image_lib.preprocess(tall, image_size=56).shape == (56, 56, 3)


# ---------------------------------------------------------------------------------------------- loading


def _png_bytes(image, **kw):
  buf = io.BytesIO()
  image.save(buf, format="PNG", **kw)
  return buf.getvalue()


def _reason(excinfo):
  return excinfo.value.reason


def test_load_from_path_bytes_pil_and_array(tmp_path):
  photo = fixtures.photo("chelsea")
  path = tmp_path / "cat.png"
  Image.fromarray(photo).save(path)
  for source in (str(path), path, path.read_bytes(), Image.open(path), photo, io.BytesIO(path.read_bytes())):
    image = image_lib.load_image(source)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), photo)


def test_missing_file(tmp_path):
  with pytest.raises(SampleError) as e:
    image_lib.load_image(tmp_path / "nope.jpg", sample_id="s1")
  assert _reason(e) == "missing_file" and e.value.sample_id == "s1" and "nope.jpg" in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
  buf = io.BytesIO()
  Image.fromarray(fixtures.photo("coffee")).save(buf, format=fmt)
  path = tmp_path / f"cut.{fmt.lower()}"
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(SampleError) as e:
    image_lib.load_image(path)
  assert _reason(e) == "unreadable_image" and "truncated" in str(e.value)
  with pytest.raises(SampleError) as e:
    image_lib.load_image(path.read_bytes())
  assert _reason(e) == "unreadable_image"


def test_not_an_image(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("this is not a jpeg\n")
  with pytest.raises(SampleError) as e:
    image_lib.load_image(path)
  assert _reason(e) == "unreadable_image" and "not a readable image" in str(e.value)
  with pytest.raises(SampleError) as e:
    image_lib.load_image(tmp_path)  # a directory
  assert _reason(e) == "unreadable_image"
  with pytest.raises(SampleError):
    image_lib.load_image(b"")


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
  values = np.array([[0, 257, 1000], [30000, 40000, 65535]], np.uint16)
  path = tmp_path / "depth.png"
  Image.fromarray(values).save(path)
  assert Image.open(path).mode.startswith("I")
  loaded = np.asarray(image_lib.load_image(path))
  expected = np.array([[0, 1, 4], [117, 156, 255]], np.uint8)  # round(v * 255 / 65535)
  np.testing.assert_array_equal(loaded, np.repeat(expected[..., None], 3, axis=-1))
  # PIL's own convert('RGB') clips: everything >= 255 becomes white; we must not.
  assert np.asarray(Image.open(path).convert("RGB"))[1, 0, 0] == 255
  np.testing.assert_array_equal(np.asarray(image_lib.load_image(values)), loaded)  # uint16 array path


def test_cmyk_follows_reference_convert(tmp_path):
  rgb = fixtures.photo("astronaut")[:64, :48]
  path = tmp_path / "print.jpg"
  Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
  assert Image.open(path).mode == "CMYK"
  loaded = image_lib.load_image(path)
  np.testing.assert_array_equal(np.asarray(loaded), np.asarray(Image.open(path).convert("RGB")))
  assert np.abs(np.asarray(loaded).astype(int) - rgb).mean() < 8  # and it really is the picture


def test_alpha_modes_drop_alpha_like_reference_or_composite_like_transformers(tmp_path):
  from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
  rng = np.random.default_rng(0)
  rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
  cases = {
      "RGBA": Image.fromarray(rgba),
      "LA": Image.fromarray(rgba[..., :2].copy(), mode="LA"),
      "P": Image.fromarray(rgba[..., :3].copy()).convert("P"),
  }
  for mode, image in cases.items():
    if mode == "P":
      image.info["transparency"] = image.getpixel((0, 0))  # a palette index that is really used
    path = tmp_path / f"{mode}.png"
    image.save(path)
    reopened = Image.open(path)
    assert reopened.mode == mode
    dropped = image_lib.load_image(path)
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(Image.open(path).convert("RGB")), err_msg=mode)
    white = image_lib.load_image(path, alpha_background=(255, 255, 255))
    np.testing.assert_array_equal(np.asarray(white), hf_convert_to_rgb(Image.open(path), return_numpy=True),
                                  err_msg=mode)
    assert not np.array_equal(np.asarray(white), np.asarray(dropped)), mode
  # RGBA arrays go through the same rule
  np.testing.assert_array_equal(np.asarray(image_lib.load_image(rgba)), rgba[..., :3])


def test_gray_and_bilevel(tmp_path):
  gray = fixtures.photo("coffee")[..., 1]
  np.testing.assert_array_equal(np.asarray(image_lib.load_image(gray)), np.repeat(gray[..., None], 3, -1))
  bits = gray > 128
  path = tmp_path / "bits.png"
  Image.fromarray(bits).save(path)
  assert Image.open(path).mode == "1"
  loaded = np.asarray(image_lib.load_image(path))
  np.testing.assert_array_equal(loaded, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1))


def test_one_by_one(tmp_path):
  path = tmp_path / "dot.png"
  Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
  image = image_lib.load_image(path)
  assert image.size == (1, 1)
  out = image_lib.preprocess(image, image_size=224)
  np.testing.assert_allclose(out, _hf_pixels(_hf_processor(224), image), atol=1e-5)


def test_oversized_rejected_before_decode(tmp_path):
  path = tmp_path / "big.png"
  Image.new("RGB", (300, 200)).save(path)
  with pytest.raises(SampleError) as e:
    image_lib.load_image(path, max_pixels=50_000)
  assert _reason(e) == "unreadable_image" and "max_pixels" in str(e.value)
  assert image_lib.load_image(path, max_pixels=60_000).size == (300, 200)
  # a header claiming 9000 x 9000 (under PIL's own limit) over 30 bytes of data: our guard fires, no decode
  data = bytearray(_png_bytes(Image.new("L", (1, 1))))
  import struct
  import zlib
  ihdr = data[12:29]
  ihdr[4:12] = struct.pack(">II", 9000, 9000)
  data[12:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
  assert Image.open(io.BytesIO(bytes(data))).size == (9000, 9000)
  with pytest.raises(SampleError) as e:
    image_lib.load_image(bytes(data), max_pixels=1 << 24)
  assert _reason(e) == "unreadable_image" and "81000000 pixels" in str(e.value)
  with pytest.raises(SampleError):  # arrays are checked too
    image_lib.load_image(np.zeros((300, 200, 3), np.uint8), max_pixels=100)


def test_pil_decompression_bomb_is_a_sample_error(tmp_path, monkeypatch):
  path = tmp_path / "bomb.png"
  Image.new("RGB", (100, 100)).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 x 1000: PIL raises DecompressionBombError
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with pytest.raises(SampleError) as e:
      image_lib.load_image(path, max_pixels=None)
  assert _reason(e) == "unreadable_image" and "decompression bomb" in str(e.value)


def test_exif_orientation_applied(tmp_path):
  photo = fixtures.photo("astronaut")[:40, :64]
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  path = tmp_path / "phone.png"
  Image.fromarray(photo).save(path, exif=exif)
  loaded = image_lib.load_image(path)
  assert loaded.size == (40, 64)
  np.testing.assert_array_equal(np.asarray(loaded), np.rot90(photo, k=-1))
  raw = image_lib.load_image(path, exif_transpose=False)
  np.testing.assert_array_equal(np.asarray(raw), photo)


def test_bad_arrays_and_types():
  with pytest.raises(SampleError) as e:
    image_lib.load_image(np.zeros((4, 4, 3), np.float32))
  assert _reason(e) == "unreadable_image"
  with pytest.raises(SampleError):
    image_lib.load_image(np.zeros((4, 4, 5), np.uint8))
  with pytest.raises(SampleError):
    image_lib.load_image(np.zeros((0, 4, 3), np.uint8))
  with pytest.raises(SampleError):
    image_lib.load_image(Image.new("F", (3, 3)))
  with pytest.raises(TypeError):
    image_lib.load_image(12345)
