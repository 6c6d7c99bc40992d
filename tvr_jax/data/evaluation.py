"""Evaluation input: every video once and every caption once, in two separate passes.

    data = EvalData(split, global_batch_size=64, caption_mode="all", context_length=32,
                    sharding=batch_sharding(mesh), worker_count=8)
    for b in data.video_batches():    # frames uint8 [B, F, R, R, 3], frame_mask int32 [B, F],
      ...                             # video_index int32 [B], valid bool [B]
    for b in data.caption_batches():  # text_ids int32 [B, L'] (L' = bucket), caption_index [B],
      ...                             # video_index int32 [B] (the caption's video), valid bool [B]
    data.caption_to_video             # int32 [num_captions]: ground-truth video of each caption

Videos and captions are separate passes because a multi-caption set has many more captions than
videos (MSVD test: ~27.7k captions, 670 videos): each video is encoded once. The last batch of each
pass is padded to the full global batch: padding rows have `valid = False` and index -1 (their
content repeats the first item, so they are finite); drop them with `valid` before using indices.
Rows follow index order on a mesh whose devices are in process order; in general place results by
`video_index` / `caption_index`, not by position.

Length bucketing (`length_buckets`, e.g. (8, 16, 24, 32)): captions are sorted by token length
(SOT..EOT) and each global batch's `text_ids` is cut to the smallest bucket that holds its longest
caption. CLIP's text tower is causal, so the features of positions 0..EOT do not change when
padding columns are cut; evaluation scatters them back to [N, L] by `caption_index`. Every caption
is tokenized once, when the data is made (and its keyword mask, with `keywords=True`).

caption_mode "all": one text per caption (MSR-VTT 1k-A has one per video; MSVD many);
"paragraph": one text per video, its captions joined (DiDeMo, ActivityNet paragraph-to-video).
"""

from __future__ import annotations

import math
from typing import Iterator

import grain.python as grain
import numpy as np

from tvr_jax.data import arrays
from tvr_jax.data.cache import FrameCache
from tvr_jax.data.examples import ExampleSource
from tvr_jax.data.source import VideoSplit


def padded_indices(n: int, global_batch_size: int, process_index: int,
                   process_count: int, order: np.ndarray | None = None) -> np.ndarray:
  """This process's rows of the padded index list: int32 `[num_batches * local_batch]`, -1 = pad.

  Global batch k holds items `order[k*B:(k+1)*B]` (default order 0..n-1; padded with -1 past n);
  process p takes the p-th of its `process_count` equal slices, so together the processes cover
  0..n-1 exactly once.
  """
  local = global_batch_size // process_count
  num_batches = max(math.ceil(n / global_batch_size), 1)
  rows = np.arange(num_batches * global_batch_size).reshape(num_batches, process_count, local)
  mine = rows[:, process_index, :].reshape(-1)
  items = np.arange(n) if order is None else np.asarray(order)
  return np.where(mine < n, items[np.minimum(mine, max(n - 1, 0))], -1).astype(np.int32)


def bucket_widths(lengths: np.ndarray, global_batch_size: int, buckets) -> np.ndarray:
  """Token columns of each global batch of length-sorted captions: int32 [num_batches].

  Args:
    lengths: [n] token lengths (SOT..EOT), sorted ascending.
    global_batch_size: rows per global batch.
    buckets: ascending column counts; the last must hold the longest caption.
  """
  buckets = np.asarray(sorted(buckets))
  num_batches = max(math.ceil(len(lengths) / global_batch_size), 1)
  longest = np.array([lengths[k * global_batch_size:(k + 1) * global_batch_size].max(initial=1)
                      for k in range(num_batches)])
  pos = np.searchsorted(buckets, longest)
  if (pos >= len(buckets)).any():
    raise ValueError(f"length_buckets {buckets.tolist()} do not hold a caption of "
                     f"{int(longest.max())} tokens")
  return buckets[pos].astype(np.int32)


def token_lengths(text_ids: np.ndarray) -> np.ndarray:
  """Positions SOT..EOT of each row of `tokenize` output (EOT = the row's largest id): int [N]."""
  return np.argmax(text_ids, axis=-1) + 1


class _DropSlot(grain.MapTransform):
  def map(self, element):
    element.pop("slot", None)
    return element


