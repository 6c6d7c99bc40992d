"""Per-example Grain pieces shared by training and evaluation: the source and the text transform.

An example is a dict of NumPy values:
  frames uint8 `[F, R, R, 3]`, frame_mask int32 `[F]`, video_index int32 `[]`, and, after
  `MakeText`, text_ids int32 `[L]` and caption_index int32 `[]` (the caption's position in the
  split's "all" table, -1 for a paragraph), plus keyword_mask int32 `[L]` when asked for.
Frames are decoded inside `__getitem__`, i.e. in Grain's worker processes.
"""

from __future__ import annotations

from typing import Sequence

import grain.python as grain
import numpy as np

from tvr_jax.data.cache import FrameCache
from tvr_jax.data.source import CAPTION_MODES, VideoSplit


class ExampleSource(grain.RandomAccessDataSource):
  """Random-access examples over one split: index -> (video j, caption slot).

  `examples_video[k]` is the video of example k and `examples_slot[k]` which of its captions
  (-1: chosen later, at random or as a paragraph). Index -1 in `examples_video` marks an
  evaluation padding row: it repeats video 0 (so the model sees finite data) and is flagged
  `valid = False`.
  """

  def __init__(self, split: VideoSplit, examples_video: np.ndarray, examples_slot: np.ndarray,
               cache: FrameCache | None = None, with_frames: bool = True):
    self._split = split
    self._video = np.asarray(examples_video, np.int32)
    self._slot = np.asarray(examples_slot, np.int32)
    self._cache = cache
    self._with_frames = with_frames
    if self._video.shape != self._slot.shape:
      raise ValueError("examples_video and examples_slot differ in shape")

  def __len__(self) -> int:
    return int(self._video.shape[0])

  def __getitem__(self, k):
    j = int(self._video[k])
    valid = j >= 0
    jj = j if valid else 0
    out = {"video_index": np.int32(j), "slot": np.int32(self._slot[k]),
           "valid": np.bool_(valid)}
    if self._with_frames:
      reader = self._cache if self._cache is not None else self._split
      out["frames"], out["frame_mask"] = reader.read_frames(jj)
    return out

  def __repr__(self) -> str:
    # Grain compares this string when restoring an iterator state: it names the data, not paths.
    return (f"ExampleSource({self._split.name}:{self._split.split}, examples={len(self)}, "
            f"videos={self._split.num_videos}, frames={self._split.num_frames}x"
            f"{self._split.resolution})")


def training_examples(split: VideoSplit, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(examples_video, examples_slot) for training in caption `mode` (see `CAPTION_MODES`)."""
  if mode not in CAPTION_MODES:
    raise ValueError(f"caption_mode {mode!r} not in {CAPTION_MODES}")
  if mode == "all":
    video = np.repeat(np.arange(split.num_videos, dtype=np.int32),
                      [len(c) for c in split.captions])
    starts = np.cumsum([0] + [len(c) for c in split.captions[:-1]])
    slot = (np.arange(video.shape[0]) - np.repeat(starts, [len(c) for c in split.captions]))
    return video, slot.astype(np.int32)
  return (np.arange(split.num_videos, dtype=np.int32),
          np.full((split.num_videos,), -1, np.int32))


class MakeText(grain.RandomMapTransform):
  """Chooses the example's text and tokenises it: adds text_ids int32 `[L]`, caption_index int32.

  mode "random": a caption drawn with Grain's per-record generator (seeded from the sampler seed
  and the record's position, so the draw is reproducible and differs between epochs);
  "all": the caption in `slot`; "paragraph": every caption joined with a space.
  With `keyword_mask=True` it also adds keyword_mask int32 `[L]` (`tvr_jax.keywords`: 1 on the
  BPE tokens of keywords, aligned with text_ids), for keyword weighting.
  """

  def __init__(self, captions: Sequence[Sequence[str]], mode: str, context_length: int,
               keyword_mask: bool = False):
    if mode not in CAPTION_MODES:
      raise ValueError(f"caption_mode {mode!r} not in {CAPTION_MODES}")
    self._captions = captions
    self._offsets = np.cumsum([0] + [len(c) for c in captions]).astype(np.int64)
    self._mode = mode
    self._context_length = int(context_length)
    self._keyword_mask = bool(keyword_mask)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    from tvr_jax.tokenizer import tokenize  # imported in the worker, loads the vocabulary once
    element.pop("valid", None)  # training examples are all real
    j = int(element["video_index"])
    slot = int(element.pop("slot"))
    caps = self._captions[j]
    if self._mode == "paragraph":
      text, caption_index = " ".join(caps), -1
    else:
      if slot < 0:
        if self._mode == "all":
          raise ValueError("caption mode 'all' needs a caption slot per example")
        slot = int(rng.integers(len(caps)))
      text, caption_index = caps[slot], int(self._offsets[j] + slot)
    element["text_ids"] = tokenize([text], context_length=self._context_length)[0]
    if self._keyword_mask:
      from tvr_jax.keywords import keyword_mask  # loads the tagger in the worker, once
      element["keyword_mask"] = keyword_mask([text], self._context_length)[0]
    element["caption_index"] = np.int32(caption_index)
    return element
