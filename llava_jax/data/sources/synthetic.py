"""Synthetic visual QA: seeded images of coloured shapes with questions whose answers the image fixes.

Scene: a `grid x grid` board on a white background; 1..max_shapes cells (distinct) each hold one shape
(circle, square or triangle, pointing up) in one of COLORS, drawn with PIL without antialiasing (every shape
pixel has exactly its palette colour), scaled to 55-80 % of the cell and kept inside it, so the cell a pixel
falls in names its position. Positions: 'top left', 'top right', 'bottom left', 'bottom right' (grid 2);
rows top/middle/bottom x columns left/center/right, the middle one 'center' (grid 3).

Questions (answers are one short phrase, fully determined by the image):
  color    "What color is the shape at the {pos}?"          -> "red"
  shape    "What shape is at the {pos}?"                     -> "circle"
  count    "How many shapes are there?" / "How many {color} shapes are there?" / "How many {shape}s are
           there?"                                           -> "2" (digits, may be "0")
  position "Where is the {color} {shape}?" (only for a colour+shape pair that occurs once) -> "top left"
  exists   "Is there a {color} {shape}?"                     -> "yes" / "no"
style='caption' gives stage-1 (plain template) samples: the caption lists the shapes in row-major cell order,
"a red circle", "a red circle and a blue square", "a red circle, a blue square and a green triangle"; with
caption_positions=True each shape is followed by its cell, "a red circle at the top left and a blue square at
the bottom right" (captions that bind what to where, which the questions then ask about).

Sample i depends only on (seed, i) (numpy SeedSequence([seed, i])), so any worker regenerates it identically.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.data.sources.base import check_index

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
QUESTION_KINDS = ("color", "shape", "count", "position", "exists")
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?", "List the shapes in the image.")


def position_names(grid: int) -> List[List[str]]:
  """Names of the grid cells, `[row][col]`."""
  if grid == 2:
    return [["top left", "top right"], ["bottom left", "bottom right"]]
  if grid == 3:
    names = [[f"{r} {c}" for c in ("left", "center", "right")] for r in ("top", "middle", "bottom")]
    names[1][1] = "center"
    return names
  raise ValueError(f"grid={grid}; choose 2 or 3")


def caption_of(objects: Sequence[dict], with_positions: bool = False) -> str:
  """'a red circle', 'a red circle and a blue square', 'a red circle, a blue square and a green triangle';
  with_positions: 'a red circle at the top left and a blue square at the bottom right'."""
  where = lambda o: f" at the {o['position']}" if with_positions else ""
  parts = [f"a {o['color']} {o['shape']}{where(o)}" for o in sorted(objects, key=lambda o: (o["row"], o["col"]))]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_scene(objects: Sequence[dict], image_size: int) -> Image.Image:
  """RGB image of the objects (each with 'shape', 'color' and an integer 'bbox' (x0, y0, x1, y1), inclusive)."""
  image = Image.new("RGB", (image_size, image_size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  for o in objects:
    x0, y0, x1, y1 = o["bbox"]
    fill = COLORS[o["color"]]
    if o["shape"] == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o["shape"] == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
      draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
  return image


class SyntheticShapesSource:
  """`num_samples` seeded shape scenes with visual questions (style='qa') or captions (style='caption').

  image_size: side of the square image in pixels (>= 8 * grid so that shapes stay recognisable).
  multi_turn: False -> one question per sample; True -> 2..max_turns distinct questions (one conversation).
  grid: 2 (4 positions) or 3 (9 positions); max_shapes: 1..grid*grid shapes per image (default min(4, cells)).
  kinds: the question kinds to draw from (QUESTION_KINDS).
  caption_positions: captions name each shape's cell ('a red circle at the top left').

  Record: {"id": "shapes-{seed}-{i}", "conversations": [...] ("<image>\\n" opens the first human turn),
  "images": [PIL RGB image], "meta": {"questions": [...], "answers": [...] (one per gpt turn, the exact
  expected text), "kinds": [...], "objects": [{"shape", "color", "row", "col", "position", "bbox"}],
  "caption"}}.
  """

  def __init__(self, num_samples: int, seed: int = 0, *, image_size: int = 224, multi_turn: bool = False,
               max_turns: int = 3, style: str = "qa", grid: int = 2, max_shapes: int | None = None,
               kinds: Sequence[str] = QUESTION_KINDS, caption_positions: bool = False):
    if num_samples < 0:
      raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if style not in ("qa", "caption"):
      raise ValueError(f"style={style!r}; choose 'qa' or 'caption'")
    self.positions = position_names(grid)
    if image_size < 8 * grid:
      raise ValueError(f"image_size={image_size} is too small for a {grid}x{grid} grid (need >= {8 * grid})")
    max_shapes = min(4, grid * grid) if max_shapes is None else max_shapes
    if not 1 <= max_shapes <= grid * grid:
      raise ValueError(f"max_shapes={max_shapes}; need 1..{grid * grid}")
    unknown = set(kinds) - set(QUESTION_KINDS)
    if unknown or not kinds:
      raise ValueError(f"kinds={tuple(kinds)!r}; choose from {QUESTION_KINDS}")
    if multi_turn and max_turns < 2:
      raise ValueError(f"multi_turn needs max_turns >= 2, got {max_turns}")
    self.num_samples, self.seed, self.image_size = int(num_samples), int(seed), int(image_size)
    self.multi_turn, self.max_turns, self.style = bool(multi_turn), int(max_turns), style
    self.grid, self.max_shapes, self.kinds = int(grid), int(max_shapes), tuple(kinds)
    self.caption_positions = bool(caption_positions)
    self.image_root = None

  def __len__(self) -> int:
    return self.num_samples

  def __getitem__(self, index) -> dict:
    i = check_index(index, self.num_samples)
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, i]))
    objects = self._scene(rng)
    image = draw_scene(objects, self.image_size)
    caption = caption_of(objects, self.caption_positions)
    if self.style == "caption":
      prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
      qa = [("caption", prompt, caption)]
    else:
      n_turns = int(rng.integers(2, self.max_turns + 1)) if self.multi_turn else 1
      qa = self._questions(rng, objects, n_turns)
    conversations = []
    for t, (_, question, answer) in enumerate(qa):
      conversations.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
      conversations.append({"from": "gpt", "value": answer})
    public_objects = [{k: o[k] for k in ("shape", "color", "row", "col", "position", "bbox")} for o in objects]
    return {"id": f"shapes-{self.seed}-{i}", "conversations": conversations, "images": [image],
            "meta": {"questions": [q for _, q, _ in qa], "answers": [a for _, _, a in qa],
                     "kinds": [k for k, _, _ in qa], "objects": public_objects, "caption": caption}}

  def _scene(self, rng) -> List[dict]:
    n_cells = self.grid * self.grid
    n = int(rng.integers(1, self.max_shapes + 1))
    cells = sorted(rng.choice(n_cells, size=n, replace=False).tolist())
    cell = self.image_size / self.grid
    color_names = list(COLORS)
    objects = []
    for c in cells:
      row, col = divmod(c, self.grid)
      side = int(cell * rng.uniform(0.55, 0.8))
      # top-left corner such that the whole box stays inside the cell with a 1-pixel margin
      cx0, cy0 = int(np.ceil(col * cell)) + 1, int(np.ceil(row * cell)) + 1
      cx1, cy1 = int(np.floor((col + 1) * cell)) - 2, int(np.floor((row + 1) * cell)) - 2
      side = max(3, min(side, cx1 - cx0, cy1 - cy0))
      x0 = int(rng.integers(cx0, cx1 - side + 1))
      y0 = int(rng.integers(cy0, cy1 - side + 1))
      objects.append({"shape": SHAPES[rng.integers(len(SHAPES))], "color": color_names[rng.integers(len(COLORS))],
                      "row": row, "col": col, "position": self.positions[row][col],
                      "bbox": (x0, y0, x0 + side, y0 + side)})
    return objects

  def _questions(self, rng, objects: List[dict], n_turns: int) -> List[Tuple[str, str, str]]:
    pairs = [(o["color"], o["shape"]) for o in objects]
    unique = [o for o in objects if pairs.count((o["color"], o["shape"])) == 1]
    asked, out = set(), []
    for _ in range(50 * n_turns):
      if len(out) == n_turns:
        break
      kind = self.kinds[rng.integers(len(self.kinds))]
      if kind == "position" and not unique:
        continue
      question, answer = self._ask(rng, kind, objects, unique)
      if question not in asked:
        asked.add(question)
        out.append((kind, question, answer))
    return out

  def _ask(self, rng, kind, objects, unique) -> Tuple[str, str]:
    pick = objects[rng.integers(len(objects))]
    if kind == "color":
      return f"What color is the shape at the {pick['position']}?", pick["color"]
    if kind == "shape":
      return f"What shape is at the {pick['position']}?", pick["shape"]
    if kind == "position":
      o = unique[rng.integers(len(unique))]
      return f"Where is the {o['color']} {o['shape']}?", o["position"]
    if kind == "count":
      variant = rng.integers(3)
      if variant == 0:
        return "How many shapes are there?", str(len(objects))
      if variant == 1:
        color = list(COLORS)[rng.integers(len(COLORS))]
        return f"How many {color} shapes are there?", str(sum(o["color"] == color for o in objects))
      shape = SHAPES[rng.integers(len(SHAPES))]
      return f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objects))
    # exists: half the time a pair that is present, else a random pair (present or not)
    if rng.integers(2) == 0:
      color, shape = pick["color"], pick["shape"]
    else:
      color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    present = any(o["color"] == color and o["shape"] == shape for o in objects)
    return f"Is there a {color} {shape}?", "yes" if present else "no"