class EvalData:
  """The evaluation passes over one split (see the module docstring)."""

  def __init__(self, split: VideoSplit, *, global_batch_size: int, caption_mode: str,
               context_length: int, sharding=None, worker_count: int = 0,
               read_threads: int = 4, cache: FrameCache | None = None,
               process_index: int | None = None, process_count: int | None = None,
               length_buckets=(), keywords: bool = False):
    """Prepares both passes; nothing is decoded until a pass is iterated.

    Args:
      split: the opened evaluation split.
      global_batch_size: rows per global batch (divisible by the process count).
      caption_mode: "all" or "paragraph".
      context_length: L, token columns of `text_ids`.
      sharding: data sharding of the mesh; None yields NumPy batches of this process's rows.
      worker_count, read_threads: Grain worker processes / reader threads for the video pass.
      cache: a filled `FrameCache` of this split, or None.
      process_index, process_count: this process's share (default: from JAX).
      length_buckets: column counts to cut caption batches to (sorted by length); () or None
        keeps every batch at `context_length`, in caption order. `context_length` is always
        added as the last bucket.
      keywords: also yield `keyword_mask` int32 [B, L'] (`tvr_jax.keywords.keyword_mask`).
    """
    self._p, self._n, self.local_batch_size = arrays.process_layout(
        global_batch_size, process_index, process_count)
    self.split = split
    self.global_batch_size = global_batch_size
    self.context_length = int(context_length)
    self.sharding = sharding
    self._worker_count = worker_count
    self._read_threads = read_threads
    self._cache = cache
    self.caption_to_video, self.texts = split.caption_table(caption_mode)
    from tvr_jax.tokenizer import tokenize
    self.text_ids = tokenize(list(self.texts), context_length=self.context_length)
    self.lengths = token_lengths(self.text_ids) if len(self.texts) else np.zeros(0, np.int64)
    self.keyword_mask = None
    if keywords:
      from tvr_jax.keywords import keyword_mask
      self.keyword_mask = keyword_mask(list(self.texts), self.context_length)
    buckets = sorted({int(b) for b in (length_buckets or ()) if 0 < int(b) < self.context_length})
    self.length_buckets = tuple(buckets) + (self.context_length,) if length_buckets else ()
    if self.length_buckets:
      self._caption_order = np.argsort(self.lengths, kind="stable")
      self.caption_widths = bucket_widths(self.lengths[self._caption_order], global_batch_size,
                                          self.length_buckets)
    else:
      self._caption_order = None
      self.caption_widths = np.full(self.num_caption_batches, self.context_length, np.int32)

  @property
  def num_videos(self) -> int:
    return self.split.num_videos

  @property
  def num_captions(self) -> int:
    return len(self.texts)

  @property
  def num_video_batches(self) -> int:
    return max(math.ceil(self.num_videos / self.global_batch_size), 1)

  @property
  def num_caption_batches(self) -> int:
    return max(math.ceil(self.num_captions / self.global_batch_size), 1)

  def video_batches(self) -> Iterator[dict]:
    """Every video once: frames, frame_mask, video_index, valid (frames decoded in workers)."""
    index = padded_indices(self.num_videos, self.global_batch_size, self._p, self._n)
    if self._worker_count:
      arrays.ensure_flags_parsed()
    loader = grain.DataLoader(
        data_source=ExampleSource(self.split, index, np.zeros_like(index), cache=self._cache),
        sampler=grain.IndexSampler(index.shape[0], shard_options=grain.NoSharding(),
                                   shuffle=False, num_epochs=1),
        operations=[_DropSlot(), grain.Batch(self.local_batch_size, drop_remainder=False)],
        worker_count=self._worker_count,
        read_options=grain.ReadOptions(num_threads=self._read_threads,
                                       prefetch_buffer_size=self.local_batch_size))
    iterator = iter(loader)
    try:
      for batch in iterator:
        yield arrays.to_global(batch, self.sharding, self.global_batch_size)
    finally:
      inner = getattr(iterator, "_iterator", None)
      if inner is not None and hasattr(inner, "close"):
        inner.close()

  def caption_batches(self) -> Iterator[dict]:
    """Every caption once: text_ids [B, width], caption_index, video_index (ground truth), valid
    (and keyword_mask [B, width]); width is `caption_widths[k]` for batch k."""
    index = padded_indices(self.num_captions, self.global_batch_size, self._p, self._n,
                           self._caption_order)
    for k, start in enumerate(range(0, index.shape[0], self.local_batch_size)):
      rows = index[start:start + self.local_batch_size]
      valid = rows >= 0
      width = int(self.caption_widths[k])
      src = np.maximum(rows, 0)   # padding rows repeat the first caption
      batch = {"text_ids": self.text_ids[src, :width],
               "caption_index": rows.astype(np.int32),
               "video_index": np.where(valid, self.caption_to_video[np.maximum(rows, 0)],
                                       -1).astype(np.int32),
               "valid": valid}
      if self.keyword_mask is not None:
        batch["keyword_mask"] = self.keyword_mask[src, :width]
      yield arrays.to_global(batch, self.sharding, self.global_batch_size)
