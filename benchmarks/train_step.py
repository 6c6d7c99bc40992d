r"""Train-step throughput: steps/s, clips/s, TFLOP/s and the JAX/PyTorch time ratio.

  python -m benchmarks.train_step --quick       # CPU, < 5 min: ViT-B/32, 12 x 224 px, batch 4, f32
  python -m benchmarks.train_step --tiny        # smoke test (tiny CLIP, 64 px), seconds
  python -m benchmarks.train_step               # GPU: ViT-B/32 and B/16 x {DMAE, meanP} x {f32,
                                                #   bf16} x {remat off, on}, batch 128, + max batch
  python -m benchmarks.train_step --clips ViT-B/16 --heads dmae --dtypes bfloat16 \
      --attention_impl cudnn --batch_size 128 --max_batch

Rows ("head"):
  dmae      the real `tvr_jax.train.make_train_step` with the paper's model: DMAE similarity,
            NegNCE, TPM-CL (T1+T2+T3), AdamW with two lr groups, clipping, finiteness checks.
  meanP     the same step and optimizer on a CLIP4Clip meanP model: similarity =
            cos(sentence, L2-normalised masked mean of the L2-normalised frame features), symmetric
            InfoNCE (scale 100), no TPM-CL: the model option `model.pooled_video=True` with both
            attentions off. (DMAE with both attentions off on the F frame tokens is NOT this: it
            gives 0.5 * (max_f <s, v_f> + mean_f <s, v_f>).)
  torch     `benchmarks/torch_reference.py`: open_clip towers, CLIP4Clip meanP, InfoNCE, AdamW,
            float32, torch threads = cores. Timed only where torch sees the device the JAX rows
            run on (CPU here; the pinned torch is a CPU build, so GPU runs show no torch row).

FLOPs: "model GFLOP" is counted analytically (matmuls and attention of both towers, forward x 3 for
forward + backward; the DMAE head, losses and optimizer are < 0.5% and left out) and is what
TFLOP/s and MFU use, so rematerialisation does not inflate them. "XLA GFLOP" is the compiled
program's cost analysis (whole step incl. recomputation; custom calls such as cuDNN attention count
as 0). MFU = model TFLOP/s / the card's dense bf16 peak (table PEAK_BF16_TFLOPS). The model count
is the full towers' work, as PyTorch runs them; the JAX vision tower's last block computes only the
class token (the one output read), ~6% less, which shows in "XLA GFLOP".
On the CPU a "matmul roofline" follows the table: the float32 rate of the step's typical matmul
(vision MLP, [B*F*tokens, W] @ [W, 4W]) in JAX and in PyTorch, and each step's time over its floor
(its FLOPs at that rate): how much of a step is not matmul.
Random weights and random uint8 frames: throughput does not depend on their values. Warm-up steps
are excluded; the median (and the fastest) of --repeats steps are reported, and the ratios of both:
the fastest step is the least disturbed by other load on a shared machine. Compile time is apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import base
from tvr_jax import sharding, train
from tvr_jax.models import build as build_lib
from tvr_jax.models import clip as clip_lib

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by `device_kind` substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0,
                    "V100": 125.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0}
HEADS = ("dmae", "meanP")


def make_config(clip: str, image_size: int, frames: int, words: int, batch: int, head: str,
                dtype: str, remat: bool, attention_impl: str = "", mesh_fsdp: int = 1):
  """The run config of one benchmark row (configs/base.py, from scratch, plus the row's choices)."""
  c = base.get_base_config()
  c.init_from = ""
  c.clip_preset, c.image_size, c.num_frames, c.max_words = clip, image_size, frames, words
  c.batch_size, c.dtype, c.remat, c.attention_impl = batch, dtype, remat, attention_impl
  c.mesh = {"data": -1, "fsdp": mesh_fsdp}
  if head == "meanP":   # CLIP4Clip: cos(sentence, normalised mean frame feature), InfoNCE
    c.model.pooled_video = True
    c.model.textual_attention = c.model.visual_attention = False
    c.model.partial_type, c.model.contrastive_loss = 0, "infonce"
  elif head != "dmae":
    raise ValueError(f"unknown head {head!r}; known: {HEADS}")
  return c


def clip_config(c) -> clip_lib.CLIPConfig:
  """The CLIPConfig `build_model` builds for run config `c` (for the FLOP count)."""
  return build_lib.clip_config(c)


def tower_flops(cc: clip_lib.CLIPConfig, batch: int, frames: int, words: int) -> float:
  """Forward + backward FLOPs (3 x forward) of both CLIP towers on one batch (matmuls only).

  Per transformer layer over T tokens of width W: 24 T W^2 (q, k, v, out and the 4x MLP) plus
  4 T^2 W (scores and weighted sum); patch embedding 2 T_p (3 p^2) W; projections 2 W D.
  """
  def layers(t, w, n):
    return n * (24 * t * w * w + 4 * t * t * w)
  tp = cc.grid_size ** 2
  image = (2 * tp * 3 * cc.patch_size ** 2 * cc.vision_width
           + layers(tp + 1, cc.vision_width, cc.vision_layers) + 2 * cc.vision_width * cc.embed_dim)
  text = layers(words, cc.text_width, cc.text_layers) + 2 * cc.text_width * cc.embed_dim
  return 3.0 * (batch * frames * image + batch * text)


def random_batch(c, mesh):
  """A global batch of random uint8 frames, full frame masks and valid token ids, on the mesh."""
  rng = np.random.default_rng(0)
  b, f, r, w = c.batch_size, c.num_frames, c.image_size, c.max_words
  ids = np.zeros((b, w), np.int32)
  ids[:, 0] = 49406
  n = w // 2
  ids[:, 1:n] = rng.integers(1, 49000, (b, n - 1))
  ids[:, n] = 49407
  batch = {"frames": rng.integers(0, 256, (b, f, r, r, 3), dtype=np.uint8),
           "frame_mask": np.ones((b, f), np.int32), "text_ids": ids}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}


