r"""Evaluation cost of an MSVD-sized test set: encoding (both towers) + sharded DMAE scoring.

  python -m benchmarks.evaluate --quick     # CPU, a few minutes: encodes 8 videos and 4 caption
                                            #   batches per length bucket, scores 2,000 captions
                                            #   x 670 videos on 1 and 2 simulated devices;
                                            #   extrapolates to the full set
  python -m benchmarks.evaluate --tiny      # smoke test (tiny CLIP), seconds
  python -m benchmarks.evaluate             # GPU: all 670 videos x 12 frames and 27,763 captions
  python -m benchmarks.evaluate --dtype bfloat16 --attention_impl cudnn

Encoding runs `RetrievalModel.encode_video` and the evaluator's caption encoder
(`tvr_jax.evaluate.encode_text_bucket`; random ViT-B/32 weights, jitted, fixed batch) once at full
length (`max_words`, the old path) and once per length bucket (the new path). Caption lengths:
the captions of the synthetic set (`data_prep.synthetic`) and MSVD_LIKE below, a hand-written
sample of short MSVD-style descriptions (MSVD captions are one short clause, "a man is slicing a
tomato"); the full set's 27,763 captions are drawn from the MSVD-like length histogram, sorted and
batched as `tvr_jax.data.evaluation.EvalData` does. Scoring runs `tvr_jax.scoring.ShardedScorer`
(DMAE, both attentions, float32) on random features of the set's size on a 1- and a 2-device mesh
(--quick forces 2 simulated CPU devices; they share the CPU's cores).

Matmul floor: each phase's FLOPs (XLA's cost analysis of the compiled function) at the measured
float32 rate of the vision MLP's matmul (as benchmarks/train_step.py does); "x floor" is the
phase's time over that. Where a part is measured on a subset, its time is scaled linearly to the
full set and the row says "extrapolated".
"""

import os
import sys

if "--quick" in sys.argv or "--tiny" in sys.argv:   # before JAX starts: 2 simulated devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import scoring as scoring_bench  # noqa: E402
from benchmarks import train_step  # noqa: E402
from tvr_jax import evaluate, scoring, tokenizer  # noqa: E402
from tvr_jax.data import evaluation  # noqa: E402
from tvr_jax.models import build as build_lib  # noqa: E402
from tvr_jax.models import clip as clip_lib  # noqa: E402

MIB = 1 << 20
MSVD_VIDEOS, MSVD_CAPTIONS = 670, 27763
BUCKETS = (8, 16, 24)   # configs/base.py eval_length_buckets; max_words is the last bucket

# Hand-written MSVD-style captions (short single clauses as annotators wrote them for MSVD); only
# their token lengths are used.
MSVD_LIKE = [
    "a man is slicing a tomato", "a woman is dancing", "a cat is playing with a ball",
    "someone is peeling a potato", "a man is riding a horse", "two men are fighting",
    "a girl is singing into a microphone", "a dog is running in the snow",
    "a man is playing the guitar", "a woman is cutting an onion with a knife",
    "the men are playing soccer on a field", "a baby is laughing",
    "a boy is jumping on a trampoline",
    "a person is pouring water into a glass", "a monkey is eating a banana",
    "a man is driving a car down the road", "a woman is frying eggs in a pan",
    "a panda is climbing a tree", "people are walking", "a man is lifting weights in a gym",
    "a chef is mixing ingredients in a large bowl", "a kitten is sleeping", "a man shoots a gun",
    "a woman is applying makeup to her face", "a small boy is riding a bicycle on the street",
    "a man is talking", "the lady is slicing bread", "a group of people are dancing on a stage",
    "a car is racing around a track", "a man is swimming in a pool", "a bird is flying",
    "a woman is putting cheese on a pizza", "a man and a woman are talking to each other",
    "a squirrel is eating a nut", "a person is drawing a picture with a pencil",
    "a man is playing a flute", "an elephant is spraying water with its trunk",
    "a woman is washing dishes in the kitchen sink", "a man is doing push ups",
    "kids are playing in the park",
]


