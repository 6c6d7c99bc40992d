"""Frame extraction: video file -> F JPEG frames at R x R, a frame mask and the duration.

The recipe is CLIP4Clip's (docs/method.md §6): decode at `fps` frames per second (the first frame
at or after each sampling time t = start, start + 1/fps, ..., up to `end` inclusive), keep
`num_frames` of them picked uniformly when there are more (`np.linspace(0, n - 1, F).astype(int)`,
CLIP4Clip's `slice_framepos=2`), pad with black frames and a 0 mask when there are fewer, resize the
short side to R with Pillow's bicubic filter (torchvision's `Resize(R)` size rule: the long side is
`int(R * long / short)`), centre-crop R x R (torchvision's `CenterCrop` rounding) and JPEG-encode.

Faults in the input raise `VideoError(kind, path, detail)` with `kind` one of `VIDEO_ERROR_KINDS`,
so a dataset builder can skip the video and count it:
- "missing": the file does not exist;
- "empty": the file has zero bytes, or decodes to no frame at all (inside the window, if any);
- "undecodable": the container or its video stream cannot be opened (no video stream, bad header, a
  truncated mp4 whose index is gone);
- "truncated": decoding fails part-way (after the first frame), or the decoded frames are fewer than
  half of the frame count the container declares (a cut-off AVI decodes silently up to the cut).

`extract_many` runs `extract_frames` over many videos in worker processes with a tqdm progress bar.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
from typing import Any, Hashable, Iterable, Iterator, Sequence

import av
import numpy as np
from PIL import Image
import tqdm

VIDEO_ERROR_KINDS = ("missing", "empty", "undecodable", "truncated")

# Tolerance (seconds) comparing a frame's presentation time with a sampling time: container time
# bases round timestamps (e.g. 1/10240 s for mp4), so a frame meant to be at 3.0 s may read 2.9999.
_TIME_EPS = 1e-3


class VideoError(Exception):
  """A video that cannot give frames; `kind` is one of `VIDEO_ERROR_KINDS`."""

  def __init__(self, kind: str, path: str, detail: str = ""):
    if kind not in VIDEO_ERROR_KINDS:
      raise ValueError(f"unknown VideoError kind {kind!r}; expected one of {VIDEO_ERROR_KINDS}")
    super().__init__(kind, path, detail)
    self.kind = kind
    self.path = path
    self.detail = detail

  def __str__(self) -> str:
    return f"{self.kind} video {self.path}" + (f": {self.detail}" if self.detail else "")


@dataclasses.dataclass(frozen=True)
class FrameOptions:
  """How frames are sampled and stored.

  Attributes:
    fps: sampling rate in frames per second (CLIP4Clip: 1).
    num_frames: F, frames kept per video (uniformly subsampled when longer, padded when shorter).
    resolution: R, output frames are R x R RGB.
    jpeg_quality: Pillow JPEG quality of the stored frames (1-95).
  """
  fps: float = 1.0
  num_frames: int = 12
  resolution: int = 224
  jpeg_quality: int = 95

  def __post_init__(self):
    if not self.fps > 0:
      raise ValueError(f"fps must be > 0, got {self.fps}")
    if self.num_frames < 1:
      raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
    if self.resolution < 1:
      raise ValueError(f"resolution must be >= 1, got {self.resolution}")
    if not 1 <= self.jpeg_quality <= 95:
      raise ValueError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")


@dataclasses.dataclass
class ExtractedFrames:
  """Result of `extract_frames`.

  Attributes:
    frames: F JPEG-encoded R x R RGB frames (padding frames are black).
    mask: int32 [F], 1 for a real frame, 0 for padding (real frames come first).
    duration: the whole video's duration in seconds (not only the window's).
    num_sampled: frames sampled at `fps` before uniform subsampling (>= 1).
  """
  frames: list[bytes]
  mask: np.ndarray
  duration: float
  num_sampled: int


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
  """(width, height) after resizing the short side to `resolution` (torchvision `Resize(int)`)."""
  if width <= height:
    return resolution, int(resolution * height / width)
  return int(resolution * width / height), resolution


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
  """Bicubic short-side resize to `resolution`, then a centre crop to `resolution` x `resolution`.

  Mirrors CLIP's preprocessing (`Resize(R, BICUBIC)`, `CenterCrop(R)` on a PIL image).
  """
  image = image.convert("RGB")
  new_w, new_h = resized_size(image.width, image.height, resolution)
  if (new_w, new_h) != image.size:
    image = image.resize((new_w, new_h), Image.BICUBIC)
  left = int(round((new_w - resolution) / 2.0))
  top = int(round((new_h - resolution) / 2.0))
  return image.crop((left, top, left + resolution, top + resolution))


def uniform_indices(num_available: int, num_frames: int) -> np.ndarray:
  """Indices of the frames kept: all of them if they fit, else `num_frames` spread uniformly.

  Returns int64 [min(num_available, num_frames)], CLIP4Clip's `np.linspace(0, n - 1, F, dtype=int)`.
  """
  if num_available <= num_frames:
    return np.arange(num_available)
  return np.linspace(0, num_available - 1, num=num_frames).astype(np.int64)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
  """JPEG bytes of an RGB image (Pillow, no chroma-subsampling override)."""
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def black_frame_jpeg(resolution: int, quality: int) -> bytes:
  """JPEG bytes of an all-black R x R RGB frame (the padding frame)."""
  return encode_jpeg(Image.new("RGB", (resolution, resolution)), quality)


def _declared_duration(container: Any, stream: Any) -> float | None:
  """Duration in seconds the container claims, or None."""
  if stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / av.time_base
  return None


def sample_frames(path: str, fps: float, resolution: int,
                  window: tuple[float, float] | None = None,
                  threads: int = 0) -> tuple[list[Image.Image], float]:
  """Decodes `path` and returns its frames sampled at `fps`, resized and cropped, with the duration.

  Sampling times are start, start + 1/fps, ... (start = 0 without a window); each takes the first
  frame whose time is at or after it, and a frame is used at most once. With a window
  (start, end) in seconds, times past `end` are not sampled (end inclusive, as CLIP4Clip).

  Args:
    path: video file.
    fps: sampling rate.
    resolution: R; frames come back as R x R RGB PIL images.
    window: optional (start, end) seconds.
    threads: FFmpeg decoder threads (0 = automatic).

  Returns:
    (frames, duration): the sampled frames in time order and the whole video's duration in seconds.

  Raises:
    VideoError: missing, empty, undecodable or truncated input (see the module docstring).
  """
  if not os.path.isfile(path):
    raise VideoError("missing", path, "no such file")
  if os.path.getsize(path) == 0:
    raise VideoError("empty", path, "file has 0 bytes")
  start, end = (0.0, float("inf")) if window is None else (float(window[0]), float(window[1]))
  if end < start:
    raise ValueError(f"window end {end} is before its start {start} for {path}")
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise VideoError("undecodable", path, f"cannot open: {e}") from e
  frames: list[Image.Image] = []
  with container:
    if not container.streams.video:
      raise VideoError("undecodable", path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO" if threads != 1 else "SLICE"
    if threads > 0:
      stream.codec_context.thread_count = threads
    rate = stream.average_rate or stream.guessed_rate
    frame_dt = 1.0 / float(rate) if rate else 0.0
    offset = float(stream.start_time * stream.time_base) if (
        stream.start_time is not None and stream.time_base is not None) else 0.0
    if start > 0:
      try:  # Jump to the keyframe before the window; frames before `start` are then dropped.
        container.seek(int(max(start + offset - 1.0, 0.0) * av.time_base), backward=True)
      except av.FFmpegError:
        container.seek(0)
    next_time = start
    step = 1.0 / fps
    index = -1
    last_time = None
    decoded = 0
    reached_end_of_window = False
    try:
      for frame in container.decode(stream):
        index += 1
        decoded += 1
        t = frame.time - offset if frame.time is not None else index * frame_dt
        last_time = t
        if t > end + _TIME_EPS:
          reached_end_of_window = True
          break
        if t + _TIME_EPS < next_time:
          continue
        frames.append(resize_and_crop(frame.to_image(), resolution))
        while next_time <= t + _TIME_EPS:
          next_time += step
    except (av.FFmpegError, OSError, ValueError) as e:  # ValueError: unconvertible pixel format
      kind = "truncated" if decoded > 1 else "undecodable"
      raise VideoError(kind, path, f"decoding failed after {decoded} frames: {e}") from e
    declared = _declared_duration(container, stream)
    if decoded == 0:
      raise VideoError("empty", path, "no decodable frame")
    declared_frames = stream.frames or 0
    if start == 0 and not reached_end_of_window and declared_frames > 1 and (
        decoded < 0.5 * declared_frames):
      raise VideoError("truncated", path,
                       f"decoded {decoded} of {declared_frames} declared frames")
    if reached_end_of_window and declared is not None:
      duration = declared
    else:
      duration = (last_time or 0.0) + frame_dt
      if declared is not None and start > 0:
        duration = max(duration, declared)
  if not frames:
    raise VideoError("empty", path, f"no frame inside the window {window}")
  return frames, float(duration)


def extract_frames(path: str, options: FrameOptions,
                   window: tuple[float, float] | None = None,
                   threads: int = 0) -> ExtractedFrames:
  """Extracts F JPEG frames, their mask and the duration from one video (see module docstring).

  Args:
    path: video file.
    options: sampling rate, F, R and JPEG quality.
    window: optional (start, end) seconds to sample from.
    threads: FFmpeg decoder threads (0 = automatic).

  Returns:
    ExtractedFrames with F frames, mask int32 [F].

  Raises:
    VideoError: missing, empty, undecodable or truncated input.
  """
  sampled, duration = sample_frames(path, options.fps, options.resolution, window, threads)
  keep = uniform_indices(len(sampled), options.num_frames)
  frames = [encode_jpeg(sampled[i], options.jpeg_quality) for i in keep]
  mask = np.zeros((options.num_frames,), np.int32)
  mask[:len(frames)] = 1
  if len(frames) < options.num_frames:
    pad = black_frame_jpeg(options.resolution, options.jpeg_quality)
    frames.extend([pad] * (options.num_frames - len(frames)))
  return ExtractedFrames(frames=frames, mask=mask, duration=duration, num_sampled=len(sampled))


def _extract_job(job: tuple[Hashable, str, tuple[float, float] | None], options: FrameOptions,
                 threads: int) -> tuple[Hashable, ExtractedFrames | VideoError]:
  key, path, window = job
  try:
    return key, extract_frames(path, options, window, threads)
  except VideoError as e:
    return key, e


def extract_many(jobs: Iterable[tuple[Hashable, str, tuple[float, float] | None]],
                 options: FrameOptions, workers: int = 1, total: int | None = None,
                 desc: str = "extracting frames",
                 progress: bool = True) -> Iterator[tuple[Hashable, ExtractedFrames | VideoError]]:
  """Runs `extract_frames` over (key, path, window) jobs, in `workers` processes when > 1.

  Results come back as (key, ExtractedFrames) or (key, VideoError) in completion order (not input
  order); at most 4 x workers jobs are in flight, so memory stays bounded on large datasets. Any
  other exception (a bug, not bad input) propagates.

  Args:
    jobs: (key, video path, optional (start, end) window in seconds).
    options: frame options.
    workers: worker processes; <= 1 runs in this process.
    total: number of jobs, for the progress bar.
    desc: progress bar label.
    progress: show a tqdm progress bar.

  Yields:
    (key, result) pairs.
  """
  if total is None and isinstance(jobs, Sequence):
    total = len(jobs)
  bar = tqdm.tqdm(total=total, desc=desc, unit="video", disable=not progress)
  try:
    if workers <= 1:
      for job in jobs:
        result = _extract_job(job, options, 0)
        bar.update(1)
        yield result
      return
    # "spawn": the parent may hold threads (TFDS, absl) that make fork unsafe.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
      job_iter = iter(jobs)
      pending: set[concurrent.futures.Future] = set()
      max_pending = 4 * workers

      def _fill():
        for job in job_iter:
          pending.add(pool.submit(_extract_job, job, options, 1))
          if len(pending) >= max_pending:
            return

      _fill()
      while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          pending.remove(future)
          bar.update(1)
          yield future.result()
        _fill()
  finally:
    bar.close()
