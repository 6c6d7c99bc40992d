"""Cost of `RetrievalConfig.head_precision`: head + loss forward and backward, highest vs default.

    .venv/bin/python -m benchmarks.head_precision            # B 128, L 32, F 12, D 512 (the recipe)
    .venv/bin/python -m benchmarks.head_precision --quick    # B 16 (seconds)

Times `RetrievalModel.head_loss` (meanP header, DMAE similarity, NegNCE, TPM-CL) with its gradient
with respect to the head's parameters and the input features, on random unit features (the cost
does not depend on values), jitted, median of `--repeats` calls after one warm-up call. The towers
are not run: only the part whose precision the setting changes. On the CPU float32 dots are full
precision either way, so the two rows should agree; on a GPU "default" allows TF32.
"""

import argparse
import sys
import time

from flax import nnx
import jax
import numpy as np

from benchmarks import common
from tvr_jax.models.clip import CLIPConfig
from tvr_jax.models.retrieval import RetrievalConfig, RetrievalModel


def features(b: int, length: int, f: int, d: int, seed: int = 0):
  """Unit text / frame features with random padding: ((sent, words, mask), tokens, frame mask)."""
  rng = np.random.default_rng(seed)

  def unit(*shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  tmask = (np.arange(length)[None] <= rng.integers(2, length, b)[:, None]).astype(np.int32)
  vmask = (np.arange(f)[None] < rng.integers(1, f + 1, b)[:, None]).astype(np.int32)
  return (unit(b, d), unit(b, length, d), tmask), unit(b, f, d), vmask


def head_step(precision: str, b: int, length: int, f: int, d: int):
  """(jitted value-and-grad of head_loss, its arguments) for one precision setting."""
  config = RetrievalConfig(max_words=length, max_frames=f, head_precision=precision)
  # A tiny CLIP of embedding width d: the head's sizes depend only on d, L and F.
  model = RetrievalModel(config, clip_config=CLIPConfig.preset("tiny", embed_dim=d),
                         rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  head = {k: v for k, v in nnx.to_pure_dict(params).items() if k != "clip"}
  clip_params = nnx.to_pure_dict(params)["clip"]

  def loss(head, sent, words, tokens, tmask, vmask):
    m = nnx.merge(graph, {**head, "clip": clip_params}, rest)
    return m.head_loss((sent, words, tmask), tokens, vmask)[0]
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  (sent, words, tmask), tokens, vmask = features(b, length, f, d)
  return fn, (head, sent, words, tokens, tmask, vmask)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--words", type=int, default=32)
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="B 16, 3 repeats")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.repeats = 16, 3
  b, length, f, d = args.batch, args.words, args.frames, args.dim
  print(f"head_loss value+grad, B {b}, L {length}, F {f}, D {d}, float32; {common.machine()}; "
        f"{common.today()}")
  rows, medians, values = [], {}, {}
  for precision in ("highest", "default"):
    fn, fn_args = head_step(precision, b, length, f, d)
    t0 = time.perf_counter()
    compiled = fn.lower(*fn_args).compile()
    compile_s = time.perf_counter() - t0
    t = common.time_calls(lambda compiled=compiled, fn_args=fn_args: compiled(*fn_args),
                          args.repeats, sync=jax.block_until_ready)
    values[precision] = float(compiled(*fn_args)[0])
    medians[precision] = t["median"]
    rows.append([precision, f"{compile_s:.1f}", f"{t['median'] * 1e3:.1f}",
                 f"{t['min'] * 1e3:.1f}", f"{t['max'] * 1e3:.1f}", f"{values[precision]:.6f}"])
  common.print_table(["head_precision", "compile s", "median ms", "min ms", "max ms", "loss"],
                     rows)
  print(f"summary: highest / default = {medians['highest'] / medians['default']:.3f}x time; "
        f"loss difference {abs(values['highest'] - values['default']):.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