def length_histogram(texts, words: int) -> np.ndarray:
  """Counts of token lengths (SOT..EOT) 0..words of `texts` tokenized at `words` columns."""
  lengths = evaluation.token_lengths(tokenizer.tokenize(list(texts), context_length=words))
  return np.bincount(lengths, minlength=words + 1)


def synthetic_captions() -> list:
  from data_prep.synthetic import generate
  return [c for *_, caps in generate.iter_clips(generate.SyntheticConfig()) for c in caps]


def caption_widths(hist: np.ndarray, num_captions: int, batch: int, words: int) -> np.ndarray:
  """Bucketed width of each caption batch when `num_captions` follow the length histogram `hist`
  (sorted by length and cut into batches as EvalData does)."""
  rng = np.random.default_rng(0)
  lengths = np.sort(rng.choice(len(hist), num_captions, p=hist / hist.sum()))
  return evaluation.bucket_widths(lengths, batch, tuple(b for b in BUCKETS if b < words) + (words,))


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def time_encoding(c, num_videos: int, batch: int, repeats: int, widths) -> dict:
  """Seconds per video and per caption batch at each width (median), with XLA FLOPs of each."""
  model = build_lib.build_model(c, load_weights=False)
  graphdef, state = nnx.split(model)

  def enc_video(state, frames, mask):
    return nnx.merge(graphdef, state).encode_video(frames, mask)[0]

  def enc_text(state, ids):
    return evaluate.encode_text_bucket(nnx.merge(graphdef, state), ids)[1]

  rng = np.random.default_rng(0)
  bv, bt = min(batch, num_videos), 4 * batch
  frames = jax.device_put(rng.integers(0, 256, (bv, c.num_frames, c.image_size, c.image_size, 3),
                                       dtype=np.uint8))
  fmask = jax.device_put(np.ones((bv, c.num_frames), np.int32))
  t0 = time.perf_counter()
  video_c = jax.jit(enc_video).lower(state, frames, fmask).compile()
  text = {}
  for w in sorted(set(widths)):
    ids = np.zeros((bt, w), np.int32)
    ids[:, 0], ids[:, 1:w - 1], ids[:, w - 1] = 49406, rng.integers(1, 49000, (bt, w - 2)), 49407
    ids = jax.device_put(ids)
    text[w] = [jax.jit(enc_text).lower(state, ids).compile(), ids]
  compile_s = time.perf_counter() - t0
  video_calls = max(1, -(-num_videos // bv))
  tv = common.time_calls(lambda: [video_c(state, frames, fmask) for _ in range(video_calls)],
                         repeats, 1, sync=jax.block_until_ready)
  per_width = {}
  for w, (fn, ids) in text.items():
    t = common.time_calls(lambda fn=fn, ids=ids: [fn(state, ids) for _ in range(4)], repeats, 1,
                          sync=jax.block_until_ready)
    per_width[w] = {"s": t["median"] / 4, "flops": flops_of(fn)}
  return {"compile_s": compile_s, "video_s": tv["median"] / (video_calls * bv),
          "video_flops": flops_of(video_c) / bv, "videos": video_calls * bv,
          "text_batch": bt, "text": per_width}


def time_scoring(num_texts: int, num_videos: int, words: int, frames: int, dim: int,
                 budget_mib: float, n_devices: int) -> dict:
  """Wall seconds of sharded DMAE scoring on the first `n_devices` devices (incl. compile), and
  the XLA FLOPs of the scored blocks."""
  text, video = scoring_bench.make_features(num_texts, num_videos, words, frames, dim)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_devices]), ("data",))
  scorer = scoring.ShardedScorer(mesh, int(budget_mib * MIB), show_progress=False)
  t0 = time.perf_counter()
  rows, _ = scorer.local_rows(text, video)
  elapsed = time.perf_counter() - t0
  plan = scorer.plan
  block = scorer._compile(plan.text_chunk, plan.video_chunk, text[1].shape, video[0].shape, False)
  blocks = -(-num_texts // plan.text_chunk) * -(-num_videos // plan.video_chunk)
  # Compile time of the first call, apart: the sharded function compiles once per run.
  t0 = time.perf_counter()
  scorer.local_rows(text, video)
  warm = time.perf_counter() - t0
  return {"s": warm, "cold_s": elapsed, "texts": num_texts, "plan": plan, "rows": len(rows),
          "flops": flops_of(block) * blocks}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CPU: subsets, extrapolated")
  p.add_argument("--tiny", action="store_true", help="smoke test: tiny CLIP, small subsets")
  p.add_argument("--clip", default="ViT-B/32")
  p.add_argument("--videos", type=int, default=MSVD_VIDEOS)
  p.add_argument("--captions", type=int, default=MSVD_CAPTIONS)
  p.add_argument("--encode_videos", type=int, default=0, help="videos encoded (0: all)")
  p.add_argument("--score_captions", type=int, default=0, help="captions scored (0: all)")
  p.add_argument("--batch", type=int, default=64, help="videos per encoding call (captions: 4x)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn"])
  p.add_argument("--budget_mib", type=float, default=1024, help="scoring budget per device")
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  frames, words, dim = 12, 32, 512
  if args.quick:
    args.encode_videos, args.score_captions, args.batch = 8, 2000, 8
  if args.tiny:
    args.clip, args.encode_videos, args.score_captions = "tiny-64", 4, 200
    args.videos, args.captions, args.batch, frames, words, dim = 50, 1000, 4, 8, 24, 32
  image_size = clip_lib.CLIPConfig.preset(args.clip).image_size
  c = train_step.make_config(args.clip, image_size, frames, words, args.batch, "dmae", args.dtype,
                             False, args.attention_impl)
  n_enc_v = args.encode_videos or args.videos
  n_score = args.score_captions or args.captions

  # ---- caption lengths ----
  hist_syn = length_histogram(synthetic_captions(), words)
  hist_msvd = length_histogram(MSVD_LIKE, words)
  bt = 4 * args.batch
  widths = caption_widths(hist_msvd, args.captions, bt, words)
  buckets = tuple(b for b in BUCKETS if b < words) + (words,)
  print(f"caption token lengths (SOT..EOT; count per length, buckets {buckets}):")
  for name, h in (("synthetic set", hist_syn), (f"MSVD-like sample ({len(MSVD_LIKE)})", hist_msvd)):
    nz = np.flatnonzero(h)
    lens = np.repeat(np.arange(len(h)), h)
    print(f"  {name}: " + " ".join(f"{k}:{h[k]}" for k in nz) +
          f"; mean {lens.mean():.1f}, max {lens.max()}, token positions used "
          f"{lens.mean() / words:.0%} of {words}")
  print(f"  full set ({args.captions} captions from the MSVD-like histogram, batch {bt}): "
        + ", ".join(f"{int((widths == w).sum())} batches at {w}" for w in sorted(set(widths))),
        flush=True)

  # ---- encoding ----
  print(f"[encode] {args.clip} {args.dtype}: {n_enc_v} videos x {frames} frames; caption batches "
        f"of {bt} at widths {sorted(int(w) for w in set(widths) | {words})} ...", flush=True)
  enc = time_encoding(c, n_enc_v, args.batch, args.repeats, list(widths) + [words])
  n_batches = len(widths)
  text_old = enc["text"][words]["s"] * n_batches
  text_new = sum(enc["text"][int(w)]["s"] for w in widths)
  flops_old = enc["text"][words]["flops"] * n_batches
  flops_new = sum(enc["text"][int(w)]["flops"] for w in widths)
  video_total = enc["video_s"] * args.videos
  video_flops = enc["video_flops"] * args.videos

  # ---- scoring on 1 and 2 devices ----
  scores = {}
  for n in sorted({1, min(2, jax.device_count())}):
    print(f"[score] {n_score} captions x {args.videos} videos on {n} device(s) ...", flush=True)
    scores[n] = time_scoring(n_score, args.videos, words, frames, dim, args.budget_mib, n)
  score_1 = scores[1]["s"] * args.captions / n_score
  score_flops = scores[1]["flops"] * args.captions / n_score

  # ---- matmul floor ----
  cc = clip_lib.CLIPConfig.preset(args.clip)
  m, k, n = train_step.matmul_shape(cc, args.batch, frames)
  rate = train_step.matmul_gflops_jax(m, k, n) * 1e9
  dev_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

  def floor(fl):
    return fl / rate

  total_old = video_total + text_old + score_1
  total_new = video_total + text_new + score_1
  floor_new = floor(video_flops + flops_new + score_flops)
  ext = lambda measured, full: "measured" if measured >= full else f"extrapolated from {measured}"  # noqa: E731
  print(f"\nmachine: {common.machine()}; jax {jax.__version__}; {common.today()} (CPU shared with "
        "other jobs: compare rows of this run only)")
  print(f"test set: {args.videos} videos x {frames} frames x {image_size}px, {args.captions} "
        f"captions, L={words}, D={dim}; encoder {args.clip} {args.dtype}, batch {args.batch} "
        f"videos / {bt} captions; compile {enc['compile_s']:.1f} s (not counted); matmul rate "
        f"{rate / 1e9:.0f} GFLOP/s (float32 [{m}x{k}] @ [{k}x{n}])")
  rows = [
      ["encode videos", f"{video_total:.1f}", f"{floor(video_flops):.1f}",
       f"{video_total / floor(video_flops):.2f}", ext(enc["videos"], args.videos)],
      [f"encode captions, full length {words} (old)", f"{text_old:.1f}", f"{floor(flops_old):.1f}",
       f"{text_old / floor(flops_old):.2f}", f"extrapolated from 4 batches of {bt}"],
      ["encode captions, length buckets (new)", f"{text_new:.1f}", f"{floor(flops_new):.1f}",
       f"{text_new / floor(flops_new):.2f}", "extrapolated from 4 batches per width"],
  ]
  for nd, sc in scores.items():
    s_full = sc["s"] * args.captions / n_score
    rows.append([f"score (DMAE, sharded) on {nd} device(s)", f"{s_full:.1f}",
                 f"{floor(score_flops):.1f}", f"{s_full / floor(score_flops):.2f}",
                 f"{ext(sc['texts'], args.captions)}; block {sc['plan'].text_chunk}x"
                 f"{sc['plan'].video_chunk}/device, first call {sc['cold_s']:.1f} s"])
  rows.append(["total, old (full-length captions, 1 device)", f"{total_old:.1f}", "-", "-", "-"])
  rows.append(["total, new (buckets, 1 device)", f"{total_new:.1f}", f"{floor_new:.1f}",
               f"{total_new / floor_new:.2f}",
               f"device peak {dev_peak / MIB:.0f} MiB" if dev_peak else "-"])
  sharded = ""
  if len(scores) > 1:
    # The same evaluation with the scorer sharded over the devices (on this CPU: one simulated
    # device per core, so the scorer's non-matmul passes, which XLA:CPU runs on one thread per
    # device, use both cores).
    nd = max(scores)
    total_sharded = video_total + text_new + scores[nd]["s"] * args.captions / n_score
    rows.append([f"total, new (buckets, scoring on {nd} devices)", f"{total_sharded:.1f}",
                 f"{floor_new:.1f}", f"{total_sharded / floor_new:.2f}", "-"])
    sharded = (f"; {total_sharded:.1f} s = {total_sharded / floor_new:.2f} x with the scorer "
               f"sharded over {nd} devices")
  common.print_table(["part", "seconds (full set)", "matmul floor s", "x floor", "how"], rows)
  print(f"caption text work: {flops_new / flops_old:.0%} of the full-length FLOPs, time "
        f"{text_new / text_old:.0%} of the full-length time")
  print(f"summary: evaluating {args.videos} videos / {args.captions} captions takes "
        f"{total_new:.1f} s with length buckets (was {total_old:.1f} s at full length) = "
        f"{total_new / floor_new:.2f} x its matmul floor on {jax.default_backend()} with the "
        f"scorer on 1 device{sharded}")
  return {"total_s": total_new, "total_old_s": total_old, "text_s": text_new,
          "text_old_s": text_old, "score_s": {n: s["s"] for n, s in scores.items()},
          "floor_s": floor_new}


if __name__ == "__main__":
  main()
