"""COCO annotations → the symbolic image descriptions a text-only teacher sees (the paper's section 3).

Inputs: a COCO captions file (captions_train2017.json: {"images": [{"id", "file_name", "width", "height"}],
"annotations": [{"image_id", "caption"}]}) and optionally an instances file (instances_train2017.json:
{"annotations": [{"image_id", "category_id", "bbox": [x, y, w, h] in pixels}], "categories": [{"id",
"name"}]}).

Context text of one image, as in the paper's examples: the captions one per line, then a blank line and one
line per object box `name: [x1, y1, x2, y2]`, corners as fractions of the image width / height rounded to three
decimals (top-left, bottom-right).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class ImageContext:
  """image_id, file_name, captions, boxes ((category name, (x1, y1, x2, y2) in [0, 1]), ...)."""
  image_id: int
  file_name: str
  captions: Tuple[str, ...]
  boxes: Tuple[Tuple[str, Tuple[float, float, float, float]], ...] = ()

  @property
  def stem(self) -> str:
    name = self.file_name.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name

  def text(self, with_boxes: bool = True) -> str:
    out = "\n".join(c.strip() for c in self.captions)
    if with_boxes and self.boxes:
      out += "\n\n" + "\n".join(f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]" for name, box in self.boxes)
    return out


def normalize_box(bbox: Sequence[float], width: float, height: float) -> Tuple[float, float, float, float]:
  """COCO [x, y, w, h] pixels → (x1, y1, x2, y2) fractions of the image, clipped to [0, 1], 3 decimals."""
  x, y, w, h = (float(v) for v in bbox)
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  clip = lambda v: min(1.0, max(0.0, v))
  return (round(clip(x / width), 3), round(clip(y / height), 3), round(clip((x + w) / width), 3),
          round(clip((y + h) / height), 3))


def _load(path: str) -> dict:
  with open(path, "r", encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
    raise ValueError(f"{path} is not a COCO annotation file (no 'annotations' list)")
  return data


def load_coco(captions_path: str, instances_path: Optional[str] = None, *, limit: int = 0,
              image_ids: Optional[Sequence[int]] = None) -> List[ImageContext]:
  """ImageContexts for the images of the captions file that have at least one caption, in image-id order
  (`image_ids` selects and orders them; `limit` > 0 keeps the first `limit`). Boxes need `instances_path`."""
  caps_data = _load(captions_path)
  images = {int(im["id"]): im for im in caps_data.get("images", [])}
  captions: Dict[int, List[str]] = {}
  for a in caps_data["annotations"]:
    text = a.get("caption")
    if isinstance(text, str) and text.strip():
      captions.setdefault(int(a["image_id"]), []).append(text.strip())
  boxes: Dict[int, List[Tuple[str, Tuple[float, ...]]]] = {}
  if instances_path:
    inst = _load(instances_path)
    names = {int(c["id"]): c["name"] for c in inst.get("categories", [])}
    for im in inst.get("images", []):
      images.setdefault(int(im["id"]), im)
    for a in inst["annotations"]:
      iid = int(a["image_id"])
      im = images.get(iid)
      if im is None or int(a["category_id"]) not in names:
        continue
      boxes.setdefault(iid, []).append((names[int(a["category_id"])],
                                        normalize_box(a["bbox"], im["width"], im["height"])))
  ids = list(image_ids) if image_ids is not None else sorted(captions)
  out = []
  for iid in ids:
    iid = int(iid)
    if iid not in images:
      raise ValueError(f"image id {iid} is not in {captions_path}")
    if iid not in captions:
      continue
    out.append(ImageContext(iid, images[iid]["file_name"], tuple(captions[iid]), tuple(boxes.get(iid, ()))))
    if limit and len(out) >= limit:
      break
  return out
