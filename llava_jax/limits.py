"""Input limits with one value each, shared by training data, eval, chat and the server. Imports nothing."""

# Decoded image size (pixels): larger images are refused before their pixel data is decoded. PIL's
# decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), so PIL itself never warns below it. Config
# `data.max_pixels`; the server's `--max_image_pixels` may lower it for requests.
MAX_IMAGE_PIXELS = 89_478_485

# Image file size (bytes): larger files are refused from their size, before anything is read (128 MiB: far
# above any JPEG of MAX_IMAGE_PIXELS pixels). Config `data.max_image_bytes`.
MAX_IMAGE_BYTES = 1 << 27
