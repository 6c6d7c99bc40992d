"""Time and peak memory of chunked DMAE scoring for an MSVD-sized test set.

    .venv/bin/python -m benchmarks.scoring          # 27,763 captions x 670 videos x 32 x 12, D 512
    .venv/bin/python -m benchmarks.scoring --quick    # 2,000 captions x 100 videos (seconds)
    .venv/bin/python -m benchmarks.scoring --budget_mib 256 --check 64

Features are random unit vectors with random padding (scoring cost does not depend on values).
Prints the block plan with XLA's memory analysis of the compiled block, the wall time, and the
process's resident-set high-water mark (VmHWM) during scoring, measured from a reset taken after
the features were built (Linux `clear_refs`), next to the size of the features themselves.
"""

import argparse
import os
import resource
import time

import jax
import numpy as np

from benchmarks import common
from tvr_jax import scoring
from tvr_jax.models import dmae

MIB = 1 << 20


def _unit(rng, shape):
  x = rng.standard_normal(shape, dtype=np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x


def make_features(num_texts, num_videos, num_words, num_frames, dim, seed=0):
  """Random normalised features with SOT..EOT text masks and trailing frame padding."""
  rng = np.random.default_rng(seed)
  sent = _unit(rng, (num_texts, dim))
  words = np.empty((num_texts, num_words, dim), np.float32)
  for i in range(0, num_texts, 4096):  # in slices, to keep the build's own peak small
    words[i:i + 4096] = _unit(rng, words[i:i + 4096].shape)
  lengths = rng.integers(3, num_words + 1, num_texts)
  tmask = (np.arange(num_words)[None] < lengths[:, None]).astype(np.int32)
  tokens = _unit(rng, (num_videos, num_frames, dim))
  flen = rng.integers(max(1, num_frames // 2), num_frames + 1, num_videos)
  vmask = (np.arange(num_frames)[None] < flen[:, None]).astype(np.int32)
  return (sent, words, tmask), (tokens, vmask)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="2,000 captions x 100 videos")
  p.add_argument("--texts", type=int, default=27763)
  p.add_argument("--videos", type=int, default=670)
  p.add_argument("--words", type=int, default=32)
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--budget_mib", type=float, default=1024, help="memory budget of one block")
  p.add_argument("--no_visual_attention", action="store_true")
  p.add_argument("--check", type=int, default=0,
                 help="compare the first N caption rows with the unchunked similarity")
  args = p.parse_args()
  if args.quick:
    args.texts, args.videos = 2000, 100
  text, video = make_features(args.texts, args.videos, args.words, args.frames, args.dim)
  feat_mib = sum(x.nbytes for x in text + video) / MIB
  print(f"devices: {jax.devices()}")
  print(f"test set: {args.texts} captions x {args.videos} videos, L={args.words}, "
        f"N_v={args.frames}, D={args.dim}; features {feat_mib:.0f} MiB (float32)")
  full_bytes = args.texts * args.videos * args.words * args.frames * 4
  print(f"unchunked [Bt, Bv, L, N_v] float32 tensor would be {full_bytes / MIB:,.0f} MiB")
  scorer = scoring.ChunkedScorer(int(args.budget_mib * MIB),
                                 visual_attention=not args.no_visual_attention)
  rss_before = common.status_kib("VmRSS")
  reset = common.reset_peak_rss()
  cpu0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  sim = scorer(text, video)
  elapsed = time.perf_counter() - t0
  cpu1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
  hwm = (common.status_kib("VmHWM") if reset
         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  plan = scorer.plan
  print(f"budget {args.budget_mib:.0f} MiB -> blocks of {plan.text_chunk} texts x "
        f"{plan.video_chunk} videos; XLA block memory: temp {plan.temp_bytes / MIB:.1f} MiB + "
        f"args {plan.argument_bytes / MIB:.1f} MiB + out {plan.output_bytes / MIB:.2f} MiB = "
        f"{plan.total_bytes / MIB:.1f} MiB; compilations {scorer.compilations}")
  print(f"time {elapsed:.1f} s wall (incl. compile) = {args.texts * args.videos / elapsed:,.0f} "
        f"pairs/s; process CPU time {cpu:.1f} s on {os.cpu_count()} cores (wall > CPU/cores "
        "means the machine was shared)")
  print(f"RSS before scoring {rss_before / 1024:.0f} MiB; peak RSS during scoring "
        f"{hwm / 1024:.0f} MiB ({'VmHWM after reset' if reset else 'ru_maxrss, whole process'}); "
        f"growth {(hwm - rss_before) / 1024:.0f} MiB (includes the {sim.nbytes / MIB:.0f} MiB "
        "output)")
  if args.check:
    n = min(args.check, args.texts)
    with jax.default_matmul_precision("highest"):
      ref = np.asarray(dmae.dmae_similarity(
          text[0][:n], text[1][:n], text[2][:n], video[0], video[1], normalize=False,
          visual_attention=not args.no_visual_attention))
    print(f"check: max |chunked - unchunked| over {n} rows = {np.abs(sim[:n] - ref).max():.2e}")


if __name__ == "__main__":
  main()
