r"""Train-step throughput: steps/s, clips/s and TFLOP/s (XLA's cost analysis of the compiled step).

  python benchmarks/train_step.py --quick                 # tiny CLIP, 64 px, 8 frames: CPU, < 5 min
  python benchmarks/train_step.py                          # ViT-B/32, 12 frames at 224, L=32, batch 128
  python benchmarks/train_step.py --batch_size=64 --dtype=bfloat16 --remat --mesh_fsdp=1

Random weights and random uint8 frames (throughput does not depend on their values); the step is the
real `tvr_jax.train.make_train_step` (DMAE + NegNCE + TPM-CL, AdamW, clipping) on the global batch,
sharded over all local devices as the config's mesh says.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from tvr_jax import sharding, train  # noqa: E402


def make_config(args):
  """The run config of the benchmark (from configs/base.py plus the flags)."""
  c = base.get_base_config()
  c.init_from = ""
  if args.quick:
    c.clip_preset, c.image_size, c.num_frames, c.max_words = "tiny-64", 64, 8, 24
    c.batch_size = args.batch_size or 64
  else:
    c.clip_preset, c.image_size, c.num_frames, c.max_words = args.clip, 224, args.frames, 32
    c.batch_size = args.batch_size or 128
  c.dtype, c.remat = args.dtype, args.remat
  c.mesh = {"data": -1, "fsdp": args.mesh_fsdp}
  return c


def random_batch(c, mesh):
  """A global batch of random uint8 frames, full frame masks and valid token ids."""
  rng = np.random.default_rng(0)
  b, f, r, l = c.batch_size, c.num_frames, c.image_size, c.max_words
  ids = np.zeros((b, l), np.int32)
  ids[:, 0] = 49406
  n = l // 2
  ids[:, 1:n] = rng.integers(1, 49000, (b, n - 1))
  ids[:, n] = 49407
  batch = {"frames": rng.integers(0, 256, (b, f, r, r, 3), dtype=np.uint8),
           "frame_mask": np.ones((b, f), np.int32), "text_ids": ids}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny model (CPU)")
  p.add_argument("--clip", default="ViT-B/32")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--batch_size", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--mesh_fsdp", type=int, default=1)
  p.add_argument("--steps", type=int, default=0, help="timed steps (default 20 quick, 10 full)")
  args = p.parse_args()
  c = make_config(args)
  steps = args.steps or (20 if args.quick else 10)
  mesh = sharding.make_mesh(c.mesh.to_dict())
  sharding.check_batch_size(c.batch_size, mesh)
  state, setup = train.create_train_state(c, mesh, total_steps=1000)
  step = train.make_train_step(setup, mesh)
  batch = random_batch(c, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  state, m = compiled(state, batch)   # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state["step"], m["loss"]))
    times.append(time.perf_counter() - t)
  t_med = float(np.median(times))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  rows = [
      ("device", f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"),
      ("mesh", str(dict(mesh.shape))),
      ("model", f"{c.clip_preset}, {n_params / 1e6:.1f}M params, {c.dtype}, remat={c.remat}"),
      ("batch", f"{c.batch_size} clips x {c.num_frames} frames x {c.image_size}px, L={c.max_words}"),
      ("compile s", f"{compile_s:.1f}"),
      ("step s (median)", f"{t_med:.4f}  (min {min(times):.4f}, max {max(times):.4f}, n={steps})"),
      ("steps/s", f"{1 / t_med:.2f}"),
      ("clips/s", f"{c.batch_size / t_med:.1f}"),
      ("GFLOP/step", f"{flops / 1e9:.1f}  (XLA cost analysis, whole step)"),
      ("TFLOP/s", f"{flops / t_med / 1e12:.3f}  (total over {jax.device_count()} devices)"),
      ("loss", f"{float(m['loss']):.4f}"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
  main()
