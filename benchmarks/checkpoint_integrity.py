"""Cost of checkpoint integrity: per-leaf checksums at save, verification at restore.

    .venv/bin/python -m benchmarks.checkpoint_integrity            # tiny-64 and ViT-B/32 states
    .venv/bin/python -m benchmarks.checkpoint_integrity --quick    # tiny-64 only (seconds)

The train state (parameters + Adam moments + counters) has the leaf shapes of the synthetic
config's model with the given CLIP preset, filled with random values. For each size it reports the
checksum call alone (one jitted device call over every leaf: compile once, then the median of
`--repeats`), and a synchronous save and a restore through `TrainCheckpointManager`, both of which
include it (save: checksums + finiteness before writing; restore: verification after reading).
`--no_io` times the checksum call only (for states too large to write twice on a small machine).
"""

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from configs import synthetic
from tvr_jax import checkpointing, sharding, train


def random_state(preset: str):
  """A train state of `preset`'s shapes with random values, and its abstract (sharded) form."""
  c = synthetic.get_config("smoke")
  c.clip_preset = preset
  if preset != "tiny-64":
    c.image_size = 224
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  abstract, _ = train.abstract_train_state(c, mesh, total_steps=100)
  leaves, treedef = jax.tree.flatten(abstract)
  rng = np.random.default_rng(0)

  def fill(leaf):   # on the host, then placed: no per-shape compilation
    if np.issubdtype(leaf.dtype, np.floating):
      value = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
    else:
      value = rng.integers(0, 1000, leaf.shape).astype(leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  state = jax.tree.unflatten(treedef, [fill(leaf) for leaf in leaves])
  return state, abstract


def measure(preset: str, repeats: int, directory: str, io: bool = True) -> list:
  state, abstract = random_state(preset)
  n_leaves = len(jax.tree.leaves(state))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  t0 = time.perf_counter()
  checkpointing.state_integrity(state)
  first = time.perf_counter() - t0
  timed = common.time_calls(lambda: checkpointing.state_integrity(state), repeats, warmup=0)
  c = timed["median"]
  row = [preset, n_leaves, f"{nbytes / 2**20:.0f}", f"{first:.2f}", f"{c:.3f}",
         f"{nbytes / 2**30 / max(c, 1e-9):.2f}"]
  if not io:
    return row + ["-"] * 4
  ckpt_dir = os.path.join(directory, preset.replace("/", "-"))
  mgr = checkpointing.TrainCheckpointManager(ckpt_dir, async_save=False, best_metric=None)
  t0 = time.perf_counter()
  mgr.save(1, state)
  save_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  mgr.restore(1, abstract)
  restore_s = time.perf_counter() - t0
  mgr.close()
  shutil.rmtree(ckpt_dir, ignore_errors=True)
  return row + [f"{save_s:.2f}", f"{100 * c / save_s:.0f}%", f"{restore_s:.2f}",
                f"{100 * c / restore_s:.0f}%"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny-64 only")
  parser.add_argument("--preset", action="append", default=None,
                      help="CLIP preset(s) to measure instead (repeatable), e.g. ViT-B/32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_io", action="store_true",
                      help="time the checksum call only "
                           "(no save/restore: needs 1x the state's RAM)")
  parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: tmp)")
  args = parser.parse_args()
  presets = args.preset or (["tiny-64"] if args.quick else ["tiny-64", "ViT-B/32"])
  directory = tempfile.mkdtemp(prefix="ckpt_integrity_", dir=args.dir)
  print(f"{common.machine()}, JAX {jax.__version__}, {common.today()}")
  try:
    rows = [measure(p, args.repeats, directory, io=not args.no_io) for p in presets]
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  common.print_table(["state", "leaves", "MiB", "first call s", "checksum s", "GiB/s",
                      "save s", "of save", "restore s", "of restore"], rows)
  print("summary: " + "; ".join(f"{r[0]} checksums {r[4]} s ({r[7]} of a {r[6]} s save, {r[9]} "
                                 f"of a {r[8]} s restore)" if r[6] != "-" else
                                 f"{r[0]} checksums {r[4]} s" for r in rows))


if __name__ == "__main__":
  main()
