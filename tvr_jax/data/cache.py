"""Decoded-frame cache: every video's uint8 frames in one memory-mapped file, filled once at start.

JPEG decoding is the input pipeline's main CPU cost. For a dataset that fits in memory, decode it
once, in parallel Grain workers, into `frames.u8` (`[num_videos, F, R, R, 3]` uint8) and
`frame_mask.i32` (`[num_videos, F]`) under a cache directory, by default in `/dev/shm` (RAM) when it
has room. Worker processes map the same file, so the data is held once per host, not once per
worker. The directory is keyed by dataset, split and shape and is reused by later runs; it is
written under a temporary name and renamed when complete, so a killed fill is never used.

Size: MSR-VTT 10k videos x 12 frames x 224^2 x 3 = 18 GB; MSVD 1,970 videos = 3.6 GB; the
synthetic default (1.4k videos x 8 x 64^2 x 3) = 140 MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from tqdm import tqdm

from tvr_jax.data.source import VideoSplit


def default_cache_root() -> str:
  """`/dev/shm/tvr_jax_frames` when /dev/shm exists (RAM-backed), else the temp directory."""
  if os.path.isdir("/dev/shm"):
    return "/dev/shm/tvr_jax_frames"
  return os.path.join(tempfile.gettempdir(), "tvr_jax_frames")


def _key(split: VideoSplit) -> str:
  digest = hashlib.sha1("\n".join(split.video_ids).encode()).hexdigest()[:10]
  safe = split.name.replace("/", "_")
  return f"{safe}_{split.split}_{split.num_frames}x{split.resolution}_{digest}"


@dataclasses.dataclass
class FrameCache:
  """Read side of a filled cache (picklable: workers reopen the memory map by path)."""

  path: str
  num_videos: int
  num_frames: int
  resolution: int

  def __post_init__(self):
    self._frames = None
    self._mask = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_frames", "_mask")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._frames = None
    self._mask = None

  def _open(self):
    shape = (self.num_videos, self.num_frames, self.resolution, self.resolution, 3)
    frames = np.memmap(os.path.join(self.path, "frames.u8"), np.uint8, "r", shape=shape)
    mask = np.memmap(os.path.join(self.path, "frame_mask.i32"), np.int32, "r", shape=shape[:2])
    # Grain's reader threads may race here: `_frames` (the flag checked) is set last.
    self._mask = mask
    self._frames = frames

  def read_frames(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Video `j`: (uint8 `[F, R, R, 3]`, int32 `[F]`), read-only views into the map.

    No copy here: batching stacks the rows, which is the one copy out of the cache.
    """
    if self._frames is None:
      self._open()
    return self._frames[j], self._mask[j]

  @property
  def nbytes(self) -> int:
    return self.num_videos * self.num_frames * (self.resolution ** 2 * 3 + 4)

  @classmethod
  def fill(cls, split: VideoSplit, root: str | None = None, worker_count: int = 0,
           progress: bool = True) -> "FrameCache":
    """Returns the cache of `split`, decoding every video into it first if it is not there yet.

    Args:
      split: the opened split.
      root: cache directory root (default `default_cache_root()`).
      worker_count: Grain worker processes that decode in parallel (0: this process).
      progress: tqdm bar over the videos.

    Raises:
      OSError if the file system lacks room (the message gives the size needed).
    """
    root = root or default_cache_root()
    path = os.path.join(root, _key(split))
    cache = cls(path=path, num_videos=split.num_videos, num_frames=split.num_frames,
                resolution=split.resolution)
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      if meta.get("shape") == [cache.num_videos, cache.num_frames, cache.resolution]:
        return cache
      raise ValueError(f"{path}: cache metadata {meta} does not match {split.name}:{split.split}; "
                       "delete the directory")
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    if cache.nbytes > 0.9 * free:
      raise OSError(f"frame cache for {split.name}:{split.split} needs "
                    f"{cache.nbytes / 2**30:.2f} GiB but {root} has {free / 2**30:.2f} GiB free; "
                    "pass another cache root or turn the cache off")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial.", dir=root)
    try:
      shape = (cache.num_videos, cache.num_frames, cache.resolution, cache.resolution, 3)
      frames = np.memmap(os.path.join(tmp, "frames.u8"), np.uint8, "w+", shape=shape)
      mask = np.memmap(os.path.join(tmp, "frame_mask.i32"), np.int32, "w+", shape=shape[:2])
      start = time.time()
      for j, f, m in tqdm(_decode_all(split, worker_count), total=split.num_videos,
                          desc=f"cache frames {split.name}:{split.split}", unit="video",
                          disable=not progress):
        frames[j] = f
        mask[j] = m
      frames.flush()
      mask.flush()
      del frames, mask
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"shape": [cache.num_videos, cache.num_frames, cache.resolution],
                   "dataset": split.name, "split": split.split,
                   "fill_seconds": round(time.time() - start, 2)}, f)
      try:
        os.rename(tmp, path)
      except OSError:
        if not os.path.exists(meta_path):  # another process finished first: use theirs
          raise
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return cache


class _DecodeSource:
  """Grain source over video indices: j -> (j, frames, mask)."""

  def __init__(self, split: VideoSplit):
    self._split = split

  def __len__(self) -> int:
    return self._split.num_videos

  def __getitem__(self, j):
    frames, mask = self._split.read_frames(int(j))
    return {"index": np.int32(j), "frames": frames, "frame_mask": mask}

  def __repr__(self) -> str:
    return f"_DecodeSource({self._split.name}:{self._split.split})"


def _decode_all(split: VideoSplit, worker_count: int):
  """Yields (j, frames, mask) for every video, decoded in `worker_count` Grain workers."""
  import grain.python as grain
  from tvr_jax.data.arrays import ensure_flags_parsed
  if worker_count:
    ensure_flags_parsed()
  loader = grain.DataLoader(
      data_source=_DecodeSource(split),
      sampler=grain.IndexSampler(split.num_videos, shard_options=grain.NoSharding(),
                                 shuffle=False, num_epochs=1),
      worker_count=worker_count)
  for item in loader:
    yield int(item["index"]), item["frames"], item["frame_mask"]
