"""Procedural clips for the synthetic captioned-video set: one shape moving over a plain background.

Why a torus. Every clip lives on a wrap-around canvas: the object moves a random distance in a
straight line, and what leaves one edge re-enters at the opposite one. The start position is
uniform on the torus, so the object's position in ANY single frame is uniform for every direction
(and for "still"): no frame alone, first, middle or last, tells which way the object moves. Only
the order of frames does. A left-moving clip is also, frame for frame, the time reversal of a
right-moving clip with another start, so even the unordered SET of frames has the same
distribution for both directions: order-blind pooling (meanP) cannot read the direction, a
temporal model (seqTransf) can. `docs/synthetic.md` states this; `tests/synthetic_test.py`
checks it.

All arrays are uint8 RGB, `[T, H, W, 3]`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

# Attribute vocabularies, in a fixed order (a config picks a prefix of each, so a smaller config is
# a subset of a larger one and the seed-to-clip mapping is stable).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: Mapping[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "white": (245, 245, 245),
    "purple": (150, 55, 205),
    "orange": (245, 140, 20),
}
# Backgrounds come from their own palette so an object never vanishes into its background.
BACKGROUNDS: Mapping[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "gray": (128, 128, 128),
    "brown": (105, 65, 35),
    "teal": (20, 110, 110),
    "pink": (235, 160, 190),
}
# Object size: radius as a fraction of the frame side.
SIZES: Mapping[str, float] = {"small": 0.09, "large": 0.17}
# Unit step per clip, in (x, y) image coordinates (y grows downwards).
DIRECTIONS: Mapping[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
OPPOSITE: Mapping[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}

_SUPERSAMPLE = 3  # anti-aliasing: coverage from a 3x3 grid of sub-pixel samples


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Everything that determines one clip's pixels.

  Attributes:
    shape, colour, size, background, direction: attribute names (keys of the tables above).
    start: (x, y) object centre in the first frame, fractions of the side in [0, 1).
    distance: path length over the whole clip, fraction of the side (0 for "still").
  """

  shape: str
  colour: str
  size: str
  background: str
  direction: str
  start: tuple[float, float]
  distance: float

  def centre(self, t: float) -> tuple[float, float]:
    """Object centre at clip time `t` in [0, 1], fractions of the side, wrapped to [0, 1)."""
    dx, dy = DIRECTIONS[self.direction]
    return ((self.start[0] + dx * self.distance * t) % 1.0,
            (self.start[1] + dy * self.distance * t) % 1.0)

  def to_dict(self) -> dict:
    """JSON-ready attributes (written to the annotation file)."""
    return {"shape": self.shape, "colour": self.colour, "size": self.size,
            "background": self.background, "direction": self.direction,
            "start": [float(self.start[0]), float(self.start[1])],
            "distance": float(self.distance)}


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
  """Boolean inside-mask of `shape` at offsets (dx, dy) from its centre (same units as radius)."""
  if shape == "circle":
    return dx * dx + dy * dy <= radius * radius
  if shape == "square":
    half = radius * 0.886  # same area as the circle
    return np.maximum(np.abs(dx), np.abs(dy)) <= half
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= radius * 1.25
  if shape == "triangle":
    # Upward equilateral triangle with circumradius 1.3 r, centroid at the origin.
    rc = radius * 1.3
    y0 = rc / 2  # base line (y grows downwards)
    slope = np.sqrt(3.0)
    return (dy <= y0) & (dy >= -rc + slope * np.abs(dx))
  if shape == "cross":
    arm, width = radius * 1.1, radius * 0.38
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= arm) & (ay <= width)) | ((ay <= arm) & (ax <= width))
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_frame(spec: ClipSpec, t: float, resolution: int) -> np.ndarray:
  """Renders the clip at time `t` in [0, 1]: uint8 `[resolution, resolution, 3]`.

  Distances are measured on the torus, so a shape crossing an edge shows on both sides.
  """
  if spec.shape not in SHAPES:
    raise ValueError(f"unknown shape {spec.shape!r}; known: {SHAPES}")
  n = resolution * _SUPERSAMPLE
  grid = (np.arange(n, dtype=np.float64) + 0.5) / n  # sub-pixel centres, fractions of the side
  cx, cy = spec.centre(t)
  dx = (grid[None, :] - cx + 0.5) % 1.0 - 0.5  # signed wrap-around offsets
  dy = (grid[:, None] - cy + 0.5) % 1.0 - 0.5
  inside = _coverage(spec.shape, dx, dy, SIZES[spec.size]).astype(np.float32)
  alpha = inside.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))
  fg = np.asarray(COLOURS[spec.colour], np.float32)
  bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
  img = bg + alpha[..., None] * (fg - bg)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_clip(spec: ClipSpec, num_frames: int, resolution: int) -> np.ndarray:
  """Renders `num_frames` evenly spaced frames covering the clip: uint8 `[T, R, R, 3]`."""
  if num_frames < 2:
    raise ValueError(f"num_frames must be >= 2 to show motion, got {num_frames}")
  times = np.linspace(0.0, 1.0, num_frames)
  return np.stack([render_frame(spec, float(t), resolution) for t in times])


def object_centroid(frames: np.ndarray, background: Sequence[int]) -> np.ndarray:
  """Circular-mean centre of the non-background pixels of each frame: `[T, 2]` (x, y) in [0, 1).

  A frame-level measurement used by the tests (and usable on decoded frames): pixels whose colour
  differs from the background by more than 40 (L1 over RGB) count as object. The circular mean
  handles objects split across an edge.
  """
  frames = np.asarray(frames, np.int32)
  t, h, w, _ = frames.shape
  diff = np.abs(frames - np.asarray(background, np.int32)).sum(-1) > 40  # [T, H, W]
  out = np.zeros((t, 2))
  for axis, size, col in ((2, w, 0), (1, h, 1)):
    ang = 2 * np.pi * (np.arange(size) + 0.5) / size
    weight = diff.sum(axis=3 - axis)  # [T, size]: object pixels per column (x) or row (y)
    s = (weight * np.sin(ang)).sum(-1)
    c = (weight * np.cos(ang)).sum(-1)
    out[:, col] = (np.arctan2(s, c) / (2 * np.pi)) % 1.0
  return out


def wrapped_displacement(centroids: np.ndarray) -> np.ndarray:
  """Mean frame-to-frame displacement on the torus: `[2]` (dx, dy), fractions of the side.

  The frame-order-aware feature: its sign gives the direction, which no single frame does.
  """
  d = np.diff(np.asarray(centroids), axis=0)
  d = (d + 0.5) % 1.0 - 0.5
  return d.mean(axis=0)
