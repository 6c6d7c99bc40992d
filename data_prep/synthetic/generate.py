"""Writes the raw synthetic tree: encoded mp4 clips plus an MSR-VTT-like annotation JSON.

Layout written under `raw_dir` (the builder's `--manual_dir`):

    raw_dir/videos/synth00000.mp4 ...
    raw_dir/annotations.json   {"config": {...}, "videos": [{"video_id", "split", "duration",
                                "fps", "attributes"}],
                                "sentences": [{"video_id", "caption", "sen_id"}]}

Clips come in distractor pairs: the two clips of a pair share shape, colour, size and background
and move in opposite directions (left/right or up/down), with independent random starts, and both
land in the same split. So a caption can only be told from its pair's caption by the direction,
which only the frame order shows (see `render.py`). Within a split, attribute combinations are
drawn without replacement while there are enough of them, so captions in a small test split are
distinct up to paraphrase.

Everything is a function of `SyntheticConfig` (seed included): same config, same bytes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import json
import multiprocessing
import os
from typing import Iterator, Sequence

import av
import numpy as np
from tqdm import tqdm

from data_prep.synthetic import render

SPLITS: tuple[str, ...] = ("train", "val", "test")

_MOTION_PHRASES = {
    "left": ("moves to the left", "slides left", "travels leftwards", "is moving left",
             "goes to the left"),
    "right": ("moves to the right", "slides right", "travels rightwards", "is moving right",
              "goes to the right"),
    "up": ("moves up", "slides upwards", "travels upwards", "is moving up", "rises"),
    "down": ("moves down", "slides downwards", "travels downwards", "is moving down", "sinks"),
    "still": ("stays still", "does not move", "rests in place", "stands still",
              "is motionless"),
}
# {a}: "a small red circle", {m}: motion phrase, {b}: background colour.
_TEMPLATES = (
    "{a} {m} on a {b} background",
    "on a {b} background, {a} {m}",
    "{a} {m} across a {b} screen",
    "there is {a} that {m} over a {b} backdrop",
    "against a {b} background {a} {m}",
    "a video of {a} that {m} on {b}",
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and difficulty of the synthetic set.

  Attributes:
    num_train, num_val, num_test: clips per split (rounded up to whole distractor pairs).
    duration: clip length in seconds; with extraction at 1 fps this gives `duration` frames.
    fps: frame rate of the encoded mp4.
    video_resolution: side of the square mp4 frames (even, for yuv420p).
    num_shapes, num_colours, num_sizes, num_backgrounds: how many values of each attribute are
      used (a prefix of the tables in `render.py`): the difficulty of the non-motion part.
    directions: motion values used; opposite directions form the distractor pairs.
    distance_range: path length over the clip, fraction of the side.
    captions_per_video: paraphrases per clip (distinct templates and phrasings).
    seed: everything derives from it.
  """

  num_train: int = 1024
  num_val: int = 128
  num_test: int = 256
  duration: float = 8.0
  fps: int = 4
  video_resolution: int = 64
  num_shapes: int = 4
  num_colours: int = 6
  num_sizes: int = 2
  num_backgrounds: int = 4
  directions: tuple[str, ...] = ("left", "right", "up", "down")
  distance_range: tuple[float, float] = (0.35, 0.6)
  captions_per_video: int = 3
  seed: int = 0

  def __post_init__(self):
    checks = [
        (1 <= self.num_shapes <= len(render.SHAPES), "num_shapes", len(render.SHAPES)),
        (1 <= self.num_colours <= len(render.COLOURS), "num_colours", len(render.COLOURS)),
        (1 <= self.num_sizes <= len(render.SIZES), "num_sizes", len(render.SIZES)),
        (1 <= self.num_backgrounds <= len(render.BACKGROUNDS), "num_backgrounds",
         len(render.BACKGROUNDS)),
        (1 <= self.captions_per_video <= len(_TEMPLATES), "captions_per_video", len(_TEMPLATES)),
    ]
    for ok, name, hi in checks:
      if not ok:
        raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)} must be in [1, {hi}]")
    for d in self.directions:
      if d not in render.DIRECTIONS:
        raise ValueError(f"SyntheticConfig.directions: unknown direction {d!r}; "
                         f"known: {tuple(render.DIRECTIONS)}")
      if d in render.OPPOSITE and render.OPPOSITE[d] not in self.directions:
        raise ValueError(f"SyntheticConfig.directions: {d!r} needs its opposite "
                         f"{render.OPPOSITE[d]!r} (distractor pairs)")
    if self.video_resolution % 2 or self.video_resolution < 16:
      raise ValueError(f"SyntheticConfig.video_resolution={self.video_resolution} must be even "
                       "and >= 16")
    if min(self.num_train, self.num_val, self.num_test) < 0:
      raise ValueError("SyntheticConfig: split sizes must be >= 0")
    if self.num_encoded_frames < 2:
      raise ValueError(f"SyntheticConfig: duration*fps={self.num_encoded_frames} must be >= 2")
    lo, hi = self.distance_range
    if not 0 < lo <= hi < 1:
      raise ValueError(f"SyntheticConfig.distance_range={self.distance_range} must satisfy "
                       "0 < lo <= hi < 1 (a path of a whole side would look static)")

  @property
  def num_encoded_frames(self) -> int:
    return int(round(self.duration * self.fps))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["directions"] = list(self.directions)
    d["distance_range"] = list(self.distance_range)
    return d


