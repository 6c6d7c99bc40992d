r"""Gradient caching (`config.accum_steps`): peak memory per device and step time against k = 1.

  python -m benchmarks.gradcache               # ViT-B/32, 12 x 224 px, L=32: memory at batch 128
                                               #   for k = 1, 2, 4, 8 (compile only), then step
                                               #   time of k = 4 vs 1 at batch 8 (runs)
  python -m benchmarks.gradcache --tiny        # smoke test: tiny CLIP at 64 px, seconds
  python -m benchmarks.gradcache --memory_batch 256 --accum 1,4,16 --time_batch 0

Memory: the real `tvr_jax.train.make_train_step` (DMAE, NegNCE, TPM-CL T1+T2+T3, AdamW) is lowered
against the abstract train state (`train.abstract_train_state`: nothing is allocated, no weights
read) and compiled for this backend; "peak" is the compiled program's `memory_analysis()`:
arguments + outputs + temporaries - aliased (donated) bytes, per device. On a CPU-only machine
these are the CPU program's buffers: the same HLO and buffer assignment scheme as on an
accelerator up to fusion choices, so read the ratios between rows more than the absolute values.
Step time: both programs run on the same random batch in the same process, interleaved, median of
--repeats after --warmup untimed calls. The extra cost of caching is one more tower forward
(features first, then forward + backward per micro-batch), roughly 4/3 of a plain step.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks import train_step as train_step_bench
from tvr_jax import sharding, train

GIB = 2.0 ** 30


def peak_bytes(compiled) -> dict:
  """Per-device bytes of a compiled step: peak (args + outputs + temps - aliased) and temps."""
  m = compiled.memory_analysis()
  if m is None:
    return {"peak": float("nan"), "temp": float("nan")}
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return {"peak": float(peak), "temp": float(m.temp_size_in_bytes)}


def abstract_batch(c, mesh) -> dict:
  """ShapeDtypeStructs of a global batch of config `c`, with the batch sharding."""
  s = sharding.batch_sharding(mesh)
  b, f, r, w = c.batch_size, c.num_frames, c.image_size, c.max_words
  return {"frames": jax.ShapeDtypeStruct((b, f, r, r, 3), np.uint8, sharding=s),
          "frame_mask": jax.ShapeDtypeStruct((b, f), np.int32, sharding=s),
          "text_ids": jax.ShapeDtypeStruct((b, w), np.int32, sharding=s)}


def compile_step(c, mesh, accum_steps: int):
  """(compiled step, compile seconds) of config `c` at `accum_steps`, against abstract inputs."""
  state, setup = train.abstract_train_state(c, mesh, total_steps=1000)
  step = train.make_train_step(setup, mesh, accum_steps=accum_steps)
  t0 = time.perf_counter()
  compiled = step.lower(state, abstract_batch(c, mesh)).compile()
  return compiled, time.perf_counter() - t0


def memory_rows(clip, image_size, frames, words, batch, accums, dtype, remat, mesh):
  rows = []
  for k in accums:
    c = train_step_bench.make_config(clip, image_size, frames, words, batch, "dmae", dtype, remat)
    compiled, secs = compile_step(c, mesh, k)
    b = peak_bytes(compiled)
    rows.append(dict(k=k, compile_s=secs, **b))
    print(f"[memory] {clip} batch {batch} accum_steps={k}: peak {b['peak'] / GIB:.2f} GiB per "
          f"device (temporaries {b['temp'] / GIB:.2f} GiB), compile {secs:.1f} s", flush=True)
    del compiled
  return rows


def time_rows(clip, image_size, frames, words, batch, accum, dtype, repeats, warmup, mesh):
  """Step time of accum_steps=1 and =accum on the same batch, calls interleaved."""
  c = train_step_bench.make_config(clip, image_size, frames, words, batch, "dmae", dtype, False)
  batch_arrays = train_step_bench.random_batch(c, mesh)
  runs = {}
  for k in (1, accum):
    state, setup = train.create_train_state(c, mesh, total_steps=1000)
    step = train.make_train_step(setup, mesh, accum_steps=k)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    runs[k] = {"compiled": compiled, "state": state, "compile_s": time.perf_counter() - t0,
               "times": []}
  for i in range(warmup + repeats):
    for r in runs.values():
      t0 = time.perf_counter()
      r["state"], m = r["compiled"](r["state"], batch_arrays)
      jax.block_until_ready(m["loss"])
      if i >= warmup:
        r["times"].append(time.perf_counter() - t0)
      if i == 0:   # the first step: same state, same batch, so the same loss
        r["loss"] = float(m["loss"])
  out = {k: dict(median=float(np.median(r["times"])), min=float(min(r["times"])),
                 compile_s=r["compile_s"], loss=r["loss"]) for k, r in runs.items()}
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="smoke test: tiny CLIP at 64 px")
  p.add_argument("--clip", default="ViT-B/32")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--max_words", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--memory_batch", type=int, default=128,
                 help="global batch of the memory rows (0: none)")
  p.add_argument("--accum", default="1,2,4,8", help="accum_steps of the memory rows")
  p.add_argument("--time_batch", type=int, default=8, help="global batch timed (0: no timing)")
  p.add_argument("--time_accum", type=int, default=4, help="accum_steps timed against 1")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  args = p.parse_args(argv)
  if args.tiny:
    args.clip, args.frames, args.max_words = "tiny-64", 8, 24
    args.memory_batch, args.accum, args.time_batch, args.repeats = 16, "1,4", 16, 2
  return args


def main(argv=None):
  args = parse_args(argv)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  from tvr_jax.models import clip as clip_lib
  image_size = clip_lib.CLIPConfig.preset(args.clip).image_size
  accums = [int(a) for a in args.accum.split(",")]
  print(f"machine: {common.machine()}; jax {jax.__version__} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s); {common.today()}")
  print(f"model: {args.clip}, {args.frames} frames x {image_size} px, L={args.max_words}, DMAE + "
        f"NegNCE + TPM-CL type 4, {args.dtype}{', remat' if args.remat else ''}")
  mem, parts = [], []
  if args.memory_batch > 0:
    mem = memory_rows(args.clip, image_size, args.frames, args.max_words, args.memory_batch,
                      accums, args.dtype, args.remat, mesh)
    base_peak = next((r["peak"] for r in mem if r["k"] == 1), float("nan"))
    common.print_table(
        ["accum_steps", "micro-batch", "peak GiB/device", "temporaries GiB", "vs k=1",
         "compile s"],
        [[r["k"], args.memory_batch // r["k"], f"{r['peak'] / GIB:.2f}",
          f"{r['temp'] / GIB:.2f}", f"{r['peak'] / base_peak:.2f}", f"{r['compile_s']:.1f}"]
         for r in mem])
    parts.append(f"memory at batch {args.memory_batch}: " + ", ".join(
        f"k={r['k']} {r['peak'] / GIB:.2f} GiB" for r in mem))
  if args.time_batch > 0:
    t = time_rows(args.clip, image_size, args.frames, args.max_words, args.time_batch,
                  args.time_accum, args.dtype, args.repeats, args.warmup, mesh)
    k = args.time_accum
    ratio, ratio_min = t[k]["median"] / t[1]["median"], t[k]["min"] / t[1]["min"]
    print(f"step time at batch {args.time_batch} ({args.repeats} steps after {args.warmup} "
          f"warm-up, interleaved): accum_steps=1 {t[1]['median']:.3f} s (min {t[1]['min']:.3f}), "
          f"accum_steps={k} {t[k]['median']:.3f} s (min {t[k]['min']:.3f}); ratio {ratio:.2f} "
          f"(min {ratio_min:.2f}); compile {t[1]['compile_s']:.1f} s / {t[k]['compile_s']:.1f} s; "
          f"losses {t[1]['loss']:.5g} / {t[k]['loss']:.5g}")
    parts.append(f"step time k={k} / k=1 at batch {args.time_batch}: {ratio:.2f}x")
  print("summary: " + "; ".join(parts))
  return mem


if __name__ == "__main__":
  main()
