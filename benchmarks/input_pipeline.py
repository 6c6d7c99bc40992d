r"""Input pipeline throughput: batches/s and decoded frames/s per core, with and without the cache.

    python -m benchmarks.input_pipeline --quick            # ~3-4 min on 2 cores
    python -m benchmarks.input_pipeline --videos 1024 --workers 0,4,8,16 --batches 20

Builds synthetic sets through the real path (`data_prep.build`): F=12 at 224 px (the paper's
shape; synthetic clips upscaled, so the JPEGs are smoother than natural video and decode somewhat
faster - the reference row decodes a textured 224 px JPEG to bound this) and the synthetic default
(F=8 at 64 px). Then times `TrainIterator` ("all" captions, global batch 128 unless --batch) for
each worker count, decoding JPEGs or reading the decoded-frame cache. Prints a table and a summary
line extrapolating to a 16-core host (frames/s per core x 16; the pipeline scales with workers as
long as cores are free).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

from data_prep import build
from data_prep.synthetic import generate
from tvr_jax.data import FrameCache, TrainIterator, VideoSplit


def _build(root: str, num_videos: int, num_frames: int, resolution: int,
           workers: int) -> VideoSplit:
  raw = os.path.join(root, "raw")
  config = generate.SyntheticConfig(num_train=num_videos, num_val=0, num_test=2,
                                    duration=max(8.0, float(num_frames)))
  generate.write_raw(config, raw, progress=False)
  start = time.time()
  out = os.path.join(root, "out")
  summary = build.build("synthetic", raw, out, num_frames=num_frames, resolution=resolution,
                        workers=workers, progress=False)
  print(f"built {summary['examples']} at F={num_frames} R={resolution} in "
        f"{time.time() - start:.1f} s", flush=True)
  return VideoSplit.open(out, "train", dataset="synthetic", config=summary["config"],
                         progress=False)


def _time(split: VideoSplit, batch: int, workers: int, cache, num_batches: int,
          read_threads: int = 4) -> dict:
  start = time.time()
  with TrainIterator(split, global_batch_size=batch, caption_mode="all", context_length=32,
                     seed=0, worker_count=workers, cache=cache,
                     read_threads=read_threads) as it:
    next(it)  # start-up (worker processes, first batch)
    first = time.time() - start
    t0 = time.time()
    for _ in range(num_batches):
      b = next(it)
    dt = time.time() - t0
  frames = num_batches * batch * split.num_frames
  # Cores busy: worker processes (or this one) x reader threads (Pillow releases the GIL).
  cores = min(max(workers, 1) * read_threads, os.cpu_count() or 1)
  return {"R": split.resolution, "F": split.num_frames, "batch": batch, "workers": workers,
          "cache": cache is not None, "startup_s": first, "batches_s": num_batches / dt,
          "frames_s": frames / dt, "frames_s_core": frames / dt / cores,
          "shape": tuple(b["frames"].shape)}


def _reference_decode(resolution: int = 224, n: int = 300) -> float:
  """Frames/s of Pillow decoding one textured (natural-image-like) JPEG, one core."""
  from PIL import Image
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (resolution // 8, resolution // 8, 3), np.uint8)
  img = Image.fromarray(base).resize((resolution, resolution), Image.BICUBIC)
  noise = rng.normal(0, 12, (resolution, resolution, 3))
  arr = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=95)
  data = buf.getvalue()
  t0 = time.time()
  for _ in range(n):
    with Image.open(io.BytesIO(data)) as im:
      np.asarray(im.convert("RGB"))
  return n / (time.time() - t0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core machine")
  parser.add_argument("--videos", type=int, default=512, help="training videos per set")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=10, help="timed batches per row")
  parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
  parser.add_argument("--work_dir", default=None, help="where to build (default: a temp dir)")
  parser.add_argument("--cache_root", default=None, help="frame cache root (default /dev/shm)")
  parser.add_argument("--step_rate", type=float, default=0.0,
                      help="train steps/s at this batch (benchmarks/train_step.py): "
                           "prints which limits")
  args = parser.parse_args(argv)
  if args.quick:
    args.videos, args.batches, args.workers = 192, 3, "0,2"
  workers = [int(w) for w in args.workers.split(",")]
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp, \
      tempfile.TemporaryDirectory(dir=args.cache_root) as cache_root:
    rows = []
    for num_frames, resolution in ((12, 224), (8, 64)):
      split = _build(os.path.join(tmp, f"r{resolution}"), args.videos, num_frames, resolution,
                     workers=os.cpu_count() or 1)
      start = time.time()
      cache = FrameCache.fill(split, root=cache_root, worker_count=min(2, os.cpu_count() or 1),
                              progress=False)
      print(f"cache fill F={num_frames} R={resolution}: {time.time() - start:.1f} s, "
            f"{cache.nbytes / 2**20:.0f} MiB", flush=True)
      for w in workers:
        for c in (None, cache):
          rows.append(_time(split, args.batch, w, c, args.batches))
          r = rows[-1]
          print(f"  R={r['R']} workers={w} cache={r['cache']}: {r['batches_s']:.2f} batches/s",
                flush=True)
    ref = _reference_decode()
  header = (f"{'R':>4} {'F':>3} {'batch':>5} {'workers':>7} {'cache':>5} {'startup s':>9} "
            f"{'batches/s':>9} {'frames/s':>9} {'frames/s/core':>13}")
  print("\n" + header + "\n" + "-" * len(header))
  for r in rows:
    print(f"{r['R']:>4} {r['F']:>3} {r['batch']:>5} {r['workers']:>7} {str(r['cache']):>5} "
          f"{r['startup_s']:>9.1f} {r['batches_s']:>9.2f} {r['frames_s']:>9.0f} "
          f"{r['frames_s_core']:>13.0f}")
  print(f"reference: Pillow decodes a textured 224 px JPEG at {ref:.0f} frames/s on one core")
  decode = [r for r in rows if r["R"] == 224 and not r["cache"]]
  per_core = max(r["frames_s_core"] for r in decode)
  per_core_natural = min(per_core, ref)
  per_batch = args.batch * 12
  cached = max(r["frames_s"] for r in rows if r["R"] == 224 and r["cache"])
  print(f"summary: 224 px decode {per_core:.0f} frames/s/core here (natural-JPEG bound "
        f"{ref:.0f}); a 16-core host decoding JPEGs gives ~{16 * per_core_natural / per_batch:.1f} "
        f"batches/s of {args.batch}x12x224^2 (bound by the slower of the two); with the frame "
        f"cache {cached / per_batch:.1f} batches/s measured here on {os.cpu_count()} cores")
  if args.step_rate > 0:
    best = max(r["batches_s"] for r in rows if r["R"] == 224)
    print(f"vs step: pipeline {best:.2f} batches/s (best 224 px row, {os.cpu_count()} cores) vs "
          f"train step {args.step_rate:.2f} steps/s -> "
          f"{'the input pipeline' if best < args.step_rate else 'the train step'} limits")
  return 0


if __name__ == "__main__":
  sys.exit(main())
