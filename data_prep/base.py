"""`VideoTextBuilder`: the shared TFDS builder for video-text datasets (frames + captions).

Stable interface for dataset builders (the four real datasets and the synthetic one subclass it)
-----------------------------------------------------------------------------------------------
A builder lives in a package found by `python -m data_prep.build NAME`: `data_prep/builders/NAME/`
(whose `__init__` imports e.g. `NAME_dataset_builder.py`) or `data_prep/NAME/builder.py`:

    class MsrVtt(base.VideoTextBuilder):
      name = "msrvtt"                       # TFDS name and `python -m data_prep.build` name
      VERSION = tfds.core.Version("1.0.0")
      RELEASE_NOTES = {"1.0.0": "Initial release."}
      BUILDER_CONFIGS = base.default_configs(num_frames=12)   # first = default
      SPLITS = ("train", "test")
      EVAL_SPLIT = "test"                   # the split evaluation uses
      HAS_TIMESTAMPS = False                # True adds the `timestamps` feature
      REQUIRED_FILES = ("MSRVTT_data.json", ...)   # relative to the manual dir, checked first
      MANUAL_DOWNLOAD_INSTRUCTIONS = "where to get it, the expected layout"

      def _split_items(self, manual_dir: epath.Path | None) -> dict[str, list[VideoItem]]:
        ...  # read annotations; self.skips.add(kind, split, where, detail) for malformed entries

Instead of `_split_items` a builder may implement `_list_items(manual_dir, split, skips)` (one split
at a time; the default `_split_items` calls it for each of SPLITS). Every split is listed before
any frame is extracted, so a bad annotation file fails fast. A builder may extend
`check_raw_data(manual_dir)` (call super) to check files REQUIRED_FILES cannot express.

Each `VideoItem` is one video: its id, expected file path (None when no file was found), captions,
optional per-caption (start, end) seconds and an optional frame window. The base class does the
rest: checks the manual directory and REQUIRED_FILES before anything is written (`RawDataError`
naming the missing file and the instructions), drops invalid captions (non-string, non-UTF-8, empty;
counted), skips duplicate ids, extracts frames in `workers` processes (`frames.extract_many`), skips
and counts bad videos by `frames.VideoError.kind`, and yields examples (key = video id) with the
features of docs/ARCHITECTURE.md "Datasets":

    video_id    Text
    frames      Sequence(Image(shape=(R, R, 3), encoding_format="jpeg"), length=F)
    frame_mask  Tensor(shape=(F,), int32)          1 = real frame, 0 = black padding
    captions    Sequence(Text)
    timestamps  Tensor(shape=(None, 2), float32)   only when HAS_TIMESTAMPS
    duration    Scalar(float32)                    seconds

The info's metadata records fps, num_frames, resolution, jpeg_quality and has_timestamps.
A builder that needs no manual directory (synthetic data) sets `REQUIRES_MANUAL_DIR = False`; its
`_split_items` then receives the manual dir the caller gave, or None.
Constructor: `Builder(config=..., data_dir=..., workers=1, progress=True)`; `manual_dir` goes to
`download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))`, or use
`data_prep.build.build(...)`. After a build, `builder.skips` holds the skip log and
`builder.build_summary()` the summary dict.

A split whose every video is skipped stops the build with `EmptySplitError` (a `RawDataError`).

Skip kinds: the video kinds of `frames.VIDEO_ERROR_KINDS` ("missing", "empty", "undecodable",
"truncated") and the annotation kinds "empty_caption", "non_utf8_caption", "malformed_annotation",
"no_valid_caption" (every caption of a video was dropped), "duplicate_video".
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import os
from typing import Any, Iterator, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from data_prep import frames as frames_lib

log = logging.getLogger(__name__)

ANNOTATION_SKIP_KINDS = ("empty_caption", "non_utf8_caption", "malformed_annotation",
                         "no_valid_caption", "duplicate_video")
SKIP_KINDS = frames_lib.VIDEO_ERROR_KINDS + ANNOTATION_SKIP_KINDS


class RawDataError(FileNotFoundError):
  """The raw dataset (manual dir or an annotation file) is missing or unreadable as a whole."""


class EmptySplitError(RawDataError):
  """Every video of a split was skipped: the build stops (TFDS cannot write an empty split)."""


@dataclasses.dataclass(eq=False)
class VideoTextConfig(tfds.core.BuilderConfig):
  """Builder config: frames per second, frames kept (F), resolution (R), JPEG quality."""
  fps: float = 1.0
  num_frames: int = 12
  resolution: int = 224
  jpeg_quality: int = 95

  @property
  def frame_options(self) -> frames_lib.FrameOptions:
    """The `frames.FrameOptions` this config stands for."""
    return frames_lib.FrameOptions(fps=self.fps, num_frames=self.num_frames,
                                   resolution=self.resolution, jpeg_quality=self.jpeg_quality)


def config_name(fps: float, num_frames: int, resolution: int, jpeg_quality: int = 95) -> str:
  """Config name that encodes every field, e.g. `f12_r224_fps1_q95` (so configs never collide)."""
  return f"f{num_frames}_r{resolution}_fps{fps:g}_q{jpeg_quality}".replace(".", "p")


def make_config(fps: float = 1.0, num_frames: int = 12, resolution: int = 224,
                jpeg_quality: int = 95) -> VideoTextConfig:
  """A `VideoTextConfig` named by `config_name`; validates the values."""
  frames_lib.FrameOptions(fps, num_frames, resolution, jpeg_quality)  # validates
  return VideoTextConfig(
      name=config_name(fps, num_frames, resolution, jpeg_quality),
      description=(f"{num_frames} frames sampled at {fps:g} fps, {resolution}x{resolution} "
                   f"JPEG (quality {jpeg_quality})"),
      fps=fps, num_frames=num_frames, resolution=resolution, jpeg_quality=jpeg_quality)


def default_configs(num_frames: int) -> list[VideoTextConfig]:
  """The default configs of a dataset: 1 fps, `num_frames` frames, 224 px (docs/method.md §6)."""
  return [make_config(num_frames=num_frames)]


@dataclasses.dataclass
class VideoItem:
  """One video as listed by a dataset's annotations.

  Attributes:
    video_id: the dataset's id; unique within a split (the example key).
    path: video file, or None when no file was found for this id (counted as "missing").
    captions: every caption of the video (DiDeMo/ActivityNet: one per segment, in time order);
      entries may still be invalid (bytes, empty, non-UTF-8) - the base class drops and counts them.
    timestamps: per-caption (start, end) seconds, same length as captions (HAS_TIMESTAMPS builders).
    window: optional (start, end) seconds to sample frames from.
    where: where the annotation came from (file name), for skip messages.
  """
  video_id: str
  path: str | None
  captions: list[Any]
  timestamps: list[tuple[float, float]] | None = None
  window: tuple[float, float] | None = None
  where: str = ""


class SkipLog:
  """Counts skipped items by kind and keeps (split, kind, where, detail) records for the summary."""

  def __init__(self, max_records_per_kind: int = 1000):
    self.counts: collections.Counter[str] = collections.Counter()
    self.by_split: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    self.records: list[dict[str, str]] = []
    self._max_records = max_records_per_kind

  def add(self, kind: str, split: str, where: str, detail: str = "") -> None:
    """Records one skipped item (a video, a caption or an annotation entry) and logs it."""
    if kind not in SKIP_KINDS:
      raise ValueError(f"unknown skip kind {kind!r}; expected one of {SKIP_KINDS}")
    self.counts[kind] += 1
    self.by_split[split][kind] += 1
    if self.counts[kind] <= self._max_records:
      self.records.append({"split": split, "kind": kind, "where": where, "detail": detail})
    log.warning("skipped (%s) in split %s: %s%s", kind, split, where,
                f": {detail}" if detail else "")

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready summary: totals by kind, by split and by kind, and the kept records."""
    return {"by_kind": dict(sorted(self.counts.items())),
            "by_split": {s: dict(sorted(c.items())) for s, c in sorted(self.by_split.items())},
            "records": list(self.records)}