def _motion_groups(directions: Sequence[str]) -> list[tuple[str, ...]]:
  """Direction groups that become distractor sets: (left, right), (up, down), (still,)."""
  groups, seen = [], set()
  for d in directions:
    if d in seen:
      continue
    group = (d, render.OPPOSITE[d]) if d in render.OPPOSITE else (d,)
    seen.update(group)
    groups.append(group)
  return groups


def _combinations(config: SyntheticConfig) -> list[tuple]:
  """Every (shape, colour, size, background, motion group) the config allows, in fixed order."""
  shapes = render.SHAPES[:config.num_shapes]
  colours = tuple(render.COLOURS)[:config.num_colours]
  sizes = tuple(render.SIZES)[:config.num_sizes]
  backgrounds = tuple(render.BACKGROUNDS)[:config.num_backgrounds]
  return [(s, c, z, b, g) for s in shapes for c in colours for z in sizes for b in backgrounds
          for g in _motion_groups(config.directions)]


def make_specs(config: SyntheticConfig) -> dict[str, list[render.ClipSpec]]:
  """Draws every clip of every split: {split: [ClipSpec]}, pairs adjacent, deterministic in seed."""
  rng = np.random.default_rng(config.seed)
  combos = _combinations(config)
  out = {}
  for split, n in zip(SPLITS, (config.num_train, config.num_val, config.num_test)):
    specs: list[render.ClipSpec] = []
    order: list[int] = []
    while len(specs) < n:
      if not order:  # without replacement until exhausted, then a fresh permutation
        order = list(rng.permutation(len(combos)))
      shape, colour, size, background, group = combos[order.pop()]
      for direction in group:
        distance = 0.0 if direction == "still" else float(rng.uniform(*config.distance_range))
        start = (float(rng.uniform()), float(rng.uniform()))
        specs.append(render.ClipSpec(shape, colour, size, background, direction, start,
                                     distance))
    out[split] = specs
  return out


def captions_for(spec: render.ClipSpec, n: int, rng: np.random.Generator) -> list[str]:
  """`n` distinct paraphrases naming every attribute of `spec` (templates without replacement)."""
  templates = rng.choice(len(_TEMPLATES), size=n, replace=False)
  phrases = _MOTION_PHRASES[spec.direction]
  motions = rng.choice(len(phrases), size=n, replace=n > len(phrases))
  subject = f"a {spec.size} {spec.colour} {spec.shape}"
  return [_TEMPLATES[t].format(a=subject, m=phrases[m], b=spec.background)
          for t, m in zip(templates, motions)]


