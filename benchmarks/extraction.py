r"""Frame-extraction throughput (decode at 1 fps, resize + crop to 224, JPEG) on generated videos.

    python -m benchmarks.extraction            # 4 videos, 640x360, 30 fps, 30 s each
    python -m benchmarks.extraction --quick    # 2 videos, 480x270, 25 fps, 10 s each

Prints, for 1 and N worker processes (N = --workers, default: the CPU count; spawned processes,
each decoding single-threaded, while 1 worker decodes in this process with FFmpeg's own threads):
source frames decoded per second (every frame is decoded to find the 1-fps samples, so this is the
cost that scales with video length), sampled frames per second, and videos per second. The videos
are H.264 (libx264) with moving content and noise, written once into a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import av
import numpy as np

from data_prep import frames


def write_video(path: str, seconds: float, rate: int, width: int, height: int, seed: int) -> int:
  """Writes an H.264 mp4 with a moving gradient plus noise; returns the number of frames."""
  rng = np.random.default_rng(seed)
  xs = np.linspace(0, 4 * np.pi, width, dtype=np.float32)[None, :]
  ys = np.linspace(0, 2 * np.pi, height, dtype=np.float32)[:, None]
  noise_bank = rng.normal(0, 8, (7, height, width, 3)).astype(np.float32)  # cheap to cycle
  n = int(seconds * rate)
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "veryfast", "crf": "23"}
    for k in range(n):
      phase = k / rate
      base = 127 + 100 * np.sin(xs + phase) * np.cos(ys - 0.5 * phase)
      img = np.repeat(base[..., None], 3, axis=2)
      img[..., 1] = np.roll(img[..., 1], k, axis=1)
      img = np.clip(img + noise_bank[k % len(noise_bank)], 0, 255).astype(np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return n


def main() -> None:
  """Generates the videos, times extraction for 1 and --workers processes, prints a table."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="2 short, smaller videos")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--num_frames", type=int, default=12)
  args = parser.parse_args()
  if args.quick:
    count, seconds, rate, width, height = 2, 10, 25, 480, 270
  else:
    count, seconds, rate, width, height = 4, 30, 30, 640, 360
  options = frames.FrameOptions(fps=1.0, num_frames=args.num_frames, resolution=args.resolution)
  with tempfile.TemporaryDirectory() as tmp:
    paths, source_frames = [], 0
    t0 = time.perf_counter()
    for i in range(count):
      path = os.path.join(tmp, f"video{i}.mp4")
      source_frames += write_video(path, seconds, rate, width, height, seed=i)
      paths.append(path)
    print(f"generated {count} videos {width}x{height} @ {rate} fps x {seconds} s "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"extraction to {args.resolution}x{args.resolution}, F={args.num_frames}, 1 fps, "
          f"JPEG q{options.jpeg_quality}; {os.cpu_count()} CPU cores")
    tiny = os.path.join(tmp, "tiny.mp4")
    write_video(tiny, 1, 10, 64, 48, seed=0)
    for workers in sorted({1, max(1, args.workers)}):
      t0 = time.perf_counter()
      list(frames.extract_many([(0, tiny, None)], options, workers=workers, progress=False))
      print(f"start-up + one 1-s 64x48 video with {workers} worker(s): "
            f"{time.perf_counter() - t0:.2f} s (included in the rows below)")
    print("| workers | videos | decoded frames | sampled frames | seconds | decoded frames/s "
          "| sampled frames/s | videos/s |")
    print("|---|---|---|---|---|---|---|---|")
    for workers in sorted({1, max(1, args.workers)}):
      jobs = [(i, p, None) for i, p in enumerate(paths)]
      t0 = time.perf_counter()
      results = list(frames.extract_many(jobs, options, workers=workers, progress=False))
      elapsed = time.perf_counter() - t0
      errors = [r for _, r in results if isinstance(r, frames.VideoError)]
      if errors:
        raise SystemExit(f"extraction failed: {errors}")
      sampled = sum(r.num_sampled for _, r in results)
      print(f"| {workers} | {count} | {source_frames} | {sampled} | {elapsed:.2f} | "
            f"{source_frames / elapsed:.0f} | {sampled / elapsed:.1f} | {count / elapsed:.2f} |")


if __name__ == "__main__":
  main()
