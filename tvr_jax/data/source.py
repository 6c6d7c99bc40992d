"""One split of a built TFDS video dataset, readable without TensorFlow.

`VideoSplit.open(data_dir, split)` opens the array_record files that `python -m data_prep.build`
wrote, scans the per-video metadata once (video ids and every caption; frames are left encoded
during the scan) and then serves, by video index `j` in `[0, num_videos)`:

- `read_frames(j) -> (frames uint8 [F, R, R, 3], frame_mask int32 [F])`, JPEG-decoded with Pillow.

The video index is the record's position in the split (TFDS shuffles records at build time, so
it is NOT the order of the raw annotation file); `video_ids[j]` names it. Objects here are
picklable so Grain's worker processes can read in parallel.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import tqdm

CAPTION_MODES = ("random", "all", "paragraph")
"""How captions become text examples (docs/method.md §6):
- "random": one example per video visit, with one of its captions drawn at random;
- "all": every caption is its own example (MSR-VTT and MSVD training; every multi-caption eval);
- "paragraph": one example per video, its captions joined in order (DiDeMo, ActivityNet).
"""


class _KeepEncoded(tfds.decode.Decoder):
  """TFDS decoder that leaves each frame as its JPEG bytes (decoding happens in `decode_frames`).

  TFDS's own `SkipDecoding` has no NumPy path, so it cannot be used without TensorFlow.
  """

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example


def decode_frames(encoded: Sequence[bytes], resolution: int, where: str = "") -> np.ndarray:
  """Decodes JPEG/PNG frames to uint8 `[F, R, R, 3]` with Pillow.

  Raises ValueError naming `where` (dataset, split, video) when a frame is not R x R RGB.
  """
  out = np.empty((len(encoded), resolution, resolution, 3), np.uint8)
  for i, data in enumerate(encoded):
    with Image.open(io.BytesIO(data)) as img:
      if img.mode != "RGB":
        img = img.convert("RGB")
      arr = np.asarray(img)
    if arr.shape != out.shape[1:]:
      raise ValueError(f"{where}: frame {i} has shape {arr.shape}, the dataset declares "
                       f"{out.shape[1:]}")
    out[i] = arr
  return out


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


@dataclasses.dataclass
class VideoSplit:
  """A split of a built dataset plus its caption metadata.

  Attributes:
    data_dir: the TFDS version directory (`.../name/config/version`).
    split: split name ("train", "test", ...).
    name: `name/config/version`, for messages and iterator-state checks (not the path, so a
      dataset that moves keeps its checkpoints valid).
    video_ids: `[num_videos]` dataset ids, by video index.
    captions: `[num_videos]` lists of captions (time order for DiDeMo / ActivityNet).
    num_frames, resolution: F and R of every example.
  """

  data_dir: str
  split: str
  name: str
  video_ids: list[str]
  captions: list[list[str]]
  num_frames: int
  resolution: int

  @classmethod
  def open(cls, data_dir: str | os.PathLike, split: str, dataset: str | None = None,
           config: str | None = None, progress: bool = True) -> "VideoSplit":
    """Opens `split` of a built dataset and scans its captions.

    Args:
      data_dir: with `dataset`: the `--data_dir` of `python -m data_prep.build` (the config and
        newest version are found as `data_prep.reading.dataset_path` does); without: the version
        directory itself, holding `dataset_info.json` (`OUT/msrvtt/f12_r224_fps1_q95/1.0.0`).
      split: a split the builder wrote.
      dataset, config: dataset name (e.g. "msrvtt", "synthetic") and optional config name.
      progress: show a tqdm bar over the metadata scan.

    Raises:
      FileNotFoundError / ValueError naming the directory, split or feature that is wrong.
    """
    if dataset is not None:
      from data_prep import reading  # pylint: disable=import-outside-toplevel
      data_dir = reading.dataset_path(data_dir, dataset, config)
    data_dir = os.fspath(data_dir)
    if not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
      raise FileNotFoundError(f"{data_dir}: no dataset_info.json; pass the TFDS version directory "
                              "that `python -m data_prep.build` wrote "
                              "(e.g. OUT/<name>/<config>/<version>)")
    builder = tfds.builder_from_directory(data_dir)
    if split not in builder.info.splits:
      raise ValueError(f"{data_dir}: no split {split!r}; it has {sorted(builder.info.splits)}")
    features = builder.info.features
    for key in ("video_id", "frames", "frame_mask", "captions"):
      if key not in features:
        raise ValueError(f"{data_dir}: feature {key!r} missing; "
                         "see docs/ARCHITECTURE.md 'Datasets'")
    f, r, r2, c = features["frames"].shape
    if f is None or r is None or r != r2 or c != 3:
      raise ValueError(f"{data_dir}: frames feature has shape {features['frames'].shape}; "
                       "expected (F, R, R, 3) with fixed F and R")
    name = f"{builder.info.full_name}"
    source = builder.as_data_source(split, decoders={"frames": _KeepEncoded()})
    video_ids, captions = [], []
    for j in tqdm(range(len(source)), desc=f"scan {name}:{split}", unit="video",
                  disable=not progress, leave=False):
      record = source[j]
      caps = [_text(t) for t in record["captions"]]
      if not caps:
        raise ValueError(f"{data_dir}:{split}: video {_text(record['video_id'])!r} (index {j}) "
                         "has no caption")
      video_ids.append(_text(record["video_id"]))
      captions.append(caps)
    if not video_ids:
      raise ValueError(f"{data_dir}: split {split!r} is empty")
    out = cls(data_dir=data_dir, split=split, name=name, video_ids=video_ids, captions=captions,
              num_frames=int(f), resolution=int(r))
    out._source = source
    return out

  def __post_init__(self):
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # reopened lazily in each worker process
    return state

  @property
  def num_videos(self) -> int:
    return len(self.video_ids)

  @property
  def num_captions(self) -> int:
    return sum(len(c) for c in self.captions)

  def _record(self, j: int) -> dict:
    if self._source is None:
      self._source = tfds.builder_from_directory(self.data_dir).as_data_source(
          self.split, decoders={"frames": _KeepEncoded()})
    return self._source[j]

  def read_frames(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded frames of video `j`: (uint8 `[F, R, R, 3]`, int32 frame_mask `[F]`)."""
    if not 0 <= j < self.num_videos:
      raise IndexError(f"{self.name}:{self.split}: video index {j} outside [0, {self.num_videos})")
    record = self._record(j)
    where = f"{self.name}:{self.split} video {self.video_ids[j]!r}"
    frames = decode_frames(record["frames"], self.resolution, where)
    if frames.shape[0] != self.num_frames:
      raise ValueError(f"{where}: {frames.shape[0]} frames, expected {self.num_frames}")
    return frames, np.asarray(record["frame_mask"], np.int32)

  def caption_table(self, mode: str) -> tuple[np.ndarray, list[str]]:
    """Text examples of this split for `mode` "all" or "paragraph".

    Returns:
      (video_index int32 `[N]`, texts `[N]`): N = total captions ("all", grouped by video in
      index order) or num_videos ("paragraph": captions joined with a space, in stored order).
    """
    if mode == "all":
      video_index = np.repeat(np.arange(self.num_videos, dtype=np.int32),
                              [len(c) for c in self.captions])
      return video_index, [t for caps in self.captions for t in caps]
    if mode == "paragraph":
      return (np.arange(self.num_videos, dtype=np.int32),
              [" ".join(caps) for caps in self.captions])
    raise ValueError(f"caption mode {mode!r} has no fixed table; use 'all' or 'paragraph' "
                     f"(modes: {CAPTION_MODES})")
