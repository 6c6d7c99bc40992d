r"""Evaluation cost of an MSVD-sized test set: encoding (both towers) + chunked DMAE scoring.

  python -m benchmarks.evaluate --quick     # CPU, < 5 min: encodes 8 videos and 256 captions,
                                            #   scores 3,000 captions x 670 videos; extrapolates
  python -m benchmarks.evaluate --tiny      # smoke test (tiny CLIP), seconds
  python -m benchmarks.evaluate             # GPU: all 670 videos x 12 frames and 27,763 captions
  python -m benchmarks.evaluate --dtype bfloat16 --attention_impl cudnn

Encoding runs `RetrievalModel.encode_video` / `encode_text` (random ViT-B/32 weights, jitted, fixed
batch) over the set; scoring runs `tvr_jax.scoring.ChunkedScorer` (DMAE, both attentions, float32)
on cached features of the set's size, built as `benchmarks/scoring.py` builds them. Where a part is
measured on a subset, its time is scaled linearly to the full set (encoding and scoring are both
linear in the number of videos / captions) and the row says "extrapolated". Peak memory is the
process's resident-set high-water mark during scoring (Linux VmHWM after a reset) and, on an
accelerator, the device's peak_bytes_in_use.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks import scoring as scoring_bench
from benchmarks import train_step
from tvr_jax import scoring
from tvr_jax.models import build as build_lib
from tvr_jax.models import clip as clip_lib

MIB = 1 << 20
MSVD_VIDEOS, MSVD_CAPTIONS = 670, 27763


def time_encoding(c, num_videos: int, num_texts: int, batch: int, repeats: int) -> dict:
  """Seconds per video and per caption of the jitted encoders at batch `batch` (median)."""
  model = build_lib.build_model(c, load_weights=False)
  graphdef, state = nnx.split(model)

  @jax.jit
  def enc_video(state, frames, mask):
    return nnx.merge(graphdef, state).encode_video(frames, mask)[0]

  @jax.jit
  def enc_text(state, ids):
    return nnx.merge(graphdef, state).encode_text(ids)[1]

  rng = np.random.default_rng(0)
  bv, bt = min(batch, num_videos), min(4 * batch, num_texts)
  frames = jax.device_put(rng.integers(0, 256, (bv, c.num_frames, c.image_size, c.image_size, 3),
                                       dtype=np.uint8))
  fmask = jax.device_put(np.ones((bv, c.num_frames), np.int32))
  ids = np.zeros((bt, c.max_words), np.int32)
  ids[:, 0], ids[:, 1:12], ids[:, 12] = 49406, rng.integers(1, 49000, (bt, 11)), 49407
  ids = jax.device_put(ids)
  t0 = time.perf_counter()
  enc_video.lower(state, frames, fmask).compile()
  enc_text.lower(state, ids).compile()
  compile_s = time.perf_counter() - t0
  video_calls = max(1, -(-num_videos // bv))
  text_calls = max(1, -(-num_texts // bt))
  tv = common.time_calls(lambda: [enc_video(state, frames, fmask) for _ in range(video_calls)],
                         repeats, 1, sync=jax.block_until_ready)
  tt = common.time_calls(lambda: [enc_text(state, ids) for _ in range(text_calls)], repeats, 1,
                         sync=jax.block_until_ready)
  return {"compile_s": compile_s, "video_s": tv["median"] / (video_calls * bv),
          "text_s": tt["median"] / (text_calls * bt), "videos": video_calls * bv,
          "texts": text_calls * bt}


def time_scoring(num_texts: int, num_videos: int, words: int, frames: int, dim: int,
                 budget_mib: float) -> dict:
  """Wall seconds and peak RSS growth of chunked DMAE scoring of cached features (incl. compile)."""
  text, video = scoring_bench.make_features(num_texts, num_videos, words, frames, dim)
  scorer = scoring.ChunkedScorer(int(budget_mib * MIB))
  rss_before = common.status_kib("VmRSS")
  reset = common.reset_peak_rss()
  t0 = time.perf_counter()
  sim = scorer(text, video)
  elapsed = time.perf_counter() - t0
  hwm = common.status_kib("VmHWM") if reset else -1
  feat_mib = sum(x.nbytes for x in text + video) / MIB
  return {"s": elapsed, "texts": num_texts, "rss_growth_mib": (hwm - rss_before) / 1024,
          "feat_mib": feat_mib, "plan": scorer.plan, "shape": sim.shape}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CPU: subsets, extrapolated")
  p.add_argument("--tiny", action="store_true", help="smoke test: tiny CLIP, small subsets")
  p.add_argument("--clip", default="ViT-B/32")
  p.add_argument("--videos", type=int, default=MSVD_VIDEOS)
  p.add_argument("--captions", type=int, default=MSVD_CAPTIONS)
  p.add_argument("--encode_videos", type=int, default=0, help="videos encoded (0: all)")
  p.add_argument("--encode_captions", type=int, default=0, help="captions encoded (0: all)")
  p.add_argument("--score_captions", type=int, default=0, help="captions scored (0: all)")
  p.add_argument("--batch", type=int, default=64, help="videos per encoding call (captions: 4x)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn"])
  p.add_argument("--budget_mib", type=float, default=1024)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  frames, words, dim = 12, 32, 512
  if args.quick:
    args.encode_videos, args.encode_captions, args.score_captions = 8, 256, 3000
    args.batch = 8
  if args.tiny:
    args.clip, args.encode_videos, args.encode_captions, args.score_captions = "tiny-64", 4, 64, 200
    args.videos, args.captions, args.batch, frames, words, dim = 50, 1000, 4, 8, 24, 32
  image_size = clip_lib.CLIPConfig.preset(args.clip).image_size
  c = train_step.make_config(args.clip, image_size, frames, words, args.batch, "dmae", args.dtype,
                             False, args.attention_impl)
  n_enc_v = args.encode_videos or args.videos
  n_enc_t = args.encode_captions or args.captions
  n_score = args.score_captions or args.captions
  print(f"[encode] {args.clip} {args.dtype}: {n_enc_v} videos x {frames} frames, {n_enc_t} "
        "captions ...", flush=True)
  enc = time_encoding(c, n_enc_v, n_enc_t, args.batch, args.repeats)
  print(f"[score] {n_score} captions x {args.videos} videos ...", flush=True)
  sc = time_scoring(n_score, args.videos, words, frames, dim, args.budget_mib)
  dev_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  video_total = enc["video_s"] * args.videos
  text_total = enc["text_s"] * args.captions
  score_total = sc["s"] * args.captions / n_score
  total = video_total + text_total + score_total
  ext = lambda measured, full: "measured" if measured >= full else f"extrapolated from {measured}"  # noqa: E731
  print(f"\nmachine: {common.machine()}; jax {jax.__version__}; {common.today()}")
  print(f"test set: {args.videos} videos x {frames} frames x {image_size}px, {args.captions} "
        f"captions, L={words}, D={dim}; encoder {args.clip} {args.dtype}, batch {args.batch} "
        f"videos / {4 * args.batch} captions; compile {enc['compile_s']:.1f} s (not counted)")
  rows = [
      ["encode videos", f"{video_total:.1f}", f"{1 / enc['video_s']:.2f} videos/s",
       ext(enc["videos"], args.videos), "-"],
      ["encode captions", f"{text_total:.1f}", f"{1 / enc['text_s']:.1f} captions/s",
       ext(enc["texts"], args.captions), "-"],
      ["score (DMAE, chunked)", f"{score_total:.1f}",
       f"{sc['texts'] * args.videos / sc['s']:,.0f} pairs/s", ext(sc["texts"], args.captions),
       f"RSS +{sc['rss_growth_mib']:.0f} MiB over {sc['feat_mib']:.0f} MiB of features"
       f"{'' if n_score >= args.captions else ' (subset)'}; XLA block "
       f"{sc['plan'].total_bytes / MIB:.0f} MiB"],
      ["total", f"{total:.1f}", "-", "-",
       f"device peak {dev_peak / MIB:.0f} MiB" if dev_peak else "-"],
  ]
  common.print_table(["part", "seconds (full set)", "rate", "how", "memory"], rows)
  print(f"summary: evaluating {args.videos} videos / {args.captions} captions takes {total:.1f} s "
        f"(encode {video_total + text_total:.1f} s + score {score_total:.1f} s) on "
        f"{jax.default_backend()}")
  return {"total_s": total, "encode_s": video_total + text_total, "score_s": score_total}


if __name__ == "__main__":
  main()
