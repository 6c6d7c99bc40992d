"""Video search: index build rate and query latency (first stage and re-scoring separately).

    .venv/bin/python -m benchmarks.search --quick     # tiny model, 1k / 100k queries (< 3 min)
    .venv/bin/python -m benchmarks.search             # adds a ViT-B/32-sized model (random weights)
    .venv/bin/python -m benchmarks.search --sizes 1000 100000 1000000

Build rate: rendered synthetic clips (data_prep.synthetic) indexed end to end (frame extraction in
worker processes, JPEG decode, jitted video encoder, thumbnails, atomic write), first build only.

Query latency at N indexed videos uses planted random features (D = 512, F = 12 frames, L = 32
words; ranking cost does not depend on values): pooled embeddings are real [N, D] arrays on the
device; the token store behind re-scoring is a [4096, F, D] block addressed modulo its size (only
the shortlisted rows are ever read, so this costs the same as a full [N, F, D] array already in
page cache without holding N x 24 KiB in memory). Text features are random too, so the text
encoder's time is reported separately (tiny model; ViT-B/32 in the full run). Median of `--repeats`
queries after one warm-up (compilation) query.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from data_prep.frames import FrameOptions


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build_rate(kind: str, num_videos: int, workers: int) -> dict:
  """Indexes `num_videos` rendered clips with a random `kind` ('tiny' or 'vit-b32') model."""
  from flax import nnx
  from data_prep.synthetic import generate, render
  from tvr_jax.models import clip as clip_lib
  from tvr_jax.models import retrieval
  from tvr_jax.video_search import index as index_lib
  from tvr_jax.video_search.model import RetrievalSearchModel
  if kind == "tiny":
    clip_cfg = clip_lib.CLIPConfig.preset("tiny-64")
    frames, res, seconds = 8, 64, 8
  else:
    clip_cfg = clip_lib.CLIPConfig.preset("ViT-B/32")
    frames, res, seconds = 12, 224, 12
  model = retrieval.RetrievalModel(
      retrieval.RetrievalConfig(partial_type=0, max_frames=frames, max_words=32),
      clip_config=clip_cfg, rngs=nnx.Rngs(0))
  search_model = RetrievalSearchModel(model, FrameOptions(num_frames=frames, resolution=res),
                                      video_batch=8)
  with tempfile.TemporaryDirectory() as tmp:
    vdir = os.path.join(tmp, "videos")
    os.makedirs(vdir)
    rng = np.random.default_rng(0)
    for i in range(num_videos):
      spec = render.ClipSpec(render.SHAPES[i % 5], list(render.COLOURS)[i % 7], "large",
                             list(render.BACKGROUNDS)[i % 5],
                             ["left", "right", "up", "down"][i % 4],
                             (float(rng.uniform()), float(rng.uniform())), 0.5)
      generate.encode_mp4(render.render_clip(spec, seconds * 4, res), os.path.join(
          vdir, f"clip{i:04d}.mp4"), 4)
    # Warm-up: compile the encoder on one batch first, so the rate is the steady state.
    search_model.encode_videos(np.zeros((8, frames, res, res, 3), np.uint8),
                               np.ones((8, frames), np.int32))
    t0 = time.perf_counter()
    summary = index_lib.build_index(search_model, vdir, os.path.join(tmp, "index"),
                                    workers=workers, batch_size=8, progress=False)
    dt = time.perf_counter() - t0
    t_text = _median_time(lambda: search_model.encode_texts(["a red circle moves to the left"]), 5)
  return {"model": kind, "videos": summary.total, "frames": f"{frames} x {res} px",
          "seconds": dt, "videos_per_s": summary.total / dt, "text_encode_ms": 1000 * t_text}


def _median_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


class _ModuloTokens:
  """[N, F, D]-shaped view of a [B, F, D] block: row i is block[i % B] (benchmark-only)."""

  def __init__(self, block, n):
    self.block, self.shape = block, (n,) + block.shape[1:]

  def __getitem__(self, rows):
    return self.block[np.asarray(rows) % len(self.block)]


class _RandomTextModel:
  model_id = "benchmark-random"
  similarity_kwargs = dict(textual_attention=True, visual_attention=True)
  token_weights = None

  def __init__(self, dim, words, seed=0):
    self.rng = np.random.default_rng(seed)
    self.dim, self.words = dim, words

  def encode_texts(self, texts):
    sent = _unit(self.rng.standard_normal((1, self.dim), dtype=np.float32))
    words = _unit(self.rng.standard_normal((1, self.words, self.dim), dtype=np.float32))
    mask = np.zeros((1, self.words), np.int32)
    mask[0, :12] = 1
    return sent, words, mask


def query_latency(n: int, shortlist: int, repeats: int, dim=512, frames=12, words=32) -> dict:
  """Median text and video query timings (seconds) at `n` planted indexed videos."""
  from tvr_jax.video_search import index as index_lib
  from tvr_jax.video_search import retrieve
  rng = np.random.default_rng(1)
  pooled = np.empty((n, dim), np.float32)
  for i in range(0, n, 65536):
    pooled[i:i + 65536] = _unit(rng.standard_normal((min(65536, n - i), dim), dtype=np.float32))
  block = _unit(rng.standard_normal((min(n, 4096), frames, dim), dtype=np.float32))
  mask = np.ones((n, frames), np.int32)
  mask[::2, 9:] = 0
  videos = [index_lib.IndexedVideo(id=f"{i:016x}", path="", relpath=f"v{i}.mp4", size=0,
                                   mtime_ns=0, sha256="", duration=1.0, num_frames=frames)
            for i in range(n)]
  idx = index_lib.SearchIndex("(in memory)", {"model": {"id": "benchmark-random"}}, videos,
                              _ModuloTokens(block, n), mask, pooled, "")
  t0 = time.perf_counter()
  searcher = retrieve.Searcher(idx, _RandomTextModel(dim, words), shortlist=shortlist)
  setup = time.perf_counter() - t0
  out = {"videos": n, "shortlist": shortlist, "setup_s": setup}
  for name, fn in (("text", lambda: searcher.search_text("q", 10)),
                   ("video", lambda: searcher.search_video(videos[n // 2].id, 10))):
    fn()   # compile
    timings = [fn().timings for _ in range(repeats)]
    out[f"{name}_first_ms"] = 1000 * float(np.median([t["first_stage"] for t in timings]))
    out[f"{name}_rescore_ms"] = 1000 * float(np.median([t["rescore"] for t in timings]))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny model only, few videos (< 3 min)")
  p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
  p.add_argument("--shortlist", type=int, default=100)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
  args = p.parse_args()
  import jax
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, CPUs: {os.cpu_count()}")
  builds = [build_rate("tiny", 16 if args.quick else 64, args.workers)]
  if not args.quick:
    builds.append(build_rate("vit-b32", 32, args.workers))
  print("\nindex build (first build, rendered clips, encoder compiled beforehand)")
  print(f"{'model':<8} {'frames':>12} {'videos':>7} {'seconds':>8} {'videos/s':>9} "
        f"{'text encode ms':>15}")
  for b in builds:
    print(f"{b['model']:<8} {b['frames']:>12} {b['videos']:>7} {b['seconds']:>8.2f} "
          f"{b['videos_per_s']:>9.2f} {b['text_encode_ms']:>15.1f}")
  print(f"\nquery latency, median of {args.repeats} (planted D=512, F=12, L=32; shortlist "
        f"{args.shortlist}; text encoding not included)")
  print(f"{'videos':>9} {'text 1st ms':>12} {'text rescore ms':>16} {'video 1st ms':>13} "
        f"{'video rescore ms':>17} {'setup s':>8}")
  for n in args.sizes:
    r = query_latency(n, args.shortlist, args.repeats)
    print(f"{n:>9} {r['text_first_ms']:>12.2f} {r['text_rescore_ms']:>16.2f} "
          f"{r['video_first_ms']:>13.2f} {r['video_rescore_ms']:>17.2f} {r['setup_s']:>8.2f}",
          flush=True)


if __name__ == "__main__":
  main()