def encode_mp4(frames: np.ndarray, path: str, fps: int) -> None:
  """Writes uint8 `[T, H, W, 3]` frames as an H.264 mp4 (single-threaded: byte-deterministic)."""
  tmp = path + ".partial"
  with av.open(tmp, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1
    stream.codec_context.time_base = fractions.Fraction(1, fps)
    # Constant QP, one thread: x264 output is then a function of the pixels alone. (With CRF rate
    # control a few clips came out with different bytes in identical runs.)
    stream.options = {"qp": "16", "preset": "fast",
                      "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
    for i, frame in enumerate(frames):
      # Convert to yuv420p here, frame by frame: leaving it to `encode` made a few clips' bytes
      # differ between identical runs (the encoder's reused converter), breaking determinism.
      video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
      video_frame.pts = i
      video_frame.time_base = fractions.Fraction(1, fps)
      for packet in stream.encode(video_frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)


def iter_clips(config: SyntheticConfig) -> Iterator[tuple[str, str, render.ClipSpec, list[str]]]:
  """Yields (video_id, split, spec, captions) for every clip, in id order."""
  specs = make_specs(config)
  caption_rng = np.random.default_rng([config.seed, 1])
  index = 0
  for split in SPLITS:
    for spec in specs[split]:
      yield (f"synth{index:05d}", split, spec,
             captions_for(spec, config.captions_per_video, caption_rng))
      index += 1


def _render_and_encode(job: tuple[render.ClipSpec, int, int, int, str]) -> str:
  """Worker job: renders one clip and writes its mp4; returns the path."""
  spec, num_frames, resolution, fps, path = job
  encode_mp4(render.render_clip(spec, num_frames, resolution), path, fps)
  return path


def write_raw(config: SyntheticConfig, raw_dir: str, progress: bool = True,
              workers: int | None = None) -> str:
  """Renders and encodes every clip into `raw_dir` and writes `annotations.json`; returns its path.

  A finished tree (annotation file present with the same config) is reused as is. The annotation
  file is written last, so an interrupted run is redone rather than half-used. Clips are rendered
  in `workers` processes (default: one per CPU); the bytes do not depend on it.
  """
  ann_path = os.path.join(raw_dir, "annotations.json")
  if os.path.exists(ann_path):
    with open(ann_path) as f:
      existing = json.load(f)
    if existing.get("config") == config.to_dict():
      return ann_path
    raise ValueError(f"{ann_path} was written for another config: {existing.get('config')}; "
                     f"wanted {config.to_dict()}. Use an empty --manual_dir.")
  video_dir = os.path.join(raw_dir, "videos")
  os.makedirs(video_dir, exist_ok=True)
  videos, sentences, jobs = [], [], []
  for video_id, split, spec, captions in iter_clips(config):
    jobs.append((spec, config.num_encoded_frames, config.video_resolution, config.fps,
                 os.path.join(video_dir, f"{video_id}.mp4")))
    videos.append({"video_id": video_id, "split": split, "duration": config.duration,
                   "fps": config.fps, "attributes": spec.to_dict()})
    for caption in captions:
      sentences.append({"video_id": video_id, "caption": caption, "sen_id": len(sentences)})
  workers = (os.cpu_count() or 1) if workers is None else workers
  bar = tqdm(total=len(jobs), disable=not progress, desc="render synthetic clips", unit="clip")
  if workers <= 1 or len(jobs) < 32:
    for job in jobs:
      _render_and_encode(job)
      bar.update(1)
  else:
    # "spawn": the caller may hold threads (TFDS, absl) that make fork unsafe.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      for _ in pool.map(_render_and_encode, jobs, chunksize=16):
        bar.update(1)
  bar.close()
  tmp = ann_path + ".partial"
  with open(tmp, "w") as f:
    json.dump({"config": config.to_dict(), "videos": videos, "sentences": sentences}, f)
  os.replace(tmp, ann_path)
  return ann_path