def _has_lone_surrogate(text: str) -> bool:
  try:
    text.encode("utf-8")
    return False
  except UnicodeEncodeError:
    return True


def check_caption(caption: Any) -> tuple[str | None, str | None]:
  """Validates one caption; returns (clean text, None) or (None, skip kind).

  Bytes must decode as UTF-8; text must not carry lone surrogates (what `surrogateescape` decoding
  of non-UTF-8 bytes leaves behind); surrounding whitespace is stripped and the result must be
  non-empty. Anything that is neither str nor bytes is a malformed annotation.
  """
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError:
      return None, "non_utf8_caption"
  if not isinstance(caption, str):
    return None, "malformed_annotation"
  if _has_lone_surrogate(caption):
    return None, "non_utf8_caption"
  caption = caption.strip()
  if not caption:
    return None, "empty_caption"
  return caption, None


class VideoTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base TFDS builder for (video, captions) datasets; see the module docstring for the contract."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS: list[VideoTextConfig] = default_configs(num_frames=12)
  SPLITS: Sequence[str] = ("train", "test")
  EVAL_SPLIT = "test"
  HAS_TIMESTAMPS = False
  REQUIRES_MANUAL_DIR = True
  REQUIRED_FILES: Sequence[str] = ()
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the raw dataset in the manual directory."

  def __init__(self, *, workers: int = 1, progress: bool = True, **kwargs):
    """Args: workers: frame-extraction processes; progress: tqdm bars; kwargs: TFDS builder args."""
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.workers = workers
    self.progress = progress
    self.skips = SkipLog()
    self.split_counts: dict[str, int] = {}

  # TFDS's own `code_path` needs the `importlib_resources` backport (absent here) for builders
  # nested deeper than one package level; the file of the class is all it has to find.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    """The file that defines the builder class (TFDS looks for metadata files beside it)."""
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  # ---------------------------------------------------------------- info
  @property
  def video_config(self) -> VideoTextConfig:
    """The builder config, typed."""
    config = self.builder_config
    if not isinstance(config, VideoTextConfig):
      raise TypeError(f"{self.name}: builder config must be a VideoTextConfig, got {config!r}")
    return config

  def _features(self) -> tfds.features.FeaturesDict:
    c = self.video_config
    features = {
        "video_id": tfds.features.Text(),
        "frames": tfds.features.Sequence(
            tfds.features.Image(shape=(c.resolution, c.resolution, 3), encoding_format="jpeg"),
            length=c.num_frames),
        "frame_mask": tfds.features.Tensor(shape=(c.num_frames,), dtype=np.int32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "duration": tfds.features.Scalar(dtype=np.float32),
    }
    if self.HAS_TIMESTAMPS:
      features["timestamps"] = tfds.features.Tensor(shape=(None, 2), dtype=np.float32)
    return tfds.features.FeaturesDict(features)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.video_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or self.name).strip().splitlines()[0],
        features=self._features(),
        metadata=tfds.core.MetadataDict(fps=c.fps, num_frames=c.num_frames,
                                        resolution=c.resolution, jpeg_quality=c.jpeg_quality,
                                        has_timestamps=self.HAS_TIMESTAMPS),
    )

  # ---------------------------------------------------------------- raw data
  def check_raw_data(self, manual_dir: str | os.PathLike | None) -> epath.Path | None:
    """Fails at once, naming the expected path, if the manual dir or an annotation file is missing.

    Returns:
      The manual directory as a path (None for builders that need none).

    Raises:
      RawDataError: with the expected path and MANUAL_DOWNLOAD_INSTRUCTIONS.
    """
    if not self.REQUIRES_MANUAL_DIR:
      return epath.Path(manual_dir) if manual_dir else None
    how = f"\nHow to obtain it:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
    if not manual_dir:
      raise RawDataError(f"{self.name}: no manual directory given (--manual_dir).{how}")
    path = epath.Path(manual_dir)
    if not path.is_dir():
      raise RawDataError(f"{self.name}: manual directory {path} does not exist.{how}")
    for name in self.REQUIRED_FILES:
      if not (path / name).exists():
        raise RawDataError(
            f"{self.name}: expected annotation file {path / name} is missing.{how}")
    return path

  def _list_items(self, manual_dir: epath.Path | None, split: str,
                  skips: SkipLog) -> list[VideoItem]:
    """Lists the videos of one split (subclass hook). See the module docstring."""
    raise NotImplementedError

  def _split_items(self, manual_dir: epath.Path | None) -> dict[str, list[VideoItem]]:
    """Lists every split's videos; default: `_list_items` for each of SPLITS."""
    return {split: self._list_items(manual_dir, split, self.skips) for split in self.SPLITS}

  # ---------------------------------------------------------------- generation
  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """TFDS `download_and_prepare`; remembers the manual dir the caller gave (None if none).

    TFDS substitutes `<data_dir>/downloads/manual` for a missing one; builders see only what the
    user passed, so "no manual directory" gets a clear message (or, for builders that need none,
    None).
    """
    self._given_manual_dir = download_config.manual_dir if download_config else None
    return super().download_and_prepare(download_dir=download_dir,
                                        download_config=download_config, **kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # the manual dir comes from download_and_prepare
    manual_dir = self.check_raw_data(getattr(self, "_given_manual_dir", None))
    self.skips = SkipLog()
    self.split_counts = {}
    # Every split is listed before any frame is extracted, so a bad annotation file fails fast.
    items = self._split_items(manual_dir)
    return {split: self._generate_examples(split, split_items)
            for split, split_items in items.items()}

  def _valid_items(self, split: str, items: Sequence[VideoItem]) -> list[VideoItem]:
    """Drops invalid captions and duplicate ids (counted); returns the items still usable."""
    seen: set[str] = set()
    valid = []
    for item in items:
      where = item.where or (item.path or item.video_id)
      if item.video_id in seen:
        self.skips.add("duplicate_video", split, where, f"video id {item.video_id} listed twice")
        continue
      if item.timestamps is not None and len(item.timestamps) != len(item.captions):
        self.skips.add("malformed_annotation", split, where,
                       f"{item.video_id}: {len(item.captions)} captions but "
                       f"{len(item.timestamps)} timestamps")
        continue
      captions, stamps = [], []
      for i, caption in enumerate(item.captions):
        text, kind = check_caption(caption)
        if kind:
          self.skips.add(kind, split, where, f"{item.video_id} caption {i}: {caption!r:.80}")
          continue
        captions.append(text)
        if item.timestamps is not None:
          stamps.append(item.timestamps[i])
      if not captions:
        self.skips.add("no_valid_caption", split, where, f"{item.video_id}: no caption left")
        continue
      seen.add(item.video_id)
      valid.append(dataclasses.replace(
          item, captions=captions, timestamps=stamps if item.timestamps is not None else None))
    return valid

  def _generate_examples(self, split: str,
                         items: Sequence[VideoItem]) -> Iterator[tuple[str, dict[str, Any]]]:
    items = self._valid_items(split, items)
    options = self.video_config.frame_options
    jobs = []
    for index, item in enumerate(items):
      if item.path is None:
        self.skips.add("missing", split, item.where or item.video_id,
                       f"no video file found for {item.video_id}")
        continue
      jobs.append((index, item.path, item.window))
    count = 0
    for index, result in frames_lib.extract_many(
        jobs, options, workers=self.workers, total=len(jobs),
        desc=f"{self.name} {split}", progress=self.progress):
      item = items[index]
      if isinstance(result, frames_lib.VideoError):
        self.skips.add(result.kind, split, result.path, result.detail)
        continue
      example = {
          "video_id": item.video_id,
          "frames": result.frames,
          "frame_mask": result.mask,
          "captions": item.captions,
          "duration": np.float32(result.duration),
      }
      if self.HAS_TIMESTAMPS:
        example["timestamps"] = np.asarray(item.timestamps, np.float32).reshape(-1, 2)
      count += 1
      yield item.video_id, example
    self.split_counts[split] = count
    if count == 0:
      raise EmptySplitError(
          f"{self.name}: split {split!r} has no usable video ({len(items)} listed with valid "
          f"captions; skipped: {dict(self.skips.by_split[split])}). Check the manual directory "
          f"layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")

  # ---------------------------------------------------------------- report
  def build_summary(self) -> dict[str, Any]:
    """Examples per split and skipped items by kind (JSON-ready) of this process's last build."""
    c = self.video_config
    return {
        "dataset": self.name,
        "config": c.name,
        "version": str(self.version),
        "fps": c.fps, "num_frames": c.num_frames, "resolution": c.resolution,
        "jpeg_quality": c.jpeg_quality,
        "data_path": os.fspath(self.data_path),
        "examples": dict(self.split_counts),
        "skipped": self.skips.as_dict(),
    }