def _compile(c, mesh, head):
  sharding.check_batch_size(c.batch_size, mesh)
  state, setup = train.create_train_state(c, mesh, total_steps=1000)
  step = train.make_train_step(setup, mesh)
  batch = random_batch(c, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return state, batch, compiled, time.perf_counter() - t0


def _step_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def device_memory_bytes() -> float:
  """Memory of one accelerator (`bytes_limit`), NaN where JAX does not report it (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("bytes_limit", float("nan")))


def max_batch_estimate(c, mesh, head, bytes_at_b: float) -> int:
  """Largest per-device batch that fits, from XLA's memory analysis at batch B and 2B (affine fit).

  Compiles (does not run) the step at 2B; memory is affine in the batch. Rounded down to a
  multiple of 8. Returns -1 where the device memory is unknown (CPU).
  """
  limit = device_memory_bytes()
  if not np.isfinite(limit):
    return -1
  c2 = c.copy_and_resolve_references()
  c2.batch_size = 2 * c.batch_size
  state, batch, compiled, _ = _compile(c2, mesh, head)
  bytes_2b = _step_bytes(compiled)
  del state, batch, compiled
  per_clip = (bytes_2b - bytes_at_b) / c.batch_size
  fixed = bytes_at_b - per_clip * c.batch_size
  per_device = int((0.95 * limit - fixed) / per_clip) * mesh.size // jax.device_count()
  return max(0, per_device // 8 * 8)


def run_jax(c, mesh, head: str, repeats: int, warmup: int, max_batch: bool) -> dict:
  """Compiles and times one row; returns its figures."""
  state, batch, compiled, compile_s = _compile(c, mesh, head)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  step_bytes = _step_bytes(compiled)
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], batch)
    return holder["state"]["step"], m["loss"]

  t = common.time_calls(one, repeats, warmup, sync=jax.block_until_ready)
  loss = float(jax.device_get(one()[1]))
  holder.clear()   # free the state before the next row compiles (one() is not called again)
  flops = tower_flops(clip_config(c), c.batch_size, c.num_frames, c.max_words)
  t.update(compile_s=compile_s, xla_flops=xla_flops, model_flops=flops, loss=loss,
           step_bytes=step_bytes,
           max_batch=max_batch_estimate(c, mesh, head, step_bytes) if max_batch else -1)
  return t


def peak_bf16_tflops() -> float:
  """The device's dense bf16 peak from PEAK_BF16_TFLOPS (NaN on CPU or an unknown card)."""
  kind = jax.devices()[0].device_kind
  if jax.default_backend() == "cpu":
    return float("nan")
  for k, v in PEAK_BF16_TFLOPS.items():
    if k.lower() in kind.lower():
      return v * jax.device_count()
  return float("nan")


def matmul_shape(cc: clip_lib.CLIPConfig, batch: int, frames: int) -> tuple[int, int, int]:
  """(M, K, N) of the vision MLP's first matmul at this batch: the step's typical matmul."""
  return batch * frames * (cc.grid_size ** 2 + 1), cc.vision_width, 4 * cc.vision_width


def matmul_gflops_jax(m: int, k: int, n: int, repeats: int = 10) -> float:
  """GFLOP/s of one jitted float32 [m, k] @ [k, n] matmul (median of `repeats` after 1 warm-up).

  On the CPU the step is nearly all matmuls: FLOPs / this rate is the step's floor ("roofline").
  """
  a = jnp.ones((m, k), jnp.float32)
  b = jnp.ones((k, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  t = common.time_calls(lambda: f(a, b), repeats, 1, sync=jax.block_until_ready)
  return 2e-9 * m * k * n / t["median"]


def run_torch(clip: str, batch: int, frames: int, image_size: int, words: int, repeats: int,
              warmup: int, matmul: tuple[int, int, int] | None = None) -> dict:
  """Times the PyTorch reference step in a subprocess (no thread-pool interference with XLA)."""
  cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--clip", clip, "--batch_size",
         str(batch), "--frames", str(frames), "--image_size", str(image_size), "--max_words",
         str(words), "--repeats", str(repeats), "--warmup", str(warmup), "--json"]
  if matmul:
    cmd += ["--matmul", ",".join(str(v) for v in matmul)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [line for line in out.stdout.splitlines() if line.startswith("json: ")]
  if out.returncode or not lines:
    raise RuntimeError(f"torch reference failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
  return json.loads(lines[-1][len("json: "):])


def print_roofline(clip: str, tr: dict, rows: list) -> None:
  """CPU only: each step's time over its matmul floor (its FLOPs at the measured matmul rate).

  The floor uses XLA's FLOP count for JAX rows (what the compiled program does) and the analytic
  count for PyTorch (it runs the full towers); both at the same float32 matmul shape's rate.
  """
  m, k, n = tr["matmul_shape"]
  jr, trate = tr["matmul_gflops_jax"], tr["matmul_gflops"]
  print(f"matmul roofline ({clip}, float32 [{m}x{k}] @ [{k}x{n}]): JAX {jr:.0f} GFLOP/s, "
        f"PyTorch {trate:.0f} GFLOP/s on this CPU")
  torch_floor = rows[0]["model_flops"] / 1e9 / trate if rows else float("nan")
  for r in rows:
    floor = r["xla_flops"] / 1e9 / jr
    print(f"  JAX {r['head']} {r['dtype']}{' remat' if r['remat'] else ''}: floor {floor:.2f} s, "
          f"step {r['median']:.2f} s = {r['median'] / floor:.2f} x floor")
  if rows:
    print(f"  PyTorch meanP float32: floor {torch_floor:.2f} s, step {tr['median']:.2f} s = "
          f"{tr['median'] / torch_floor:.2f} x floor")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="CPU: ViT-B/32, 12 frames, batch 4, float32, DMAE + meanP + torch")
  p.add_argument("--tiny", action="store_true", help="smoke test: tiny CLIP at 64 px, 8 frames")
  p.add_argument("--clips", default="ViT-B/32,ViT-B/16")
  p.add_argument("--heads", default="dmae,meanP")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--remats", default="false,true")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--max_words", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=0, help="global batch (default 128; 4 quick)")
  p.add_argument("--attention_impl", default="", choices=["", "xla", "cudnn"],
                 help="cudnn applies to bfloat16 rows only (cuDNN refuses float32)")
  p.add_argument("--mesh_fsdp", type=int, default=1)
  p.add_argument("--repeats", type=int, default=0, help="timed steps (default 3 quick, 10 full)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--torch", default="auto", choices=["auto", "on", "off"],
                 help="time the PyTorch reference (auto: when JAX runs on the CPU)")
  p.add_argument("--max_batch", action="store_true",
                 help="estimate the largest batch per device (accelerators; one more compile)")
  args = p.parse_args(argv)
  if args.quick or args.tiny:
    args.clips, args.dtypes, args.remats = "ViT-B/32", "float32", "false"
    args.batch_size = args.batch_size or 4
    args.repeats = args.repeats or 3
  if args.tiny:
    args.clips, args.frames, args.max_words = "tiny-64", 8, 24
    args.repeats = 2
  args.batch_size = args.batch_size or 128
  args.repeats = args.repeats or 10
  return args


def main(argv=None):
  args = parse_args(argv)
  mesh = sharding.make_mesh({"data": -1, "fsdp": args.mesh_fsdp})
  peak = peak_bf16_tflops()
  rows, torch_rows = [], {}
  want_torch = args.torch == "on" or (args.torch == "auto" and jax.default_backend() == "cpu")
  clips = args.clips.split(",")
  clip_configs = {}
  for clip in clips:
    image_size = clip_lib.CLIPConfig.preset(clip).image_size
    cc = clip_configs[clip] = clip_config(make_config(
        clip, image_size, args.frames, args.max_words, args.batch_size, "meanP", "float32", False))
    mm = matmul_shape(cc, args.batch_size, args.frames)
    if want_torch:
      t = run_torch("tiny" if clip == "tiny-64" else clip, args.batch_size, args.frames,
                    image_size, args.max_words, args.repeats, args.warmup, matmul=mm)
      torch_rows[clip] = t
      print(f"[{clip}] torch meanP f32: {t['median']:.3f} s/step ({t['threads']} threads)",
            flush=True)
      if jax.default_backend() == "cpu":
        t["matmul_gflops_jax"] = matmul_gflops_jax(*mm)
        t["matmul_shape"] = mm
    for head in args.heads.split(","):
      for dtype in args.dtypes.split(","):
        for remat in (r.strip().lower() in ("1", "true", "on") for r in args.remats.split(",")):
          attn = (args.attention_impl
                  if (args.attention_impl != "cudnn" or dtype == "bfloat16") else "")
          c = make_config(clip, image_size, args.frames, args.max_words, args.batch_size, head,
                          dtype, remat, attn, args.mesh_fsdp)
          r = run_jax(c, mesh, head, args.repeats, args.warmup, args.max_batch)
          r.update(clip=clip, head=head, dtype=dtype, remat=remat, attn=attn or "default")
          rows.append(r)
          print(f"[{clip}] jax {head} {dtype} remat={remat}: {r['median']:.3f} s/step "
                f"(compile {r['compile_s']:.1f} s)", flush=True)
  print(f"\nmachine: {common.machine()}; jax {jax.__version__} ({jax.default_backend()}); "
        f"{common.today()}")
  print(f"shapes: batch {args.batch_size} clips x {args.frames} frames x 224px (64 for tiny), "
        f"L={args.max_words}; median and min of {args.repeats} steps after {args.warmup} warm-up")
  header = ["model", "head", "dtype", "remat", "attn", "compile s", "step s", "min s", "steps/s",
            "clips/s", "model GFLOP", "XLA GFLOP", "TFLOP/s", "MFU", "max batch/dev", "torch s",
            "JAX/torch", "JAX/torch (min)"]
  table = []
  for r in rows:
    tflops = r["model_flops"] / r["median"] / 1e12
    tr = torch_rows.get(r["clip"])
    table.append([r["clip"], r["head"], r["dtype"], r["remat"], r["attn"], f"{r['compile_s']:.1f}",
                  f"{r['median']:.3f}", f"{r['min']:.3f}", f"{1 / r['median']:.3f}",
                  f"{args.batch_size / r['median']:.2f}", f"{r['model_flops'] / 1e9:.0f}",
                  f"{r['xla_flops'] / 1e9:.0f}", f"{tflops:.3f}",
                  f"{100 * tflops / peak:.1f}%" if np.isfinite(peak) else "-",
                  r["max_batch"] if r["max_batch"] >= 0 else "-",
                  f"{tr['median']:.3f}" if tr else "-",
                  f"{r['median'] / tr['median']:.2f}" if tr else "-",
                  f"{r['min'] / tr['min']:.2f}" if tr else "-"])
  for clip, tr in torch_rows.items():
    fl = tower_flops(clip_configs[clip], args.batch_size, args.frames, args.max_words)
    table.append([clip, "torch meanP", "float32", False, "sdpa", "-", f"{tr['median']:.3f}",
                  f"{tr['min']:.3f}", f"{1 / tr['median']:.3f}",
                  f"{args.batch_size / tr['median']:.2f}", f"{fl / 1e9:.0f}", "-",
                  f"{fl / tr['median'] / 1e12:.3f}", "-", "-", f"{tr['median']:.3f}", "1.00",
                  "1.00"])
  common.print_table(header, table)
  for clip, tr in torch_rows.items():
    if "matmul_gflops_jax" in tr:
      print_roofline(clip, tr, [r for r in rows if r["clip"] == clip])
  parts = []
  for r in rows:
    tr = torch_rows.get(r["clip"])
    s = (f"{r['clip']} {r['head']} {r['dtype']}{' remat' if r['remat'] else ''} "
         f"{1 / r['median']:.3f} steps/s")
    if tr:
      s += f" (JAX/torch {r['median'] / tr['median']:.2f})"
    if np.isfinite(peak):
      s += f" MFU {100 * r['model_flops'] / r['median'] / 1e12 / peak:.1f}%"
    parts.append(s)
  print("summary: " + "; ".join(parts))
  return rows, torch_rows


if __name__ == "__main__":
  main()
